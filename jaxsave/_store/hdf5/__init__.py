"""HDF5 mechanics of the sample file: the file read and written, datasets, their sizes, chunks,
the held file and its SWMR swaps, superblock, trust, owner."""

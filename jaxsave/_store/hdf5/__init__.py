"""HDF5 mechanics of the sample file: the file read and written, datasets, chunks, names,
the held file and its SWMR swaps, superblock, trust, owner."""

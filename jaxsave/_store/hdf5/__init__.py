"""HDF5 mechanics of the sample file: datasets, names, SWMR file, superblock, trust, owner."""

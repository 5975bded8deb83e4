"""The storage layer: the sample file's schema and the HDF5 backend that implements it.

``arviz`` converts read samples to ``arviz.InferenceData``; ``hdf5`` holds the
HDF5 mechanics (datasets, names, the SWMR file, superblock, trust checks, owner).
"""

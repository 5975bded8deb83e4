"""The storage layer: the sample file's schema and the HDF5 backend that implements it.

``arviz`` converts read samples to ``arviz.InferenceData``; ``hdf5`` holds the
HDF5 mechanics (the sample file, the held file and its owner, datasets, chunks, names,
the SWMR file, superblock, trust checks).
"""

"""The storage layer: the sample file's schema and the HDF5 and Zarr backends that implement it.

``schema`` says what a sample file holds, ``names`` names its variables, ``location`` and
``source`` open an HDF5 file or a Zarr store for the readers, ``rows`` reads the stored draws
through it, ``arviz`` converts read samples to ``arviz.InferenceData``; ``hdf5`` holds the
HDF5 mechanics (the sample file, the held file and its owner, datasets, their sizes, chunks,
the SWMR file, superblock, trust checks), ``zarr`` the Zarr ones.
"""

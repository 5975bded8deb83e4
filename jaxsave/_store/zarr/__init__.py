"""The Zarr v3 backend of the sample file's schema (:mod:`jaxsave._store.schema`)."""

"""The bottom layer: plain helpers that know nothing of samplers or files' contents.

Tree naming (``tree``), leaf dtypes and key data (``dtypes``), atomic files (``atomic``),
disk-space checks (``diskspace``) and the one-writer file lock (``filelock``).
"""

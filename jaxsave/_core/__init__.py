"""The bottom layer: plain helpers that know nothing of samplers or files' contents.

Tree naming (``tree``), leaf dtypes and key data (``dtypes``), atomic files (``atomic``),
disk-space checks (``diskspace``), the one-writer file lock (``filelock``), host/device
transfers of many arrays (``transfer``) and pausing the cyclic gc (``nogc``).
"""

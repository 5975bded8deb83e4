"""The pytree-serialization layer: tree descriptions (``treespec``), matching a stored
tree against a template (``treematch``), the header's leaf table (``leaf_table``), the
format versions and their upgrades (``versions``) and the file formats (``formats``)."""

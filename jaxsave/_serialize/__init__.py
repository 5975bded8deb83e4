"""The pytree-serialization layer: tree descriptions (``treespec``), matching a stored
tree against a template (``treematch``) and the file formats (``formats``)."""

"""The streaming layer: from a traced ``save`` call inside ``jax.jit`` to a collector.

Saver state (``state``), the saver of ``jaxsave.save`` (``streamer``), the traced flush
and its header (``flush``), packing rows into blocks (``packing``), the host callback
(``callback``), the host writer thread (``writer``), the progress bar (``progress``),
the interpreter-exit hook (``shutdown``), sharding (``sharding``), resuming a sampler
(``resume``) and the device saver of ``no_save`` (``no_save``).
"""

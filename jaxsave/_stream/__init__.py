"""The streaming layer: from a traced ``save`` call inside ``jax.jit`` to a collector.

Saver state (``state``), the traced save/flush (``streamer``), packing rows into
blocks (``packing``), the host callback (``callback``), the host writer thread
(``writer``), sharding (``sharding``), resuming a sampler (``resume``) and the device
saver of ``no_save`` (``no_save``).
"""

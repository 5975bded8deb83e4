"""The progress bar of ``jaxsave.save(..., progress=True)``: tqdm, updated from the writer thread.

It counts steps, moved once per block (so it costs nothing per step), and shows the
samples kept and the chains registered; its clock starts with the first block, not
with compilation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxsave._stream.writer import Block, Writer

__all__ = ["start_bar"]


def start_bar(writer: Writer, total: int | None, chains: Callable[[], int]) -> Any:
    """A tqdm bar of ``total`` steps (``None``: unknown) that ``writer`` moves at each block.

    ``chains()`` is the number of chains registered, shown beside the samples kept.
    Close the bar returned when the run ends.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError("progress=True needs tqdm: pip install 'jaxsave[progress]'") from error
    bar = tqdm(total=total, unit="step", desc="sampling", dynamic_ncols=True)
    kept = [0]

    def on_block(block: Block) -> None:  # writer thread: one update per block, not per step
        if bar.n == 0 and kept[0] == 0:
            bar.reset(total=bar.total)  # the clock starts with sampling, not with compilation
        kept[0] += int(block.mask.sum())
        position = int(block.ends.max()) if len(block.ends) else bar.n
        if position > bar.n:
            bar.update(position - bar.n)
        bar.set_postfix(kept=kept[0], chains=chains(), refresh=False)

    writer.on_block = on_block
    return bar

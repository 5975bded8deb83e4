"""ArviZ across its two majors: ``InferenceData`` (0.x) and ``xarray.DataTree`` (1.x).

ArviZ 1.0 replaced ``InferenceData`` with ``xarray.DataTree`` and changed
``from_dict`` to take one mapping of groups. This module is the one place that
knows; the rest of jaxsave builds a ``{group: {name: (chain, draw, ...) array}}``
mapping and calls :func:`from_groups`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def major_version(az: Any) -> int:
    """The major version of an imported ``arviz`` module (0 or 1, say)."""
    return int(str(az.__version__).split(".")[0])


def from_groups(groups: Mapping[str, Mapping[str, np.ndarray]]) -> Any:
    """What the installed ArviZ works with, from ``{group: {name: array}}``.

    A ``xarray.DataTree`` on ArviZ 1.x, an ``arviz.InferenceData`` on 0.x; the
    arrays are ``(chain, draw, ...)`` and their other axes get ArviZ's default
    names ``<name>_dim_<i>``. Empty groups are left out.

    >>> import numpy as np
    >>> data = from_groups({"posterior": {"x": np.zeros((2, 5, 3))}, "sample_stats": {}})
    >>> dict(data["posterior"]["x"].sizes)
    {'chain': 2, 'draw': 5, 'x_dim_0': 3}
    """
    import arviz as az

    present = {name: dict(group) for name, group in groups.items() if group}
    if major_version(az) >= 1:
        return az.from_dict(present)
    return az.from_dict(**present)  # type: ignore[arg-type]

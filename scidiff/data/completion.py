"""The completion record of a ``scidiff-sample`` ensemble store: which members are
completely written (docs/architecture.md#ensemble-output).

The record ``done(sample, member)`` (bool, set once the member's data is on disk) lives
in the zarr sub-group ``progress``, which ``xarray.open_zarr(store)`` does not show::

    xarray.open_zarr("ensemble.zarr", group="progress")["done"]

Stores written before that group existed hold it as the root data variable ``done``.
:func:`done_array` and :func:`read_done` know both layouts; the store's writer
(:mod:`scidiff.sampling.store`) and the evaluation reading members from a store
(:mod:`scidiff.evaluation.members`) both go through them. They live here, below both,
because ``sampling`` and ``evaluation`` are independent layers (neither imports the other).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

PROGRESS = "progress"
"""The zarr sub-group holding the completion record."""
DONE = "done"
"""The record's name, in :data:`PROGRESS` (or, in stores of the earlier layout, at the root)."""


def done_array(group: Any) -> Any:
    """The zarr array of the record in an opened zarr group: ``progress/done``, or the root
    ``done`` of a store of the earlier layout. Raises ``KeyError`` when the group has neither."""
    try:
        return group[f"{PROGRESS}/{DONE}"]
    except KeyError:
        return group[DONE]


def read_done(path: str | os.PathLike) -> np.ndarray | None:
    """``[N, M]`` bool: which members of the store at ``path`` are completely written; None
    when the store has no completion record (a zarr store not written by ``scidiff-sample``).

    Errors opening ``path`` as a zarr group (missing, not zarr) are raised as they are.
    """
    import zarr

    group = zarr.open_group(os.fspath(path), mode="r")
    try:
        array = done_array(group)
    except KeyError:
        return None
    return np.asarray(array[...], dtype=bool)


__all__ = ["DONE", "PROGRESS", "done_array", "read_done"]

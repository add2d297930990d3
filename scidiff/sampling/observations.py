"""Observations for inpainting / data assimilation, read from a zarr or netCDF store.

The store holds one variable per channel of the checkpoint (named as the
channel), with the checkpoint's spatial dims, and optionally a leading
``sample`` dim of length N (one map per parameter set; without it one map serves
all sets). Unobserved points are NaN, or 0 in a mask variable (``mask``: 1 =
observed; the name is configurable, it may lack the channel and sample dims).
Values are converted to model units with the checkpoint's statistics; the
unobserved points are set to 0 there (the methods never read them).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from scidiff.inference.generation import ObservationMethod, Observations


class ObservationError(ValueError):
    """Observations that cannot be used; the message names the file and the variable."""


def load_observations(path: str | os.PathLike, pretrained, num_samples: int, *, method: ObservationMethod,
                      mask: str | None = "mask") -> Observations:
    """Read observations for ``pretrained``'s channels (see the module docstring)."""
    from scidiff.data.dataset import open_store

    path = Path(path)
    key = "observations.path"
    if getattr(pretrained, "latent", None) is not None:
        raise ObservationError("observations: inpainting runs on a field-space model; this checkpoint is a latent "
                               "diffusion model, whose latent has no grid point for an observation (sample it "
                               "without observations, or inpaint with a field-space model)")
    if not path.exists():
        raise ObservationError(f"{key}: {path} does not exist")
    try:
        ds = open_store(path)
    except ValueError as exc:
        raise ObservationError(f"{key}: {exc}") from None
    meta = pretrained.metadata
    spatial = tuple(meta.spatial_dims)
    missing = [c for c in meta.channel_names if c not in ds.data_vars]
    if missing:
        raise ObservationError(f"{key}: {path} lacks the variable(s) {missing} (it has {sorted(ds.data_vars)})")

    def read(name: str, allow_broadcast: bool) -> np.ndarray:
        da = ds[name]
        extra = [d for d in da.dims if d not in (*spatial, "sample")]
        if extra:
            raise ObservationError(f"{key}: {path}: {name} has dims {da.dims}; expected (sample,) {spatial}")
        if not allow_broadcast and set(spatial) - set(da.dims):
            raise ObservationError(f"{key}: {path}: {name} lacks the spatial dims {spatial} (it has {da.dims})")
        if "sample" in da.dims and da.sizes["sample"] != num_samples:
            raise ObservationError(f"{key}: {path}: {name} has {da.sizes['sample']} samples for "
                                   f"{num_samples} parameter sets")
        target = ("sample", *spatial) if "sample" in da.dims else spatial
        da = da.transpose(*[d for d in target if d in da.dims])
        for d, size in zip(spatial, meta.spatial_shape):
            if d in da.dims and da.sizes[d] != size:
                raise ObservationError(f"{key}: {path}: {name} has {d}={da.sizes[d]}, the model's is {size}")
        arr = np.asarray(da.values, dtype=np.float64)
        if "sample" not in da.dims:
            arr = arr[None]
        # broadcastable [n, *S]: add the missing spatial axes
        shape = [arr.shape[0]] + [meta.spatial_shape[i] if d in da.dims else 1 for i, d in enumerate(spatial)]
        return np.broadcast_to(arr.reshape(shape), (arr.shape[0], *meta.spatial_shape))

    values = [read(c, allow_broadcast=False) for c in meta.channel_names]
    n = max(v.shape[0] for v in values)
    x = np.stack([np.broadcast_to(v, (n, *meta.spatial_shape)) for v in values], axis=1)  # [n, C, *S]
    if mask is not None and mask in ds.variables:
        m = read(mask, allow_broadcast=True)
        n = max(n, m.shape[0])
        x = np.broadcast_to(x, (n, *x.shape[1:]))
        obs_mask = np.broadcast_to(m[:, None], x.shape) != 0
        if np.isnan(x[obs_mask]).any():
            raise ObservationError(f"{key}: {path}: NaN at points the mask {mask!r} marks as observed")
    else:
        obs_mask = np.isfinite(x)
    if not obs_mask.any():
        raise ObservationError(f"{key}: {path} has no observed point")
    phys = torch.as_tensor(np.where(obs_mask, x, np.nan), dtype=torch.float32)
    with torch.no_grad():
        model = torch.nan_to_num(pretrained.to_model(phys), nan=0.0, posinf=0.0, neginf=0.0)
    mask_t = torch.as_tensor(obs_mask, dtype=torch.float32)
    return Observations(observed=model * mask_t, mask=mask_t, method=method)


__all__ = ["ObservationError", "load_observations"]

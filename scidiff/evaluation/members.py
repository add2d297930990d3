"""Where the members come from: an ensemble store written by ``scidiff-sample``, or the
model itself.

* :class:`EnsembleSource` -- members read from a ``scidiff-sample`` zarr store, matched to
  the data samples (by its ``data_index`` coordinate, or in split order) and checked
  against their conditioning parameters;
* :func:`generate_members` -- ``members`` samples per data sample through the one
  generation path (:func:`scidiff.inference.generation.sample_model`), conditioned on the
  sample's parameters/fields, each member's noise keyed by (seed, store index, member).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from scidiff.conditioning import Conditioning
from scidiff.data.completion import read_done
from scidiff.evaluation.result import EvaluationError
from scidiff.inference.generation import GuidanceSpec, Sampler, initial_noise, sample_model
from scidiff.inference.seeds import generator


class EnsembleSource:
    """Members read from a ``scidiff-sample`` zarr store (dims ``(sample, member, *spatial)``,
    one variable per channel, physical units), matched to data samples.

    A store with a completion record (``progress/done``, or ``done`` in stores of the
    earlier layout) is refused unless every member used is written.

    Matching: a ``data_index`` (or ``index``) coordinate along ``sample`` gives each
    ensemble sample's flat index in the data store; without it, ensemble sample ``j``
    is the ``j``-th sample of the evaluated split. Conditioning parameters stored along
    ``sample`` must equal the data's (else the data do not match the ensemble).
    """

    def __init__(self, path: str | os.PathLike, metadata, members: int | None = None) -> None:
        import xarray as xr

        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise EvaluationError(f"ensemble: store {self.path} does not exist")
        try:
            self.ds = xr.open_zarr(self.path)
        except Exception as exc:  # noqa: BLE001
            raise EvaluationError(f"ensemble: {self.path} is not a readable zarr store ({type(exc).__name__})") from None
        names = list(metadata.channel_names)
        missing = [n for n in names if n not in self.ds.data_vars]
        if missing:
            raise EvaluationError(f"ensemble: {self.path} lacks the variables {missing} of the checkpoint's channels")
        want = ("sample", "member", *metadata.spatial_dims)
        for n in names:
            if tuple(self.ds[n].dims) != want:
                raise EvaluationError(f"ensemble: variable {n!r} in {self.path} has dims {self.ds[n].dims}, expected {want}")
        self.names = names
        self.num_members = int(self.ds.sizes["member"])
        if members is not None and members < self.num_members:
            self.num_members = int(members)
        if self.num_members < 2:
            raise EvaluationError(f"ensemble: {self.path} has {self.num_members} member(s); CRPS and the "
                                  "spread-skill ratio need >= 2")
        self._check_finished()
        self.index_coord = next((c for c in ("data_index", "index") if c in self.ds.coords or c in self.ds.data_vars), None)
        self.param_names = [p for p in metadata.param_names if p in self.ds.coords or p in self.ds.data_vars]

    def _check_finished(self) -> None:
        """Refuse a ``scidiff-sample`` store whose members (the first ``num_members``) are
        not all written: its completion record (either layout, :mod:`scidiff.data.completion`)
        says so; the unwritten members are NaN. A store without a record is taken as it is.
        Checked once, up front, so every rank refuses before any work."""
        try:
            done = read_done(self.path)
        except Exception as exc:  # noqa: BLE001 - one line naming the store
            raise EvaluationError(f"ensemble: cannot read the completion record of {self.path} "
                                  f"({type(exc).__name__}: {exc})") from None
        if done is None:
            return
        shape = (self.size, int(self.ds.sizes["member"]))
        if done.shape != shape:
            raise EvaluationError(f"ensemble: the completion record of {self.path} has shape {done.shape} "
                                  f"but its members {shape} (sample, member)")
        missing = ~done[:, : self.num_members]
        if missing.any():
            j, k = (int(i) for i in np.argwhere(missing)[0])
            raise EvaluationError(
                f"ensemble: {self.path} is unfinished: {int(missing.sum())} of the {missing.size} members to evaluate are "
                f"not written yet (the first: member {k} of sample {j}); finish the scidiff-sample run first (run the "
                "same command again: it resumes)"
            )

    @property
    def size(self) -> int:
        return int(self.ds.sizes["sample"])

    def data_indices(self) -> np.ndarray | None:
        if self.index_coord is None:
            return None
        return np.asarray(self.ds[self.index_coord].values, np.int64).reshape(-1)

    def read(self, positions: np.ndarray) -> Tensor:
        """Members ``[B, M, C, *S]`` (float64, physical) of ensemble samples ``positions``."""
        arrays = [np.asarray(self.ds[n].isel(sample=positions, member=slice(0, self.num_members)).values, np.float64)
                  for n in self.names]
        return torch.from_numpy(np.stack(arrays, axis=2))

    def check_params(self, positions: np.ndarray, params: np.ndarray | None, names: Sequence[str],
                     store_indices: np.ndarray) -> None:
        if params is None:
            return
        for p in self.param_names:
            stored = np.asarray(self.ds[p].isel(sample=positions).values, np.float64)
            data = params[:, list(names).index(p)]
            bad = ~np.isclose(stored, data, rtol=1e-4, atol=1e-6)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise EvaluationError(
                    f"ensemble: sample {int(positions[j])} of {self.path} has {p}={stored[j]:.6g} but the data sample "
                    f"{int(store_indices[j])} it is matched with has {p}={data[j]:.6g} (give the matching data)"
                )


def generate_members(pretrained, x: Tensor, cond: Conditioning | None, store_idx: np.ndarray, *, members: int,
                     seed: int, sampler: Sampler, guidance: GuidanceSpec, device: torch.device) -> Tensor:
    """``members`` samples per data sample, ``[B, M, C, *S]`` normalised; member k of store
    sample j draws its x_T and its sampler noise from the generator keyed (seed, 2, j, k).
    A latent model samples latents and decodes them."""
    b, m = x.shape[0], members
    gens = [generator(seed, 2, int(j), k) for j in store_idx for k in range(m)]
    latent = getattr(pretrained, "latent", None)
    shape = pretrained.sample_shape if latent is not None else x.shape[1:]
    x_T = initial_noise(shape, gens, device, x.dtype)
    rep = None if cond is None else cond.map(lambda v: v.repeat_interleave(m, dim=0))
    out = sample_model(pretrained.denoiser, pretrained.diffusion, x_T, rep, sampler=sampler, guidance=guidance,
                       generator=gens)
    if latent is not None:
        out = latent.decode(out)
    return out.reshape(b, m, *x.shape[1:])


__all__ = ["EnsembleSource", "generate_members"]

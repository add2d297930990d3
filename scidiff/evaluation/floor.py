"""The noise floor of the sample metrics: the same metrics for an ensemble of REAL fields.

A sample metric (spectral error, CRPS, rank-histogram deviation, ...) computed from
``M`` members against ``N`` data samples is never exactly its ideal value: finite
ensembles and finite data make noise, and the scores (CRPS, energy score) have a
positive minimum, the data's own conditional spread. Alone, the number says little.
The *floor* is what a model that draws from the data's own distribution gets:

* for each evaluated data sample ``j``, a **floor ensemble** of ``M`` real fields from
  the data store (``M`` = the number of members of the model's ensemble), drawn from
  approximately the same conditional distribution as ``j``: its ``M`` **nearest
  neighbours in normalised condition space** (see :func:`condition_features`:
  the model-units parameters, plus each conditioning field channel as its root-mean-
  square difference over the grid; Euclidean), taken from a **pool** of every store
  sample in the splits named by ``floor.pool`` (``all`` by default: real fields are
  real whatever split they are in) **except ``j`` itself**;
* for an **unconditional** model (no parameters, no conditioning fields) every pool
  sample is equally near: ``M`` distinct random samples ``!= j``, keyed by
  (seed, ``j``, pool index), so they do not depend on the batch size or the ranks;
* ties (equal conditions) are broken by the same key, never by position in the store.

The floor ensembles go through exactly the metrics of the model's ensembles (a second
:class:`~scidiff.evaluation.suite.SampleMetrics` of the same metric suite, torchmetrics
with sum states), named
``floor/<metric>`` (``floor/std_ratio/<var>``, ``floor/crps/<var>``, ...). A perfect model
reaches the floor in expectation. For a conditional model the floor is slightly
*pessimistic*: the neighbours' conditions differ a little from ``j``'s, so the floor
ensemble is a little wider (and its scores a little worse) than draws from
``p(x | condition_j)``; the verdict's tolerances (:mod:`scidiff.evaluation.verdict`)
then favour the model slightly. The denser the pool in condition space, the smaller
that effect.

Cost: no model calls; reading the pool's conditions once (parameters only when there
are no conditioning fields; nothing for an unconditional model) and ``M`` extra fields
per evaluated sample. Under DDP every rank finds the neighbours of *all* evaluated
samples from the same arrays in the same order, so each sample's neighbours are the
same on every rank (and for any batch size); each rank then reads only its own
samples' floor ensembles.

Masks: where a neighbour misses a point the data sample has, that point is left out of
the floor's metrics for that sample (the data mask times every member's mask).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from scidiff.data.splits import SPLIT_NAMES
from scidiff.evaluation.checks import check_bool, check_choice

POOLS = ("all", *SPLIT_NAMES)
FEATURE_BYTES = 1 << 27  # condition features read per chunk of the pool (128 MiB of float64)
DISTANCE_ELEMENTS = 1 << 24  # query x pool x feature elements per exact distance block
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class FloorSettings:
    """Args:
    enabled: compute the floor (needs sampling: the floor is that of the sample metrics).
    pool: the splits the floor's real fields are drawn from: ``all`` (every split), or
        one of ``train``, ``val``, ``test``. The evaluated sample itself is never in
        its own floor ensemble.
    """

    enabled: bool = True
    pool: Literal["all", "train", "val", "test"] = "all"

    def __post_init__(self) -> None:
        check_bool("floor.enabled", self.enabled)
        check_choice("floor.pool", self.pool, POOLS)


# ----------------------------------------------------------------------------- keys
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = np.asarray(x, np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def query_keys(seed: int, query: np.ndarray) -> np.ndarray:
    """``[Q]`` uint64 keys of (seed, query store index) (``numpy.random.SeedSequence``)."""
    return np.array([np.random.SeedSequence([int(seed), 6, int(j)]).generate_state(1, np.uint64)[0]
                     for j in np.asarray(query).reshape(-1)], np.uint64).reshape(-1)


def tie_keys(seed: int | None, query: np.ndarray, pool: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
    """``[Q, P]`` uint64 keys of (seed, query store index, pool store index): the random
    order of equally near pool samples, the same whatever else is queried or pooled
    (``keys``: :func:`query_keys` of ``query``, if already computed)."""
    q = query_keys(seed, query) if keys is None else keys
    p = _splitmix64(np.asarray(pool, np.int64).astype(np.uint64))
    return _splitmix64(q[:, None] ^ p[None, :])


# ------------------------------------------------------------------------------ pool
def pool_indices(dm, pool: str) -> np.ndarray:
    """Sorted flat store indices of the pool: the union of every split (``all``) or one split
    (``pool``: a :class:`FloorSettings` pool, checked there)."""
    splits = dm.split_indices
    names = SPLIT_NAMES if pool == "all" else (pool,)
    parts = [np.asarray(splits[n], np.int64) for n in names if n in splits]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def is_conditional(metadata) -> bool:
    """Whether the model sees parameters, conditioning fields or an embedding."""
    return (bool(tuple(metadata.param_names)) or bool(tuple(metadata.field_names))
            or bool(tuple(getattr(metadata, "embedding_names", ()))))


def condition_features(reader, indices: np.ndarray, metadata) -> np.ndarray:
    """``[n, D]`` float64 condition vectors of store samples ``indices``, in model units.

    The normalised parameters (one coordinate each), then each conditioning field
    channel (conditioning variables and coarsened copies of the target) flattened and
    divided by ``sqrt(number of grid points)``: the Euclidean distance squared is then
    the sum over parameters of their squared differences plus the sum over field
    channels of their *mean* squared difference over the grid, so a 64 x 64 field does
    not outweigh the parameters 4096 times. The embedding's components likewise count as one
    (divided by ``sqrt(E)``). ``D = 0`` for an unconditional model.
    """
    idx = np.asarray(indices, np.int64).reshape(-1)
    if not is_conditional(metadata):
        return np.zeros((idx.size, 0), np.float64)
    embedding_dim = len(getattr(metadata, "embedding_names", ()))
    if not tuple(metadata.field_names) and not embedding_dim:  # parameters only: no need to read the fields
        params = reader.read_params(idx)
        if params is not None:
            return params.to(torch.float64).numpy()
    points = float(np.prod(metadata.spatial_shape))
    per_sample = 8 * (len(metadata.param_names) + len(metadata.field_names) * points
                      + len(metadata.channel_names) * points)
    chunk = max(1, int(FEATURE_BYTES // max(per_sample, 1)))
    out = []
    for start in range(0, idx.size, chunk):
        batch = reader.read_batch(idx[start:start + chunk])
        parts = []
        if batch.get("params") is not None:
            parts.append(batch["params"].to(torch.float64).reshape(len(batch["x"]), -1))
        if batch.get("fields") is not None:
            parts.append(batch["fields"].to(torch.float64).flatten(1) / math.sqrt(points))
        if batch.get("embedding") is not None:
            parts.append(batch["embedding"].to(torch.float64) / math.sqrt(embedding_dim))
        out.append(torch.cat(parts, dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float64)


# ------------------------------------------------------------------------- neighbours
def _distances(query: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """``[Q, P]`` squared Euclidean distances; exact differences for few features, else the
    product form rounded to float32 precision (so ulp-level differences of the matrix
    product cannot reorder equally near samples)."""
    if query.shape[1] == 0:
        return np.zeros((query.shape[0], pool.shape[0]), np.float64)
    if query.shape[1] <= 64:
        out = np.empty((query.shape[0], pool.shape[0]), np.float64)
        step = max(1, DISTANCE_ELEMENTS // max(1, pool.shape[0] * query.shape[1]))
        for s in range(0, query.shape[0], step):
            out[s:s + step] = ((query[s:s + step, None, :] - pool[None, :, :]) ** 2).sum(-1)
        return out
    d = (query**2).sum(1)[:, None] + (pool**2).sum(1)[None, :] - 2.0 * query @ pool.T
    return np.maximum(d, 0.0).astype(np.float32).astype(np.float64)


def nearest_neighbours(query_idx: np.ndarray, query_features: np.ndarray, pool_idx: np.ndarray,
                       pool_features: np.ndarray, members: int, seed: int, chunk: int = 4096) -> np.ndarray:
    """``[Q, members]`` store indices: for each query sample ``j`` the ``members`` pool samples
    nearest in condition space, excluding ``j``; ties in a random order keyed by (seed, ``j``).

    Streams over the pool in chunks of ``chunk`` samples, keeping the best ``members`` per
    query; the result does not depend on ``chunk`` (nor on which other samples are queried).
    """
    q = np.asarray(query_idx, np.int64).reshape(-1)
    p = np.asarray(pool_idx, np.int64).reshape(-1)
    best_d = np.full((q.size, members), np.inf)
    best_k = np.zeros((q.size, members), np.uint64)
    best_i = np.full((q.size, members), -1, np.int64)
    qkeys = query_keys(seed, q)
    for start in range(0, p.size, chunk):
        pi = p[start:start + chunk]
        d = _distances(query_features, pool_features[start:start + chunk])
        d[q[:, None] == pi[None, :]] = np.inf  # never a sample's own field
        k = tie_keys(seed, q, pi, qkeys)
        all_d = np.concatenate([best_d, d], axis=1)
        all_k = np.concatenate([best_k, k], axis=1)
        all_i = np.concatenate([best_i, np.broadcast_to(pi, d.shape)], axis=1)
        order = np.lexsort((all_k, all_d), axis=-1)[:, :members]
        best_d = np.take_along_axis(all_d, order, 1)
        best_k = np.take_along_axis(all_k, order, 1)
        best_i = np.take_along_axis(all_i, order, 1)
    if not np.all(np.isfinite(best_d)):
        row = int(np.flatnonzero(~np.isfinite(best_d).all(1))[0])
        raise ValueError(f"floor.pool: sample {int(q[row])} has fewer than {members} other samples in the pool "
                         f"({p.size} samples)")
    return best_i


class FloorEnsemble:
    """The floor ensembles of the evaluated samples: their neighbours, then their fields.

    Args:
        dm: the evaluation's data module (its split indices name the pool).
        reader: a dataset whose ``read_batch`` takes flat store indices.
        metadata: the checkpoint's metadata (conditional or not, the grid).
        indices: ``[N]`` flat store indices of every evaluated sample (all ranks).
        members: ``M``.
        settings: :class:`FloorSettings`.
        seed: the evaluation's seed (the random order of equally near samples).
    """

    def __init__(self, dm, reader, metadata, indices: np.ndarray, members: int, settings: FloorSettings,
                 seed: int) -> None:
        self.reader, self.members, self.pool = reader, int(members), settings.pool
        self.conditional = is_conditional(metadata)
        query = np.asarray(indices, np.int64).reshape(-1)
        pool = pool_indices(dm, settings.pool)
        others = pool.size - 1 if pool.size else 0  # at most one pool sample is the query itself
        if others < self.members:
            raise ValueError(
                f"floor.pool: the {settings.pool!r} pool has {pool.size} samples, too few for floor ensembles of "
                f"{self.members} other real fields (floor.pool=all, fewer members, or floor.enabled=false)"
            )
        uniq = np.unique(query)
        qf = condition_features(reader, uniq, metadata)
        if self.conditional:
            pf = condition_features(reader, pool, metadata)
        else:
            pf = np.zeros((pool.size, 0), np.float64)
        found = nearest_neighbours(uniq, qf, pool, pf, self.members, seed)
        self._row = {int(j): r for r, j in enumerate(uniq.tolist())}
        self._neighbours = found
        self.indices = found[[self._row[int(j)] for j in query]] if query.size else found[:0]
        self.pool_size = int(pool.size)

    def neighbours(self, store_idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """``[B, M]`` store indices of the floor ensembles of ``store_idx``."""
        return self._neighbours[[self._row[int(j)] for j in np.asarray(store_idx).reshape(-1)]]

    def read(self, store_idx: np.ndarray, x_transform, mask: Tensor | None,
             device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        """(members ``[B, M, C, *S]`` physical float64, the same normalised, the mask to score
        them with: the data ``mask`` times every member's mask, or None)."""
        idx = self.neighbours(store_idx)
        b, m = idx.shape
        batch = self.reader.read_batch(idx.reshape(-1))
        x = batch["x"].to(device)
        shape = (b, m, *x.shape[1:])
        model = x.to(torch.float64).reshape(shape)
        phys = x_transform.inverse(x.to(torch.float64)).reshape(shape)
        member_mask = batch.get("mask")
        if member_mask is not None:
            member_mask = member_mask.to(device).reshape(shape).prod(dim=1)
            mask = member_mask if mask is None else mask * member_mask
        return phys, model, mask

    def describe(self) -> str:
        how = ("nearest neighbours in normalised condition space" if self.conditional
               else "distinct random samples (unconditional model)")
        return f"{self.members} real fields per sample from the {self.pool!r} pool ({self.pool_size} samples): {how}, " \
               "the sample itself excluded"


def prefixed(scalars: dict[str, float]) -> dict[str, float]:
    """The floor's scalars as ``floor/<name>`` (``members`` is the model's, not repeated)."""
    return {f"floor/{k}": v for k, v in scalars.items() if k != "members"}


__all__ = [
    "POOLS",
    "FloorEnsemble",
    "FloorSettings",
    "condition_features",
    "is_conditional",
    "nearest_neighbours",
    "pool_indices",
    "prefixed",
    "query_keys",
    "tie_keys",
]

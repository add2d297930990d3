"""Ensembles: this rank's missing members of each parameter set, generated and written to an :class:`EnsembleStore`.

Reproducibility. Member ``k`` of parameter set ``j`` is a function of
``(checkpoint, parameters_j, condition fields_j, sampler, guidance, seed_jk)`` only:
``seed_jk = member_seed(base_seed, j, k)`` (:mod:`scidiff.inference.seeds`), so seeds do
not depend on how many sets or members the run has, nor on the order work is done in;
the member's own generator draws its x_T and every noise of the sampler.

Batched and bit-identical. The dense kernels of CPU (MKL/oneDNN) and GPU libraries choose
their blocking by the shape of a call, so a member computed in a batch of 8 differs from
the same member in a batch of 1 by ~1e-7 relative per call, amplified by the sampler. With
``batch_invariant=True`` (the default) the members, in flat order ``j * M + k``, are cut
into fixed micro-batches of ``micro_batch`` (:func:`rank_groups`); each is generated whole,
in full-size denoiser calls (the last one padded with copies of its last member), so every
member always has the same shape of call, the same neighbours and the same row in it,
whatever ``batch_size``, the number of ranks or a resumption: the bits are the same, at
batched throughput. ``micro_batch`` is recorded in the store's identity. With
``batch_invariant=False`` each loop of ``batch_size`` members is one call, and members agree
across batch sizes and ranks only to float32 rounding.

Distribution. Rank ``r`` of ``R`` (:class:`~scidiff.inference.runtime.DistContext`) takes
micro-batch ``g`` when ``g`` is ``r`` mod ``R`` (without ``batch_invariant``: the members
whose flat index is ``r`` mod ``R``), and writes their chunks itself; no data goes between
ranks.

Resumption. Members whose ``done`` flag is set are skipped; a member is flagged
only after its data is written (:meth:`EnsembleStore.write_members`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from scidiff.inference.generation import GuidanceSpec, Observations, Sampler, generate
from scidiff.inference.runtime import DistContext
from scidiff.sampling.grid import ParameterSets
from scidiff.sampling.store import EnsembleStore

@dataclass(frozen=True)
class FieldConditions:
    """Spatial condition fields in *model* units for the ``N`` samples of a run.

    ``fields`` is ``[Nc, Cf, *S]`` (one row per condition input, see
    :mod:`scidiff.sampling.conditions`) and ``index[j]`` the row sample ``j`` uses, so
    a parameter grid crossed with the inputs does not copy the fields.
    """

    fields: Tensor
    index: np.ndarray  # [N] int64

    def __post_init__(self) -> None:
        if self.fields.ndim < 3:
            raise ValueError(f"fields must be [Nc, Cf, *S], got shape {tuple(self.fields.shape)}")
        if self.index.size and (self.index.min() < 0 or self.index.max() >= self.fields.shape[0]):
            raise ValueError(f"index must lie in [0, {self.fields.shape[0]})")

    def take(self, samples: Sequence[int]) -> Tensor:
        """``[b, Cf, *S]`` for members of the given samples."""
        return self.fields[torch.as_tensor(self.index[list(samples)], dtype=torch.long)]


# ------------------------------------------------------------------------- run
@dataclass(frozen=True)
class EnsembleResult:
    """Counts over all ranks: members ``written`` now, ``skipped`` (already done),
    ``seconds`` of generation (the slowest rank), ``members_per_s`` = written / seconds."""

    written: int
    skipped: int
    seconds: float
    world_size: int = 1

    @property
    def members_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else float("nan")


def rank_members(num_samples: int, num_members: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """The ``(sample, member)`` pairs of ``rank``: flat index ``j * M + k`` congruent to rank mod R."""
    return [divmod(i, num_members) for i in range(rank, num_samples * num_members, world_size)]


def rank_groups(num_samples: int, num_members: int, micro_batch: int, rank: int,
                world_size: int) -> list[list[tuple[int, int]]]:
    """The micro-batches of ``rank``: the members in flat order ``j * M + k`` cut into fixed
    groups of ``micro_batch`` (the last one shorter), group ``g`` to rank ``g mod R``.

    >>> rank_groups(2, 3, 4, 0, 1)
    [[(0, 0), (0, 1), (0, 2), (1, 0)], [(1, 1), (1, 2)]]
    """
    total = num_samples * num_members
    starts = range(0, total, micro_batch)
    return [[divmod(i, num_members) for i in range(a, min(a + micro_batch, total))]
            for g, a in enumerate(starts) if g % world_size == rank]


def run_ensemble(
    pretrained,
    store: EnsembleStore,
    sets: ParameterSets,
    seeds: np.ndarray,
    *,
    sampler: Sampler,
    guidance: GuidanceSpec,
    observations: Observations | None = None,
    fields: FieldConditions | None = None,
    batch_size: int = 8,
    batch_invariant: bool = True,
    micro_batch: int = 16,
    device: torch.device | str = "cpu",
    dist_ctx: DistContext | None = None,
    progress: bool = True,
    on_batch: Callable[[list[tuple[int, int]]], None] | None = None,
) -> EnsembleResult:
    """Generate this rank's members that are not done yet and write them to ``store``.

    Args:
        sets: the ``N`` parameter sets (physical units, the checkpoint's order).
        seeds: ``[N, M]`` member seeds (as stored in the store's ``seed``).
        fields: the condition fields of the ``N`` samples (model units), or ``None``.
        batch_invariant: generate fixed micro-batches (the module docstring): members are
            bit-identical for any ``batch_size`` and number of ranks.
        micro_batch: members per denoiser call with ``batch_invariant`` (part of what
            determines the members' values).
        batch_size: members written at a time (with ``batch_invariant``, rounded up to
            whole micro-batches), and per denoiser call without it.
        on_batch: called with each written batch's ``(sample, member)`` pairs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    if micro_batch < 1:
        raise ValueError(f"micro_batch: expected a positive integer, got {micro_batch}")
    ctx = dist_ctx or DistContext()
    n, m = seeds.shape
    if (n, m) != (store.num_samples, store.num_members) or n != len(sets):
        raise ValueError(f"store {store.path} is {store.num_samples} x {store.num_members}, seeds {seeds.shape}, "
                         f"{len(sets)} parameter sets")
    if fields is not None and fields.index.shape != (n,):
        raise ValueError(f"fields.index has shape {fields.index.shape} for {n} samples")
    done = store.done()
    if batch_invariant:  # whole micro-batches that still miss a member, written a few at a time
        groups = rank_groups(n, m, micro_batch, ctx.rank, ctx.world_size)
        mine = [jk for g in groups for jk in g]
        pending = [g for g in groups if not all(done[j, k] for j, k in g)]
        per_write = max(1, -(-batch_size // micro_batch))
        units = [pending[i:i + per_write] for i in range(0, len(pending), per_write)]
    else:  # this rank's missing members, batch_size at a time
        mine = rank_members(n, m, ctx.rank, ctx.world_size)
        todo = [(j, k) for j, k in mine if not done[j, k]]
        units = [[todo[i:i + batch_size]] for i in range(0, len(todo), batch_size)]
    todo_count = sum(1 for unit in units for g in unit for j, k in g if not done[j, k])
    skipped = len(mine) - todo_count
    params_all = torch.as_tensor(sets.values, dtype=torch.float64)
    bar = None
    if progress and ctx.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=skipped, unit="member", desc="members" if not ctx.active
                   else f"members (rank 0 of {ctx.world_size})", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for unit in units:
            batch, values = [], []
            for group in unit:
                # a micro-batch is always generated whole, padded to micro_batch rows with copies of
                # its last member, so every denoiser call has the same shape and the same neighbours
                rows = group + [group[-1]] * ((micro_batch - len(group)) if batch_invariant else 0)
                js = [j for j, _ in rows]
                params = params_all[js] if sets.values.shape[1] > 0 else None
                x = generate(pretrained, params, [int(seeds[j, k]) for j, k in rows], sampler=sampler,
                             guidance=guidance, observations=None if observations is None else observations.take(js),
                             fields=None if fields is None else fields.take(js), device=device)
                keep = [i for i, (j, k) in enumerate(group) if not done[j, k]]
                batch += [group[i] for i in keep]
                values.append(x[keep])
            store.write_members([j for j, _ in batch], [k for _, k in batch], torch.cat(values).numpy())
            if on_batch is not None:
                on_batch(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    seconds = ctx.max(time.perf_counter() - t0)
    written, skipped_all = ctx.sum([todo_count, skipped])
    return EnsembleResult(written=int(written), skipped=int(skipped_all), seconds=seconds,
                          world_size=ctx.world_size)


__all__ = ["EnsembleResult", "FieldConditions", "rank_groups", "rank_members", "run_ensemble"]

"""Ensembles: this rank's missing members of each parameter set, generated and written to an :class:`EnsembleStore`.

Reproducibility. Member ``k`` of parameter set ``j`` is a function of
``(checkpoint, parameters_j, condition fields_j, sampler, guidance, seed_jk)`` only:
``seed_jk = member_seed(base_seed, j, k)`` (:mod:`scidiff.inference.seeds`), so seeds do
not depend on how many sets or members the run has, nor on the order work is done in;
the member's own generator draws its x_T and every noise of the sampler, and with
``batch_invariant=True`` (the default) its values do not depend on the batch either
(:mod:`scidiff.inference.generation`). ``batch_invariant=False`` evaluates each batch in
one call -- about 2x the throughput of the tiny CPU model, more on GPUs -- and members
then agree across batch sizes and ranks only to float32 rounding (relative ~1e-6 per
step, amplified by the sampler; a test bounds it).

Distribution. Rank ``r`` of ``R`` (:class:`~scidiff.inference.runtime.DistContext`) takes
the members whose flat index ``j * M + k`` is ``r`` mod ``R``, and writes their chunks
itself; no data goes between ranks.

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
        batch_size: members per sampling loop (and per write); does not change the
            members with ``batch_invariant`` (see the module docstring).
        on_batch: called with each written batch's ``(sample, member)`` pairs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    ctx = dist_ctx or DistContext()
    n, m = seeds.shape
    if (n, m) != (store.num_samples, store.num_members) or n != len(sets):
        raise ValueError(f"store {store.path} is {store.num_samples} x {store.num_members}, seeds {seeds.shape}, "
                         f"{len(sets)} parameter sets")
    if fields is not None and fields.index.shape != (n,):
        raise ValueError(f"fields.index has shape {fields.index.shape} for {n} samples")
    mine = rank_members(n, m, ctx.rank, ctx.world_size)
    done = store.done()
    todo = [(j, k) for j, k in mine if not done[j, k]]
    skipped = len(mine) - len(todo)
    params_all = torch.as_tensor(sets.values, dtype=torch.float64)
    bar = None
    if progress and ctx.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=skipped, unit="member", desc="members" if not ctx.active
                   else f"members (rank 0 of {ctx.world_size})", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            js = [j for j, _ in batch]
            params = params_all[js] if sets.values.shape[1] > 0 else None
            x = generate(pretrained, params, [int(seeds[j, k]) for j, k in batch], sampler=sampler,
                         guidance=guidance, observations=None if observations is None else observations.take(js),
                         fields=None if fields is None else fields.take(js),
                         batch_invariant=batch_invariant, device=device)
            store.write_members(js, [k for _, k in batch], x.numpy())
            if on_batch is not None:
                on_batch(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    seconds = ctx.max(time.perf_counter() - t0)
    written, skipped_all = ctx.sum([len(todo), skipped])
    return EnsembleResult(written=int(written), skipped=int(skipped_all), seconds=seconds,
                          world_size=ctx.world_size)


__all__ = ["EnsembleResult", "FieldConditions", "rank_members", "run_ensemble"]

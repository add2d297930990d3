"""Ensemble generation: members for each parameter set, written to an :class:`EnsembleStore`.

Reproducibility. Member ``k`` of parameter set ``j`` is a function of
``(checkpoint, parameters_j, condition fields_j, sampler, guidance, seed_jk)`` only:

* ``seed_jk = member_seed(base_seed, j, k)`` (numpy ``SeedSequence`` of
  ``(base_seed, j, k)``), so seeds do not depend on how many sets or members the
  run has, nor on the order work is done in;
* the member's own CPU ``torch.Generator`` seeded with ``seed_jk`` draws its x_T
  and then every noise of the sampler (the samplers take a list of generators,
  one per sample);
* with ``batch_invariant=True`` (the default) the denoiser is evaluated one member
  at a time (:class:`PerMember`): a member's guided pair (conditional and null
  condition) is always one call of batch 2, whatever batch, rank or resumed run
  it is generated in. The dense kernels of CPU (MKL/oneDNN) and GPU libraries
  choose blockings by batch size, so a batched call is *not* bit-for-bit batch
  invariant: on CPU a ``Linear`` or ``Conv2d`` row differs by ~1e-7 between
  batch 1 and batch 8. Everything else in a sampling step is elementwise (or a
  per-sample reduction inside the per-member call), hence the same bits.
  ``batch_invariant=False`` evaluates each batch in one call -- about 2x the
  throughput of the tiny CPU model, more on GPUs -- and members then agree across
  batch sizes and ranks only to float32 rounding (relative ~1e-6 per step,
  amplified by the sampler; a test bounds it), and a resumed run can differ from
  an uninterrupted one at that level.

Distribution. With ``torch.distributed`` initialised (or ``RANK``/``WORLD_SIZE``
set by torchrun, see :func:`distributed_context`), rank ``r`` of ``R`` takes the
members whose flat index ``j * M + k`` is ``r`` mod ``R``, and writes their
chunks itself; no data goes between ranks.

Resumption. Members whose ``done`` flag is set are skipped; a member is flagged
only after its data is written (:meth:`EnsembleStore.write_members`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.diffusion import samplers
from scidiff.diffusion.guidance import ClassifierFreeGuidance
from scidiff.sampling.grid import ParameterSets
from scidiff.sampling.store import EnsembleStore

SamplerName = Literal["ddpm", "ddim"]
ObservationMethod = Literal["repaint", "dps"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
OBSERVATION_METHODS: tuple[str, ...] = get_args(ObservationMethod)


# ------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class SamplerSpec:
    """Which reverse process: ``ddpm`` (all T steps) or ``ddim`` (``steps``, ``eta``, ``spacing``)."""

    name: SamplerName = "ddim"
    steps: int = 50
    eta: float = 0.0
    spacing: samplers.Spacing = "leading"

    def __post_init__(self) -> None:
        if self.name not in SAMPLER_NAMES:
            raise ValueError(f"sampler.name: unknown sampler {self.name!r}; expected one of {SAMPLER_NAMES}")
        if self.spacing not in samplers.SPACINGS:
            raise ValueError(f"sampler.spacing: unknown value {self.spacing!r}; expected one of {samplers.SPACINGS}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler.steps: expected a positive integer, got {self.steps!r}")
        if not self.eta >= 0:
            raise ValueError(f"sampler.eta: expected >= 0, got {self.eta!r}")


@dataclass(frozen=True)
class GuidanceSpec:
    """Classifier-free guidance: scale w (0 unconditional, 1 conditional, > 1 guided), rescale phi."""

    scale: float = 1.0
    rescale: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale):
            raise ValueError(f"guidance.scale: expected a finite number, got {self.scale!r}")
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"guidance.rescale: expected a value in [0, 1], got {self.rescale!r}")


@dataclass(frozen=True)
class Observations:
    """Sparse observations in *model* units for inpainting (RePaint or DPS).

    ``observed`` and ``mask`` are ``[1 or N, C, *S]`` (one map for all parameter
    sets, or one per set); ``mask`` is 1 where observed. ``options`` are passed to
    the method (``num_steps``, ``jump_length``, ``resample`` / ``num_steps``,
    ``step_size``).
    """

    observed: Tensor
    mask: Tensor
    method: ObservationMethod
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in OBSERVATION_METHODS:
            raise ValueError(f"observations.method: unknown method {self.method!r}; expected one of "
                             f"{OBSERVATION_METHODS}")
        if self.observed.shape != self.mask.shape:
            raise ValueError(f"observations: values {tuple(self.observed.shape)} and mask "
                             f"{tuple(self.mask.shape)} differ in shape")

    def take(self, samples: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(observed, mask)`` ``[b, C, *S]`` for members of the given parameter sets."""
        idx = torch.as_tensor([0 if self.observed.shape[0] == 1 else j for j in samples], dtype=torch.long)
        return self.observed[idx], self.mask[idx]


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


# ------------------------------------------------------------------------ seeds
def member_seed(base_seed: int, sample: int, member: int) -> int:
    """The seed of member ``member`` of parameter set ``sample``: a 63-bit integer from
    numpy's ``SeedSequence((base_seed, sample, member))`` (independent streams for any
    two distinct triples, whatever the run's size)."""
    if min(base_seed, sample, member) < 0:
        raise ValueError(f"seeds need non-negative (base_seed, sample, member), got {(base_seed, sample, member)}")
    state = np.random.SeedSequence((int(base_seed), int(sample), int(member))).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def member_seeds(base_seed: int, num_samples: int, num_members: int) -> np.ndarray:
    """``[N, M]`` int64 of :func:`member_seed`."""
    return np.array([[member_seed(base_seed, j, k) for k in range(num_members)] for j in range(num_samples)],
                    dtype=np.int64)


def member_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per member (CPU, so the numbers do not depend on the device)."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


# --------------------------------------------------------------------- denoiser
class PerMember(nn.Module):
    """A denoiser evaluated one sample at a time, so every sample's output is
    bit-for-bit independent of the batch it is in (see the module docstring)."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None) -> Tensor:
        outs = []
        for i in range(x.shape[0]):
            ci = None if cond is None else cond.map(lambda v, i=i: v[i:i + 1])
            outs.append(self.denoiser(x[i:i + 1], t[i:i + 1], ci))
        return torch.cat(outs)


def guided_denoiser(denoiser: nn.Module, guidance: GuidanceSpec, conditional: bool,
                    batch_invariant: bool = True) -> nn.Module:
    """The denoiser the sampler calls: classifier-free guided when the model is
    conditional, wrapped in :class:`PerMember` when ``batch_invariant``."""
    den = ClassifierFreeGuidance(denoiser, scale=guidance.scale, rescale=guidance.rescale) if conditional else denoiser
    return PerMember(den) if batch_invariant else den


def generate(
    pretrained,
    params: Tensor | None,
    seeds: Sequence[int],
    *,
    sampler: SamplerSpec,
    guidance: GuidanceSpec,
    observations: tuple[Tensor, Tensor, Observations] | None = None,
    fields: Tensor | None = None,
    batch_invariant: bool = True,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Generate ``b = len(seeds)`` members, in *physical* units, ``[b, C, *S]`` float32 on CPU.

    Args:
        pretrained: a :class:`scidiff.training.pretrained.Pretrained` (on ``device``).
        params: physical parameters ``[b, P]`` in the order of ``pretrained.param_names``;
            ``None`` for an unconditional model.
        seeds: one seed per member (:func:`member_seed`).
        observations: ``(observed, mask, spec)`` with ``[b, C, *S]`` tensors in model
            units, for inpainting; ``None`` for free generation.
        fields: condition fields ``[b, Cf, *S]`` in model units (:class:`FieldConditions`);
            ``None`` for a model without field conditioning. Guidance's null condition
            drops them with the parameters (``Conditioning.drop``).
    """
    device = torch.device(device)
    gens = member_generators(seeds)
    shape = pretrained.sample_shape
    # x_T ~ N(0, I), each member from its own generator, drawn first.
    x_T = torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(device)
    cond = None
    model_params = None
    if params is not None and params.shape[1] > 0:
        model_params = pretrained.params_to_model(params.to(torch.float64)).to(device, torch.float32)
    if fields is not None and fields.shape[0] != len(gens):
        raise ValueError(f"fields has {fields.shape[0]} rows for {len(gens)} members")
    if model_params is not None or fields is not None:
        cond = Conditioning(params=model_params,
                            fields=None if fields is None else fields.to(device, torch.float32))
    den = guided_denoiser(pretrained.denoiser, guidance, cond is not None, batch_invariant)
    diffusion = pretrained.diffusion
    if observations is not None:
        observed, mask, spec = observations
        from scidiff.diffusion import inpainting  # lands with issue #6 item 3

        method = inpainting.repaint_sample if spec.method == "repaint" else inpainting.dps_sample
        x0 = method(den, diffusion, x_T, observed.to(device), mask.to(device), cond=cond, generator=gens,
                    **dict(spec.options))
    elif sampler.name == "ddpm":
        x0 = samplers.ddpm_sample(den, diffusion, x_T, cond=cond, generator=gens)
    else:
        x0 = samplers.ddim_sample(den, diffusion, x_T, num_steps=sampler.steps, eta=sampler.eta,
                                  spacing=sampler.spacing, cond=cond, generator=gens)
    with torch.no_grad():
        return pretrained.to_physical(x0.detach()).to("cpu", torch.float32)


# ------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    initialized_here: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().tolist()

    def max(self, value: float) -> float:
        if not self.active:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def close(self) -> None:
        if self.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def distributed_context(device: torch.device | str = "cpu") -> DistContext:
    """Rank and world size: from an initialised process group, else from torchrun's
    ``RANK``/``WORLD_SIZE`` (the group is then initialised here, ``nccl`` on CUDA,
    ``gloo`` otherwise), else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    return DistContext(dist.get_rank(), dist.get_world_size(), True)


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
    sampler: SamplerSpec,
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
            obs = None
            if observations is not None:
                observed, mask = observations.take(js)
                obs = (observed, mask, observations)
            x = generate(pretrained, params, [int(seeds[j, k]) for j, k in batch], sampler=sampler,
                         guidance=guidance, observations=obs, fields=None if fields is None else fields.take(js),
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


__all__ = [
    "DistContext",
    "EnsembleResult",
    "FieldConditions",
    "GuidanceSpec",
    "Observations",
    "PerMember",
    "SamplerSpec",
    "distributed_context",
    "generate",
    "guided_denoiser",
    "member_generators",
    "member_seed",
    "member_seeds",
    "rank_members",
    "run_ensemble",
]

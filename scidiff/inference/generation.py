"""The one generation path: sampler spec -> guided denoiser -> sampler -> physical units.

Every command that generates fields from a trained model goes through here:
``scidiff-sample`` (ensembles), ``scidiff-evaluate`` (the members it scores),
``scidiff-invert`` (inversion and regeneration) and the training's sample figures.
New samplers, adapters or latent decoders plug in at this one place.

* A **sampler** is a small frozen dataclass (:class:`DDIM`, :class:`DDPM`) that checks
  its own settings, knows how it is recorded (:meth:`Sampler.identity`) and runs the
  stateless sampler of :mod:`scidiff.diffusion.samplers`. Configs choose one with
  ``_target_`` (``configs/sampler/<name>.yaml``).
* **Guidance** (:class:`GuidanceSpec`): classifier-free guidance scale and rescale; the
  denoiser a sampler calls is :func:`guided_denoiser` of the model's own.
* :func:`sample_model` runs a sampler from given ``x_T`` in model units, and
  :func:`invert_model` maps fields back to the ``x_T`` deterministic DDIM turns into them;
  :func:`generate` draws ``x_T`` from per-member seeds and returns physical units.

Reproducibility. Each member has its own CPU generator (:mod:`scidiff.inference.seeds`):
it draws the member's x_T and then every noise of the sampler, so a member's values depend
on its batch only through the dense kernels' shape-dependent rounding;
:mod:`scidiff.sampling.ensemble` removes that with fixed micro-batches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.diffusion import GaussianDiffusion, grids, inpainting, samplers
from scidiff.diffusion.guidance import ClassifierFreeGuidance
from scidiff.inference.seeds import member_generators
from scidiff.inference.specs import settings_of, target_class


# ---------------------------------------------------------------------------- samplers
@dataclass(frozen=True)
class Sampler:
    """A reverse process; subclasses set ``name`` and implement :meth:`run`."""

    name: ClassVar[str] = ""

    def identity(self) -> dict[str, Any]:
        """What determines the samples (recorded in ensemble stores and evaluations)."""
        return {"name": self.name}

    def describe(self) -> str:
        return self.name

    def check(self, diffusion: GaussianDiffusion) -> None:
        """Raise ``ValueError`` (naming the ``sampler.*`` key) when the sampler cannot run on ``diffusion``."""

    def run(self, denoiser: nn.Module, diffusion: GaussianDiffusion, x_T: Tensor, cond: Conditioning | None,
            generator: Any) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class DDPM(Sampler):
    """Ancestral DDPM sampling over all T steps, with the model's reverse variance."""

    name: ClassVar[str] = "ddpm"

    def describe(self) -> str:
        return "DDPM (ancestral, all T steps)"

    def run(self, denoiser, diffusion, x_T, cond, generator):
        return samplers.ddpm_sample(denoiser, diffusion, x_T, cond=cond, generator=generator)


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}: expected a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class GridSampler(Sampler):
    """A sampler on a timestep grid (:mod:`scidiff.diffusion.grids`): ``steps`` grid points
    placed by ``spacing`` (``leading``, ``trailing``, ``linspace``, ``logsnr``, ``karras``
    with ``rho`` and ``sigma_max``), or the grid itself as ``timesteps`` (a strictly decreasing list in [0, T),
    which then replaces ``steps`` and ``spacing``)."""

    steps: int = 50
    spacing: str = "leading"
    rho: float = 7.0
    sigma_max: float = grids.KARRAS_SIGMA_MAX
    timesteps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _positive_int("sampler.steps", self.steps)
        if self.spacing not in grids.GRID_KINDS:
            raise ValueError(f"sampler.spacing: unknown value {self.spacing!r}; expected one of {grids.GRID_KINDS}")
        if not (isinstance(self.rho, (int, float)) and not isinstance(self.rho, bool) and self.rho > 0):
            raise ValueError(f"sampler.rho: expected a number > 0, got {self.rho!r}")
        if not (isinstance(self.sigma_max, (int, float)) and not isinstance(self.sigma_max, bool)
                and self.sigma_max > 0):
            raise ValueError(f"sampler.sigma_max: expected a number > 0, got {self.sigma_max!r}")
        if self.timesteps is not None:
            if isinstance(self.timesteps, (str, bytes)) or not isinstance(self.timesteps, Sequence):
                raise ValueError(f"sampler.timesteps: expected a list of timesteps, got {self.timesteps!r}")
            object.__setattr__(self, "timesteps", tuple(self.timesteps))
            grids.check_grid(list(self.timesteps), 2**62, "sampler.timesteps")  # order and type; T in check()

    def grid(self, diffusion: GaussianDiffusion) -> Tensor:
        """The timesteps this sampler visits on ``diffusion``'s schedule."""
        key = "sampler.timesteps" if self.timesteps is not None else "sampler.steps"
        if self.timesteps is not None:
            return grids.check_grid(list(self.timesteps), diffusion.num_timesteps, key)
        if self.steps > diffusion.num_timesteps:
            raise ValueError(f"{key}: {self.steps} exceeds the model's T = {diffusion.num_timesteps}")
        return grids.timestep_grid(diffusion, self.steps, self.spacing, rho=self.rho, sigma_max=self.sigma_max)

    def check(self, diffusion: GaussianDiffusion) -> None:
        self.grid(diffusion)

    def _grid_identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self.steps, "spacing": self.spacing}
        if self.spacing == "karras":
            out["rho"] = float(self.rho)
            out["sigma_max"] = float(self.sigma_max)
        if self.timesteps is not None:
            out = {"timesteps": list(self.timesteps)}
        return out

    def _grid_text(self) -> str:
        if self.timesteps is not None:
            return f"{len(self.timesteps)} given timesteps"
        karras = f", rho {self.rho:g}, sigma_max {self.sigma_max:g}" if self.spacing == "karras" else ""
        return f"{self.steps} steps ({self.spacing}{karras})"

    def _grid_kwargs(self) -> dict[str, Any]:
        return {"num_steps": self.steps, "spacing": self.spacing, "rho": self.rho, "sigma_max": self.sigma_max,
                "timesteps": None if self.timesteps is None else list(self.timesteps)}


@dataclass(frozen=True, kw_only=True)
class DDIM(GridSampler):
    """DDIM: one model call per grid point; noise ``eta`` (0: deterministic, the
    probability-flow ODE's first-order exponential integrator; 1: DDPM's variance on the
    skipped chain)."""

    name: ClassVar[str] = "ddim"
    steps: int = 50
    eta: float = 0.0
    spacing: str = "leading"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.eta, (int, float)) and not isinstance(self.eta, bool) and self.eta >= 0):
            raise ValueError(f"sampler.eta: expected >= 0, got {self.eta!r}")

    def identity(self) -> dict[str, Any]:
        grid = self._grid_identity()
        if "timesteps" in grid:
            return {"name": self.name, "eta": float(self.eta), **grid}
        return {"name": self.name, "steps": self.steps, "eta": float(self.eta), **{k: v for k, v in grid.items()
                                                                                      if k != "steps"}}

    def describe(self) -> str:
        return f"DDIM {self._grid_text()}, eta {self.eta}"

    def run(self, denoiser, diffusion, x_T, cond, generator):
        return samplers.ddim_sample(denoiser, diffusion, x_T, eta=self.eta, cond=cond, generator=generator,
                                    **self._grid_kwargs())


def _check_multistep_order(spec: GridSampler, orders: tuple[int, ...]) -> tuple[int, str]:
    """A multistep solver's ``order`` is one of ``orders`` and its grid has at least that many
    points (one model call each); returns the calls and the key that sets them."""
    order = spec.order  # type: ignore[attr-defined]
    if order not in orders or isinstance(order, bool):
        raise ValueError(f"sampler.order: expected {', '.join(map(str, orders[:-1]))} or {orders[-1]}, got {order!r}")
    if spec.timesteps is not None:
        calls, key = len(spec.timesteps), "sampler.timesteps"
    else:
        calls, key = spec.steps, "sampler.steps"
    if calls < order:
        raise ValueError(f"{key}: {calls} model calls are fewer than the solver's order {order}")
    return calls, key


@dataclass(frozen=True, kw_only=True)
class DPMSolver(GridSampler):
    """DPM-Solver++ multistep (Lu et al. 2022): one model call per grid point, ``order`` 1-3
    (1 is DDIM); ``stochastic`` for SDE-DPM-Solver++ (order 1-2)."""

    name: ClassVar[str] = "dpm_solver"
    steps: int = 20
    spacing: str = "logsnr"
    order: int = 2
    stochastic: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.stochastic, bool):
            raise ValueError(f"sampler.stochastic: expected true or false, got {self.stochastic!r}")
        _check_multistep_order(self, samplers.DPM_SOLVER_ORDERS)
        if self.stochastic and self.order == 3:
            raise ValueError("sampler.order: the stochastic DPM-Solver++ takes order 1 or 2, got 3")

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "order": self.order, "stochastic": self.stochastic, **self._grid_identity()}

    def describe(self) -> str:
        return f"DPM-Solver++ ({'SDE ' if self.stochastic else ''}{self.order}M) {self._grid_text()}"

    def run(self, denoiser, diffusion, x_T, cond, generator):
        return samplers.dpm_solver_sample(denoiser, diffusion, x_T, cond=cond, generator=generator, order=self.order,
                                          stochastic=self.stochastic, **self._grid_kwargs())


UNIPC_ORDER3_MIN_CALLS = 15  # docs/benchmarks/sampler-quality.md, "Resolved modes"; sampler-quickstart.md


@dataclass(frozen=True, kw_only=True)
class UniPC(GridSampler):
    """UniPC (Zhao et al. 2023): the DPM-Solver++ multistep predictor of ``order`` 1-3 with a
    corrector that reuses the next grid point's model call: one call per grid point, one
    order of accuracy more than the predictor alone."""

    name: ClassVar[str] = "unipc"
    steps: int = 20
    spacing: str = "logsnr"
    order: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        calls, key = _check_multistep_order(self, samplers.UNIPC_ORDERS)
        if self.order == 3 and calls < UNIPC_ORDER3_MIN_CALLS:
            warnings.warn(f"{key}: UniPC of order 3 at {calls} model calls overshoots (with the exact denoiser on "
                          "the cosine schedule, modes of std 0.1-10 come out with up to 34 % too much variance at 12 "
                          f"calls, 62 % at 10); below {UNIPC_ORDER3_MIN_CALLS} calls use sampler.order=2", stacklevel=2)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "order": self.order, **self._grid_identity()}

    def describe(self) -> str:
        return f"UniPC ({self.order}) {self._grid_text()}"

    def run(self, denoiser, diffusion, x_T, cond, generator):
        return samplers.unipc_sample(denoiser, diffusion, x_T, cond=cond, generator=generator, order=self.order,
                                     **self._grid_kwargs())


@dataclass(frozen=True, kw_only=True)
class Heun(GridSampler):
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022): two model
    calls per step (one for the last step and for steps above ``max_sigma``)."""

    name: ClassVar[str] = "heun"
    steps: int = 18
    spacing: str = "trailing"
    max_sigma: float = 80.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.max_sigma, (int, float)) and not isinstance(self.max_sigma, bool)
                and self.max_sigma > 0):
            raise ValueError(f"sampler.max_sigma: expected a number > 0, got {self.max_sigma!r}")

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "max_sigma": float(self.max_sigma), **self._grid_identity()}

    def describe(self) -> str:
        return f"Heun {self._grid_text()}"

    def run(self, denoiser, diffusion, x_T, cond, generator):
        return samplers.heun_sample(denoiser, diffusion, x_T, cond=cond, generator=generator,
                                    max_sigma=self.max_sigma, **self._grid_kwargs())


SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (DDIM, DDPM, DPMSolver, UniPC, Heun)}


def as_sampler(node: Sampler | Mapping[str, Any]) -> Sampler:
    """A :class:`Sampler` from a config node: ``{_target_: scidiff.inference.DDIM, steps: 50, ...}``
    (``configs/sampler/<name>.yaml``), ``{name: ddim, steps: 50}`` (Python), or a sampler.

    >>> as_sampler({"_target_": "scidiff.inference.DDIM", "steps": 20}).describe()
    'DDIM 20 steps (leading), eta 0.0'
    >>> as_sampler({"name": "dpm_solver", "order": 3}).describe()
    'DPM-Solver++ (3M) 20 steps (logsnr)'
    """
    if isinstance(node, Sampler):
        return node
    if not isinstance(node, Mapping):
        raise ValueError(f"sampler: expected a sampler config (sampler=ddim | ddpm), got {node!r}")
    spec = dict(node)
    target = spec.pop("_target_", None)
    if target is not None:
        cls = target_class(target, Sampler, "sampler", "scidiff.inference.DDIM")
    else:
        name = spec.pop("name", "ddim")
        if name not in SAMPLERS:
            raise ValueError(f"sampler.name: unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
        cls = SAMPLERS[name]
    return cls(**settings_of(cls, spec, "sampler"))


def sampler_from_identity(identity: Mapping[str, Any]) -> Sampler:
    """The sampler an :meth:`Sampler.identity` describes."""
    spec = dict(identity)
    name = spec.pop("name", None)
    if name not in SAMPLERS:
        raise ValueError(f"sampler.name: unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](**spec)


# ---------------------------------------------------------------------------- guidance
@dataclass(frozen=True)
class GuidanceSpec:
    """Classifier-free guidance: scale w (0 unconditional, 1 conditional, > 1 guided), rescale phi in [0, 1]."""

    scale: float = 1.0
    rescale: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise ValueError(f"guidance.scale: expected a finite number, got {self.scale!r}")
        if not (isinstance(self.rescale, (int, float)) and 0.0 <= self.rescale <= 1.0):
            raise ValueError(f"guidance.rescale: expected a value in [0, 1], got {self.rescale!r}")

    @property
    def active(self) -> bool:
        """Whether guidance changes anything (``scale != 1`` or ``rescale != 0``)."""
        return self.scale != 1.0 or self.rescale != 0.0

    def identity(self) -> dict[str, float]:
        return {"scale": float(self.scale), "rescale": float(self.rescale)}


def as_guidance(node: GuidanceSpec | Mapping[str, Any] | None) -> GuidanceSpec:
    """A :class:`GuidanceSpec` from a config node ``{scale: 2.0, rescale: 0.7}`` (``None``: no guidance)."""
    if node is None or isinstance(node, GuidanceSpec):
        return node or GuidanceSpec()
    if not isinstance(node, Mapping):
        raise ValueError(f"guidance: expected {{scale: w, rescale: phi}}, got {node!r}")
    return GuidanceSpec(**settings_of(GuidanceSpec, node, "guidance"))


def guided_denoiser(denoiser: nn.Module, guidance: GuidanceSpec, conditional: bool) -> nn.Module:
    """The denoiser a sampler calls: classifier-free guided when the model is conditional
    (a no-op at scale 1, rescale 0); both halves of a guided step are one batched call."""
    if not conditional:
        return denoiser
    return ClassifierFreeGuidance(denoiser, scale=guidance.scale, rescale=guidance.rescale)


# ------------------------------------------------------------------------ observations
@dataclass(frozen=True)
class ObservationMethod:
    """How sparse observations steer a sampler (inpainting); subclasses set ``name``."""

    name: ClassVar[str] = ""

    def run(self, denoiser, diffusion, x_T, observed, mask, cond, generator, spacing) -> Tensor:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True)
class RePaint(ObservationMethod):
    """RePaint (Lugmayr et al. 2022): ``num_steps`` levels (None: all T), jumps back of
    ``jump_length`` states, ``resample`` descents per segment
    (:func:`scidiff.diffusion.inpainting.repaint_sample`)."""

    name: ClassVar[str] = "repaint"
    num_steps: int | None = None
    jump_length: int = 10
    resample: int = 10

    def __post_init__(self) -> None:
        for key in ("jump_length", "resample") + (("num_steps",) if self.num_steps is not None else ()):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"observations.{key}: expected a positive integer, got {value!r}")

    def run(self, denoiser, diffusion, x_T, observed, mask, cond, generator, spacing):
        return inpainting.repaint_sample(denoiser, diffusion, x_T, observed, mask, cond=cond, generator=generator,
                                         num_steps=self.num_steps, jump_length=self.jump_length,
                                         resample=self.resample, spacing=spacing)


@dataclass(frozen=True)
class DPS(ObservationMethod):
    """Diffusion posterior sampling (Chung et al. 2023) over ``num_steps`` skipped steps with
    normalised gradient steps ``step_size`` (:func:`scidiff.diffusion.inpainting.dps_sample`)."""

    name: ClassVar[str] = "dps"
    num_steps: int | None = 50
    step_size: float = 1.0

    def __post_init__(self) -> None:
        if self.num_steps is not None and (isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int)
                                           or self.num_steps < 1):
            raise ValueError(f"observations.num_steps: expected a positive integer, got {self.num_steps!r}")
        if not (isinstance(self.step_size, (int, float)) and self.step_size > 0):
            raise ValueError(f"observations.step_size: expected a number > 0, got {self.step_size!r}")

    def run(self, denoiser, diffusion, x_T, observed, mask, cond, generator, spacing):
        return inpainting.dps_sample(denoiser, diffusion, x_T, observed, mask, cond=cond, generator=generator,
                                     num_steps=self.num_steps, step_size=self.step_size, spacing=spacing)


OBSERVATION_METHODS: dict[str, type[ObservationMethod]] = {cls.name: cls for cls in (RePaint, DPS)}


def as_observation_method(node: ObservationMethod | Mapping[str, Any]) -> ObservationMethod:
    """An :class:`ObservationMethod` from ``{method: repaint, num_steps: 50, ...}`` (unset options:
    ``None``, the method's default) or a method object."""
    if isinstance(node, ObservationMethod):
        return node
    spec = {k: v for k, v in dict(node).items() if v is not None}
    name = spec.pop("method", "repaint")
    if name not in OBSERVATION_METHODS:
        raise ValueError(f"observations.method: unknown method {name!r}; expected one of "
                         f"{', '.join(OBSERVATION_METHODS)}")
    cls = OBSERVATION_METHODS[name]
    return cls(**settings_of(cls, spec, "observations"))


@dataclass(frozen=True)
class Observations:
    """Sparse observations in *model* units for inpainting, and the method that uses them.

    ``observed`` and ``mask`` are ``[1 or N, C, *S]`` (one map for all parameter
    sets, or one per set); ``mask`` is 1 where observed.
    """

    observed: Tensor
    mask: Tensor
    method: ObservationMethod = field(default_factory=RePaint)

    def __post_init__(self) -> None:
        if not isinstance(self.method, ObservationMethod):
            raise ValueError(f"observations.method: expected RePaint or DPS, got {self.method!r}")
        if self.observed.shape != self.mask.shape:
            raise ValueError(f"observations: values {tuple(self.observed.shape)} and mask "
                             f"{tuple(self.mask.shape)} differ in shape")

    def take(self, samples: Sequence[int]) -> Observations:
        """The observations of the members of the given parameter sets (one row per member)."""
        idx = torch.as_tensor([0 if self.observed.shape[0] == 1 else j for j in samples], dtype=torch.long)
        return Observations(self.observed[idx], self.mask[idx], self.method)


# --------------------------------------------------------------------------- the path
def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator],
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """x_T ~ N(0, I) ``[len(generators), *shape]``, each row from its own generator, on ``device``."""
    return torch.cat([torch.randn((1, *shape), generator=g, device=g.device, dtype=dtype) for g in generators]).to(device)


def sample_model(denoiser: nn.Module, diffusion: GaussianDiffusion, x_T: Tensor, cond: Conditioning | None, *,
                 sampler: Sampler,
                 guidance: GuidanceSpec = GuidanceSpec(), generator: Any = None,
                 observations: Observations | None = None) -> Tensor:
    """Run ``sampler`` (or inpainting with ``observations``) from ``x_T``; model units.

    Args:
        denoiser, diffusion: the model (e.g. a :class:`~scidiff.inference.checkpoint.Pretrained`'s);
            ``denoiser`` is the model's own, guidance is added here.
        x_T: ``[B, C, *S]`` on the model's device.
        cond: the (normalised) condition of each row, or ``None``.
        generator: one generator or a list of ``B`` (one per row) for the sampler's noise.
        observations: ``[B, ...]`` rows (:meth:`Observations.take`) to inpaint, or ``None``.
    """
    den = guided_denoiser(denoiser, guidance, cond is not None)
    if observations is None:
        return sampler.run(den, diffusion, x_T, cond, generator)
    # inpainting takes the sampler's step spacing (DPS differentiates through the denoiser)
    spacing = getattr(sampler, "spacing", "leading")
    return observations.method.run(den, diffusion, x_T, observations.observed.to(x_T.device),
                                   observations.mask.to(x_T.device), cond, generator, spacing)


def invert_model(denoiser: nn.Module, diffusion: GaussianDiffusion, x0: Tensor, cond: Conditioning | None, *,
                 sampler: Sampler, guidance: GuidanceSpec = GuidanceSpec(), refine_steps: int = 0) -> Tensor:
    """The x_T that ``sampler`` (deterministic DDIM) maps back to ``x0``: DDIM inversion through the
    same guided denoiser :func:`sample_model` uses; model units."""
    if not isinstance(sampler, DDIM):
        raise ValueError(f"sampler: inversion needs deterministic DDIM (sampler=ddim), got {sampler.describe()}")
    if sampler.eta != 0:
        raise ValueError(f"sampler.eta: inversion needs deterministic DDIM (eta 0), got {sampler.eta}")
    den = guided_denoiser(denoiser, guidance, cond is not None)
    return samplers.ddim_invert(den, diffusion, x0, cond=cond, refine_steps=refine_steps, **sampler._grid_kwargs())


def generate(
    pretrained,
    params: Tensor | None,
    seeds: Sequence[int],
    *,
    sampler: Sampler,
    guidance: GuidanceSpec = GuidanceSpec(),
    observations: Observations | None = None,
    fields: Tensor | None = None,
    device: torch.device | str = "cpu",
    embedding: Tensor | None = None,
) -> Tensor:
    """Generate ``b = len(seeds)`` members, in *physical* units, ``[b, C, *S]`` float32 on CPU.

    Args:
        pretrained: a :class:`~scidiff.inference.checkpoint.Pretrained` (on ``device``).
        params: physical parameters ``[b, P]`` in the order of ``pretrained.param_names``;
            ``None`` for an unconditional model.
        seeds: one seed per member (:func:`~scidiff.inference.seeds.member_seed`); the
            member's generator draws its x_T first, then the sampler's noise.
        observations: ``b`` rows in model units, for inpainting; ``None`` for free generation.
        fields: condition fields ``[b, Cf, *S]`` in model units; ``None`` for a model without
            field conditioning. Guidance's null condition drops them with the parameters.
        embedding: the conditioning vectors ``[b, E]`` in model units (normalised), or ``None``.
    """
    device = torch.device(device)
    gens = member_generators(seeds)
    x_T = initial_noise(pretrained.sample_shape, gens, device)
    model_params = None
    if params is not None and params.shape[1] > 0:
        model_params = pretrained.params_to_model(params.to(torch.float64)).to(device, torch.float32)
    if fields is not None and fields.shape[0] != len(gens):
        raise ValueError(f"fields has {fields.shape[0]} rows for {len(gens)} members")
    if embedding is not None and embedding.shape[0] != len(gens):
        raise ValueError(f"embedding has {embedding.shape[0]} rows for {len(gens)} members")
    cond = None
    if model_params is not None or fields is not None or embedding is not None:
        cond = Conditioning(params=model_params, fields=None if fields is None else fields.to(device, torch.float32),
                            embedding=None if embedding is None else embedding.to(device, torch.float32))
    x0 = sample_model(pretrained.denoiser, pretrained.diffusion, x_T, cond, sampler=sampler, guidance=guidance, generator=gens,
                      observations=observations)
    with torch.no_grad():
        return pretrained.to_physical(x0.detach()).to("cpu", torch.float32)


__all__ = [
    "DDIM",
    "DDPM",
    "DPMSolver",
    "UniPC",
    "GridSampler",
    "Heun",
    "DPS",
    "OBSERVATION_METHODS",
    "ObservationMethod",
    "RePaint",
    "SAMPLERS",
    "GuidanceSpec",
    "Observations",
    "Sampler",
    "as_guidance",
    "as_observation_method",
    "as_sampler",
    "generate",
    "guided_denoiser",
    "initial_noise",
    "invert_model",
    "sample_model",
    "sampler_from_identity",
]

"""A trained model, ready to use: what sampling, evaluation, inversion and training's
sample figures share.

* :mod:`~scidiff.inference.checkpoint` -- a checkpoint loaded into a ready model
  (:func:`load_pretrained` -> :class:`Pretrained`: EMA weights, diffusion, statistics,
  unit conversions, parameter ranges);
* :mod:`~scidiff.inference.generation` -- the one generation path: sampler spec
  (:class:`DDIM`, :class:`DPMSolver`, :class:`UniPC`, :class:`Heun`, :class:`DDPM`) -> guided denoiser ->
  sampler -> physical units;
* :mod:`~scidiff.inference.seeds`      -- seeds and generators keyed by what they are for;
* :mod:`~scidiff.inference.runtime`    -- the device and the ranks of a distributed job;
* :mod:`~scidiff.inference.tracking`   -- MLflow stores: default, reachability, flattening;
* :mod:`~scidiff.inference.figures`    -- figures of samples next to data.

This layer imports no Lightning: ``training``, ``sampling`` and ``evaluation`` sit above
it, ``data``, ``nets`` and ``diffusion`` below (``docs/architecture.md``).

    from scidiff.inference import DDIM, generate, load_pretrained
    model = load_pretrained("outputs/quickstart/<run>")
    fields = generate(model, params, seeds=[0, 1, 2, 3], sampler=DDIM(steps=50))   # physical units
"""

from scidiff.inference.checkpoint import CheckpointError, Pretrained, load_pretrained, resolve_checkpoint
from scidiff.inference.generation import (
    DDIM,
    DDPM,
    DPMSolver,
    GuidanceSpec,
    Heun,
    Observations,
    Sampler,
    UniPC,
    as_guidance,
    as_sampler,
    generate,
    guided_denoiser,
    sample_model,
)
from scidiff.inference.runtime import DistContext, distributed_context, resolve_device
from scidiff.inference.seeds import key_seed, member_seed, member_seeds

__all__ = [
    "DDIM",
    "DDPM",
    "DPMSolver",
    "UniPC",
    "Heun",
    "CheckpointError",
    "DistContext",
    "GuidanceSpec",
    "Observations",
    "Pretrained",
    "Sampler",
    "as_guidance",
    "as_sampler",
    "distributed_context",
    "generate",
    "guided_denoiser",
    "key_seed",
    "load_pretrained",
    "member_seed",
    "member_seeds",
    "resolve_checkpoint",
    "resolve_device",
    "sample_model",
]

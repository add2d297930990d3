"""The one generation path (scidiff.inference.generation) and its specs.

The path adds nothing to the samplers it runs: with the exact Gaussian denoiser its
output equals the diffusion core's sampler called directly, bit for bit, in 1-D, 2-D
and 3-D; guidance at scale 1 is the conditional model; a member depends on its batch only
through rounding. The specs check their own values with messages that
name the config key.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from scidiff.conditioning import Conditioning
from scidiff.diffusion import GaussianDiffusion, NoiseSchedule, samplers
from scidiff.diffusion.analytic import GaussianDataDenoiser
from scidiff.inference import DDIM, DDPM, GuidanceSpec, UniPC, as_guidance, as_sampler, sample_model
from scidiff.inference.generation import (
    DPS,
    RePaint,
    as_observation_method,
    guided_denoiser,
    initial_noise,
    invert_model,
    sampler_from_identity,
)
from scidiff.inference.seeds import key_seed, member_generators, member_seed

SHAPES = {1: (1, 16), 2: (2, 6, 5), 3: (1, 4, 3, 5)}


def exact(rank: int, prediction: str = "v"):
    diff = GaussianDiffusion(NoiseSchedule.from_name("linear", 200), prediction=prediction)
    g = torch.Generator().manual_seed(rank)
    shape = SHAPES[rank]
    mean = torch.randn(shape, generator=g, dtype=torch.float64)
    std = 0.3 + torch.rand(shape, generator=g, dtype=torch.float64)
    return diff, GaussianDataDenoiser(diff, mean, std), shape, (mean, std)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("spec", [DDIM(steps=10), DDIM(steps=7, eta=0.6, spacing="trailing"), DDPM(),
                                  UniPC(steps=20, spacing="trailing")])
def test_the_path_is_the_sampler_itself(rank, spec):
    diff, den, shape, _ = exact(rank)
    x_T = initial_noise(shape, member_generators([1, 2, 3]), dtype=torch.float64)
    got = sample_model(den, diff, x_T, None, sampler=spec, generator=member_generators([4, 5, 6]))
    if isinstance(spec, DDPM):
        want = samplers.ddpm_sample(den, diff, x_T, generator=member_generators([4, 5, 6]))
    elif isinstance(spec, UniPC):
        want = samplers.unipc_sample(den, diff, x_T, num_steps=spec.steps, spacing=spec.spacing, order=spec.order)
    else:
        want = samplers.ddim_sample(den, diff, x_T, num_steps=spec.steps, eta=spec.eta, spacing=spec.spacing,
                                    generator=member_generators([4, 5, 6]))
    assert torch.equal(got, want)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_inversion_through_the_path_regenerates_the_field(rank):
    diff, den, shape, (mean, std) = exact(rank)
    g = torch.Generator().manual_seed(9)
    x0 = mean + std * torch.randn((4, *shape), generator=g, dtype=torch.float64)
    spec = DDIM(steps=50)
    x_T = invert_model(den, diff, x0, None, sampler=spec, refine_steps=3)
    back = sample_model(den, diff, x_T, None, sampler=spec)
    assert float((back - x0).norm() / x0.norm()) < 1e-3
    with pytest.raises(ValueError, match="sampler.eta: inversion needs deterministic DDIM"):
        invert_model(den, diff, x0, None, sampler=DDIM(eta=0.5))
    with pytest.raises(ValueError, match="sampler: inversion needs deterministic DDIM"):
        invert_model(den, diff, x0, None, sampler=DDPM())


class TinyConditional(nn.Module):
    """A small conv net taking params (FiLM-like shift); enough to exercise guidance and batches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.param = nn.Linear(2, 1)
        self.null = nn.Parameter(torch.randn(1))

    def forward(self, x, t, cond):
        shift = self.param(cond.params) if cond is not None and cond.params is not None else self.null.expand(x.shape[0], 1)
        if cond is not None and cond.drop is not None:
            shift = torch.where(cond.drop[:, None], self.null.expand_as(shift), shift)
        return self.conv(x) + shift[:, :, None, None] + 1e-3 * t[:, None, None, None].float()


def test_guidance_at_scale_one_is_the_conditional_model_and_guidance_changes_it():
    torch.manual_seed(0)
    net = TinyConditional()
    diff = GaussianDiffusion(NoiseSchedule.from_name("linear", 50), prediction="eps")
    cond = Conditioning(params=torch.randn(3, 2))
    x_T = torch.randn(3, 1, 6, 6)
    plain = sample_model(net, diff, x_T, cond, sampler=DDIM(steps=5))
    assert torch.equal(plain, sample_model(net, diff, x_T, cond, sampler=DDIM(steps=5), guidance=GuidanceSpec(1.0)))
    guided = sample_model(net, diff, x_T, cond, sampler=DDIM(steps=5), guidance=GuidanceSpec(3.0))
    assert not torch.allclose(plain, guided)
    # an unconditional call ignores guidance (nothing to guide)
    assert guided_denoiser(net, GuidanceSpec(3.0), conditional=False) is net


def test_a_member_depends_on_its_batch_only_through_rounding():
    """Per-member generators: a member sampled alone equals its row of a batch to float32
    rounding (the kernels' blocking depends on the batch's shape: the ensemble's fixed
    micro-batches make it bit-identical, tests/sampling/test_ensemble.py)."""
    torch.manual_seed(0)
    net = TinyConditional()
    diff = GaussianDiffusion(NoiseSchedule.from_name("linear", 50), prediction="eps")
    cond = Conditioning(params=torch.randn(4, 2))
    gens = lambda: member_generators([11, 12, 13, 14])  # noqa: E731
    x_T = initial_noise((1, 6, 6), gens())
    spec, guide = DDIM(steps=4, eta=0.8), GuidanceSpec(2.0, 0.3)
    batch = sample_model(net, diff, x_T, cond, sampler=spec, guidance=guide, generator=gens())
    for i in range(4):
        one = sample_model(net, diff, x_T[i:i + 1], cond.map(lambda v, i=i: v[i:i + 1]), sampler=spec,
                           guidance=guide, generator=gens()[i:i + 1])
        torch.testing.assert_close(one[0], batch[i], rtol=1e-5, atol=1e-5)


def test_sampler_specs_from_configs_and_their_errors():
    assert as_sampler({"_target_": "scidiff.inference.DDIM", "steps": 20}) == DDIM(steps=20)
    assert as_sampler({"_target_": "scidiff.inference.DDPM"}) == DDPM()
    assert as_sampler({"name": "ddim", "spacing": "trailing"}) == DDIM(spacing="trailing")
    assert as_sampler({"_target_": "scidiff.inference.UniPC", "order": 2}) == UniPC(order=2)
    for spec in (DDIM(steps=3, eta=0.5, spacing="linspace"), DDPM(), DDIM(spacing="karras", sigma_max=20.0),
                 UniPC(steps=24, order=2, spacing="karras")):
        assert sampler_from_identity(spec.identity()) == spec
    # a karras grid's identity carries sigma_max (the grid moved to EDM's 80 on 2026-12-01: a store of the
    # older grid, whose identity lacks it, is never continued on the new one)
    assert DDIM(spacing="karras").identity()["sigma_max"] == 80.0 and "sigma_max" not in DDIM().identity()
    cases = [
        ({"_target_": "scidiff.inference.DDIM", "stepz": 3}, "sampler.stepz: not a setting of DDIM"),
        ({"_target_": "scidiff.inference.DDPM", "steps": 3}, "sampler.steps: not a setting of DDPM"),
        ({"_target_": "os.path"}, "sampler._target_: os.path is not a Sampler"),
        ({"name": "euler"}, "sampler.name: unknown sampler 'euler'"),
        ({"name": "ddim", "steps": 0}, "sampler.steps: expected a positive integer"),
        ({"name": "ddim", "steps": True}, "sampler.steps: expected a positive integer"),
        ({"name": "ddim", "eta": -0.1}, "sampler.eta: expected >= 0"),
        ({"name": "ddim", "spacing": "middle"}, "sampler.spacing: unknown value 'middle'"),
        ({"name": "ddim", "sigma_max": 0}, "sampler.sigma_max: expected a number > 0"),
        ({"name": "unipc", "order": 4}, "sampler.order: expected 1, 2 or 3, got 4"),
        ({"name": "unipc", "steps": 2, "order": 3}, "sampler.steps: 2 model calls are fewer than the solver's order 3"),
    ]
    for node, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            as_sampler(node)
    # UniPC's third order overshoots below 15 calls: a warning that names the key and the remedy
    with pytest.warns(UserWarning, match="sampler.steps: UniPC of order 3 at 12 model calls overshoots.*sampler.order=2"):
        UniPC(steps=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UniPC(steps=15), UniPC(steps=20), UniPC(steps=10, order=2)
    diff = GaussianDiffusion(NoiseSchedule.from_name("cosine", 20), prediction="v")
    with pytest.raises(ValueError, match="sampler.steps: 50 exceeds the model's T = 20"):
        DDIM(steps=50).check(diff)


def test_guidance_and_observation_specs_check_their_values():
    assert as_guidance(None) == GuidanceSpec() and as_guidance({"scale": 2}) == GuidanceSpec(2.0)
    for node, message in [({"scale": float("inf")}, "guidance.scale: expected a finite number"),
                          ({"rescale": 1.5}, r"guidance.rescale: expected a value in \[0, 1\]"),
                          ({"scal": 2.0}, "guidance.scal: not a setting of GuidanceSpec")]:
        with pytest.raises(ValueError, match=message):
            as_guidance(node)
    assert as_observation_method({"method": "repaint", "num_steps": None, "jump_length": 2}) == RePaint(jump_length=2)
    assert as_observation_method({"method": "dps", "step_size": 0.5}) == DPS(step_size=0.5)
    for node, message in [({"method": "repaint", "step_size": 1.0}, "observations.step_size: not a setting of "
                                                                     "RePaint"),
                          ({"method": "dps", "step_size": 0}, "observations.step_size: expected a number > 0"),
                          ({"method": "repaint", "resample": 0}, "observations.resample: expected a positive"),
                          ({"method": "smc"}, "observations.method: unknown method 'smc'")]:
        with pytest.raises(ValueError, match=message):
            as_observation_method(node)


def test_seeds_are_stable_and_keyed():
    # the derivations are part of every stored ensemble and evaluation: they must never change
    ss = np.random.SeedSequence([0, 1, 2]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    assert key_seed(0, 1, 2) == int(ss) and key_seed(0, 1, 2) != key_seed(0, 2, 1)
    st = np.random.SeedSequence((7, 3, 5)).generate_state(2, np.uint32)
    assert member_seed(7, 3, 5) == (int(st[0]) << 31) ^ int(st[1])
    with pytest.raises(ValueError, match="non-negative"):
        member_seed(-1, 0, 0)

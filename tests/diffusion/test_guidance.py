"""Classifier-free guidance against a toy analytic conditional denoiser."""

import pytest
import torch

from scidiff.conditioning import Conditioning
from scidiff.diffusion import GaussianDiffusion, NoiseSchedule, samplers
from scidiff.diffusion.guidance import ClassifierFreeGuidance, drop_conditions


class ToyConditional(torch.nn.Module):
    """Output 0.5 x + params[:, 0] (conditional) or 0.5 x - 1 (null condition), per sample;
    counts its calls and the batch sizes it sees; optionally 2C channels."""

    def __init__(self, learned_variance=False):
        super().__init__()
        self.calls, self.learned_variance = [], learned_variance

    def forward(self, x, t, cond):
        self.calls.append(x.shape[0])
        shift = torch.full((x.shape[0],), -1.0, dtype=x.dtype)
        if cond is not None and cond.params is not None:
            keep = torch.ones(x.shape[0], dtype=torch.bool) if cond.drop is None else ~cond.drop
            shift = torch.where(keep, cond.params[:, 0], shift)
        out = 0.5 * x + shift.reshape(-1, *[1] * (x.ndim - 1))
        return torch.cat([out, torch.full_like(x, 0.25)], 1) if self.learned_variance else out


@pytest.mark.parametrize("spatial", [(7,), (3, 5), (2, 3, 4)])
def test_guidance_scales(spatial):
    x = torch.randn(4, 2, *spatial, dtype=torch.float64)
    t = torch.tensor([1, 2, 3, 4])
    cond = Conditioning(params=torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64))
    toy = ToyConditional()
    cond_out, uncond_out = toy(x, t, cond), toy(x, t, cond.dropped(torch.ones(4, dtype=torch.bool)))
    for w in (0.0, 1.0, 3.5):
        toy.calls.clear()
        guided = ClassifierFreeGuidance(toy, scale=w)(x, t, cond)
        torch.testing.assert_close(guided, uncond_out + w * (cond_out - uncond_out))
        assert toy.calls in ([8], [4])  # both halves in one batched call (or one call at w = 1)
    torch.testing.assert_close(ClassifierFreeGuidance(toy, 0.0)(x, t, cond), uncond_out)
    torch.testing.assert_close(ClassifierFreeGuidance(toy, 1.0)(x, t, cond), cond_out)
    # per-sample scales
    w = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    per = ClassifierFreeGuidance(toy, w)(x, t, cond)
    for i in range(4):
        torch.testing.assert_close(per[i], uncond_out[i] + w[i] * (cond_out[i] - uncond_out[i]))


def test_guidance_keeps_conditional_variance_channels_and_rescales():
    x = torch.randn(2, 1, 6, dtype=torch.float64)
    t = torch.tensor([5, 6])
    cond = Conditioning(params=torch.tensor([[2.0], [3.0]], dtype=torch.float64))
    toy = ToyConditional(learned_variance=True)
    out = ClassifierFreeGuidance(toy, 2.0)(x, t, cond)
    assert out.shape == (2, 2, 6)
    torch.testing.assert_close(out[:, 1:], torch.full_like(x, 0.25))
    rescaled = ClassifierFreeGuidance(toy, 7.0, rescale=1.0)(x, t, cond)[:, :1]
    cond_std = toy(x, t, cond)[:, :1].std(dim=(1, 2))
    torch.testing.assert_close(rescaled.std(dim=(1, 2)), cond_std)


def test_guided_sampling_runs_through_the_samplers():
    """Guidance is itself a denoiser: w = 1 sampling equals plain conditional sampling."""
    sched = NoiseSchedule.from_name("linear", num_timesteps=50)
    diff = GaussianDiffusion(sched, prediction="x0")
    cond = Conditioning(params=torch.tensor([[0.5], [-0.5]]))
    x_T = torch.randn(2, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    plain = samplers.ddim_sample(ToyConditional(), diff, x_T, 10, cond=cond)
    guided = samplers.ddim_sample(ClassifierFreeGuidance(ToyConditional(), 1.0), diff, x_T, 10, cond=cond)
    torch.testing.assert_close(plain, guided)
    strong = samplers.ddim_sample(ClassifierFreeGuidance(ToyConditional(), 4.0), diff, x_T, 10, cond=cond)
    assert not torch.allclose(strong, plain)


def test_drop_conditions():
    cond = Conditioning(params=torch.zeros(20000, 3))
    dropped = drop_conditions(cond, 0.2, generator=torch.Generator().manual_seed(0))
    assert dropped.drop.dtype == torch.bool
    assert abs(float(dropped.drop.float().mean()) - 0.2) < 0.015
    # existing drops are kept
    again = drop_conditions(dropped, 0.5, generator=torch.Generator().manual_seed(1))
    assert bool((again.drop | ~dropped.drop).all())
    assert drop_conditions(None, 0.3) is None
    assert drop_conditions(cond, 0.0) is cond
    with pytest.raises(ValueError, match="p \\(condition dropout probability\\)"):
        drop_conditions(cond, 1.5)
    with pytest.raises(ValueError, match="rescale"):
        ClassifierFreeGuidance(ToyConditional(), 2.0, rescale=2.0)


def test_conditioning_contract():
    c = Conditioning(params=torch.zeros(3, 2), fields=torch.zeros(3, 1, 4, 5))
    assert c.batch_size == 3
    both = Conditioning.cat([c, c.dropped(torch.ones(3, dtype=torch.bool))])
    assert both.drop.tolist() == [False] * 3 + [True] * 3
    with pytest.raises(ValueError, match="disagree on the batch size"):
        Conditioning(params=torch.zeros(3, 2), embedding=torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"params must be \[B, P\]"):
        Conditioning(params=torch.zeros(3))
    with pytest.raises(ValueError, match="drop must be a bool"):
        Conditioning(params=torch.zeros(3, 1), drop=torch.zeros(3))

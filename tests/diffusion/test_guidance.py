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


class TwoParameterToy(torch.nn.Module):
    """Output 0.5 x + p0 - 2 p1 (conditional) or 0.5 x - 1 (null), per sample; counts calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, cond):
        self.calls.append(x.shape[0])
        shift = torch.full((x.shape[0],), -1.0, dtype=x.dtype)
        if cond is not None and cond.params is not None:
            keep = torch.ones(x.shape[0], dtype=torch.bool) if cond.drop is None else ~cond.drop
            shift = torch.where(keep, cond.params[:, 0] - 2.0 * cond.params[:, 1], shift)
        return 0.5 * x + shift.reshape(-1, *[1] * (x.ndim - 1))


def test_guidance_with_several_parameters():
    """w scales the effect of every parameter at once: d(out)/d(p1) = w * (-2)."""
    x = torch.randn(3, 1, 4, 5, dtype=torch.float64)
    t = torch.tensor([3, 7, 9])
    p = torch.tensor([[0.5, 0.1], [1.0, -0.3], [-2.0, 0.7]], dtype=torch.float64)
    toy, w = TwoParameterToy(), 2.5
    guided = ClassifierFreeGuidance(toy, scale=w)(x, t, Conditioning(params=p))
    expected = 0.5 * x - 1.0 + w * (p[:, 0] - 2 * p[:, 1] + 1.0).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(guided, expected)
    shifted = p.clone()
    shifted[:, 1] += 0.25
    moved = ClassifierFreeGuidance(toy, scale=w)(x, t, Conditioning(params=shifted)) - guided
    torch.testing.assert_close(moved, torch.full_like(x, w * -2.0 * 0.25))


def test_partial_rescale_mixes_the_rescaled_and_the_guided_outputs():
    """phi in (0, 1): phi * rescaled + (1 - phi) * guided (Lin et al. 2024, eq. 16)."""
    x = torch.randn(2, 1, 6, 7, dtype=torch.float64)
    t = torch.tensor([4, 8])
    cond = Conditioning(params=torch.tensor([[1.5, 0.2], [-0.5, 0.4]], dtype=torch.float64))
    toy = TwoParameterToy()
    guided = ClassifierFreeGuidance(toy, 3.0)(x, t, cond)
    full = ClassifierFreeGuidance(toy, 3.0, rescale=1.0)(x, t, cond)
    half = ClassifierFreeGuidance(toy, 3.0, rescale=0.5)(x, t, cond)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * guided)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), toy(x, t, cond).std(dim=(1, 2, 3)))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guided_sampling_is_one_batched_call_per_step_and_follows_the_formula(sampler):
    """Each step calls the model once on [cond; null] (2B), and the result equals a loop
    that evaluates both halves separately and combines them by hand."""
    sched = NoiseSchedule.from_name("linear", num_timesteps=30)
    diff = GaussianDiffusion(sched, prediction="eps")
    cond = Conditioning(params=torch.tensor([[0.3, -0.1], [-0.4, 0.2], [1.0, 0.5]], dtype=torch.float64))
    null = cond.dropped(torch.ones(3, dtype=torch.bool))
    x_T = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    toy, w = TwoParameterToy(), 1.8
    guided = ClassifierFreeGuidance(toy, w)
    if sampler == "ddpm":
        out = samplers.ddpm_sample(guided, diff, x_T, cond=cond, generator=torch.Generator().manual_seed(1))
        n_steps = 30
    else:
        out = samplers.ddim_sample(guided, diff, x_T, 10, eta=0.5, cond=cond,
                                   generator=torch.Generator().manual_seed(1))
        n_steps = 10
    assert toy.calls == [6] * n_steps

    ref, x, g = TwoParameterToy(), x_T, torch.Generator().manual_seed(1)
    seq = list(range(29, -1, -1)) if sampler == "ddpm" else samplers.timestep_sequence(30, 10).tolist()
    for t, t_prev in zip(seq, seq[1:] + [-1]):
        tb = torch.full((3,), t)
        c, u = ref(x, tb, cond), ref(x, tb, null)
        eps = u + w * (c - u)
        if sampler == "ddpm":
            x = samplers.ddpm_step(diff, eps, x, t, generator=g).prev_sample
        else:
            x = samplers.ddim_step(diff, eps, x, t, t_prev, eta=0.5, generator=g).prev_sample
    assert len(ref.calls) == 2 * n_steps
    torch.testing.assert_close(out, x)


class AnalyticConditional(torch.nn.Module):
    """x_0 | p ~ N(p, s^2) with p ~ N(0, tau^2), so unconditionally x_0 ~ N(0, s^2 + tau^2):
    the exact denoisers of both laws as one conditional model, in ``diff``'s parameterisation
    (called on the model input, c_in x_t for EDM)."""

    def __init__(self, diff, s, tau):
        from scidiff.diffusion.analytic import GaussianDataDenoiser

        super().__init__()
        self.diff, self.s = diff, s
        self.null = GaussianDataDenoiser(diff, 0.0, (s**2 + tau**2) ** 0.5)

    def forward(self, x_in, t, cond):
        out_null = self.null(x_in, t)
        if cond is None or cond.params is None:
            return out_null
        x = self.diff.unscale_model_input(x_in, t)
        ab = self.diff.coef("alphas_cumprod", t, x)
        p = cond.params[:, :1].reshape(-1, *[1] * (x.ndim - 1))
        # N(p, s^2) data: E[eps | x_t] = sqrt(1 - ab) r / (ab s^2 + 1 - ab), E[x0 | x_t] = p + sqrt(ab) s^2 r / (...)
        r = (x - ab.sqrt() * p) / (ab * self.s**2 + 1 - ab)
        out_cond = self.diff.target(p + ab.sqrt() * self.s**2 * r, (1 - ab).sqrt() * r, t)
        keep = torch.ones(x.shape[0], dtype=torch.bool) if cond.drop is None else ~cond.drop
        return torch.where(keep.reshape(-1, *[1] * (x.ndim - 1)), out_cond, out_null)


@pytest.mark.parametrize(("prediction", "sigma_data"), [("eps", 1.0), ("edm", 0.5), ("edm", 2.0)],
                         ids=["eps", "edm-sd0.5", "edm-sd2"])
def test_guided_ddpm_with_an_analytic_conditional_gaussian(prediction, sigma_data):
    """w = 0 samples the marginal N(0, s^2 + tau^2), w = 1 the conditional law N(p, s^2),
    exactly up to Monte-Carlo error."""
    s, tau = 0.4, 1.5
    diff = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=1000), prediction=prediction,
                             sigma_data=sigma_data)
    n = 2000
    p = torch.full((n, 1), 1.2, dtype=torch.float64)
    cond = Conditioning(params=p)
    for w, (mean, var) in ((0.0, (0.0, s**2 + tau**2)), (1.0, (1.2, s**2))):
        x_T = torch.randn(n, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        x = samplers.ddpm_sample(ClassifierFreeGuidance(AnalyticConditional(diff, s, tau), w), diff, x_T, cond=cond,
                                 generator=torch.Generator().manual_seed(4)).flatten()
        assert abs(float(x.mean()) - mean) < 4.5 * (var / n) ** 0.5
        assert abs(float(x.var()) / var - 1.0) < 4.5 * (2.0 / n) ** 0.5


@pytest.mark.parametrize("sigma_data", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("spatial", [(7,), (3, 5), (2, 3, 4)])
def test_guided_edm_samples_equal_guided_v_samples(spatial, sigma_data):
    """F, v and eps are affine in one another with the same coefficients for both halves, so
    guiding EDM (w = 2.5, outside [0, 1]) gives the same samples as guiding v: DDPM and DDIM."""
    s, tau = 0.4, 1.5
    sched = NoiseSchedule.from_name("linear", num_timesteps=100)
    v = GaussianDiffusion(sched, prediction="v")
    edm = GaussianDiffusion(sched, prediction="edm", sigma_data=sigma_data)
    cond = Conditioning(params=torch.tensor([[1.2], [-0.5], [0.3]], dtype=torch.float64))
    x_T = torch.randn(3, 1, *spatial, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    runs = {}
    for name, diff in (("v", v), ("edm", edm)):
        den = ClassifierFreeGuidance(AnalyticConditional(diff, s, tau), 2.5)
        runs[name] = (samplers.ddpm_sample(den, diff, x_T, cond=cond, generator=torch.Generator().manual_seed(4)),
                      samplers.ddim_sample(den, diff, x_T, 20, eta=0.5, spacing="trailing", cond=cond,
                                           generator=torch.Generator().manual_seed(4)))
    for a, b in zip(runs["v"], runs["edm"]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)

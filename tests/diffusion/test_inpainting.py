"""Inpainting (RePaint, DPS) against exact answers: analytic Gaussian denoisers, whose
conditional law given some observed points is known in closed form."""

import math

import pytest
import torch

from scidiff.conditioning import Conditioning
from scidiff.diffusion import GaussianDiffusion, NoiseSchedule, samplers
from scidiff.diffusion.analytic import GaussianDataDenoiser
from scidiff.diffusion.analytic_full import (
    FullCovarianceGaussianDenoiser,
    grid_coords,
    squared_exponential_covariance,
)
from scidiff.diffusion.inpainting import check_observations, dps_sample, repaint_sample, repaint_schedule

FIELD_SHAPES = [(2, 40), (1, 6, 10), (1, 3, 4, 5)]  # [C, *S]: 1-D, 2-D, 3-D, non-square


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _diffusion(T=1000, prediction="eps", sigma_data=1.0):
    return GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=T), prediction=prediction,
                             sigma_data=sigma_data)


def _independent_problem(shape, seed=0, prediction="eps", sigma_data=1.0, T=1000):
    """Elementwise Gaussian data, a truth drawn from it, ~25 % of points observed."""
    diff = _diffusion(T=T, prediction=prediction, sigma_data=sigma_data)
    g = torch.Generator().manual_seed(seed)
    mu = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64) + 1.0
    std = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
    truth = mu + std * torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) < 0.25
    return diff, GaussianDataDenoiser(diff, mu, std), mu, std, truth, mask, g


def _gp_problem(n=32, seed=0, prediction="eps", sigma_data=1.0):
    """A 1-D Gaussian process (squared-exponential, length 4 points) observed at 4 points."""
    diff = _diffusion(prediction=prediction, sigma_data=sigma_data)
    cov = squared_exponential_covariance(grid_coords((n,)), length_scale=4.0, variance=1.0, jitter=1e-4)
    den = FullCovarianceGaussianDenoiser(diff, cov, (1, n), mean=0.5)
    g = torch.Generator().manual_seed(seed)
    truth = den.sample(1, g)[0]
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, [3, 12, 20, 28]] = True
    return diff, den, truth, mask, g


# ------------------------------------------------------------------- RePaint
def test_repaint_schedule():
    assert repaint_schedule(4, 2, 2) == [0, 1, 2, 0, 1, 2, 3, 4, 2, 3, 4]
    assert repaint_schedule(5, 10, 10) == [0, 1, 2, 3, 4, 5]  # no room to jump
    assert repaint_schedule(6, 3, 1) == list(range(7))
    path = repaint_schedule(100, 10, 10)
    steps = [b - a for a, b in zip(path, path[1:])]
    assert set(steps) == {1, -10}
    # 10 jump points (10, 20, ..., 100), each revisited 9 times: 100 + 9 * 10 * 10 reverse steps
    assert steps.count(1) == 100 + 9 * 10 * 10 and steps.count(-10) == 90
    assert path[-1] == 100
    with pytest.raises(ValueError, match="jump_length"):
        repaint_schedule(10, 0, 2)
    with pytest.raises(ValueError, match="resample"):
        repaint_schedule(10, 2, 0)


@pytest.mark.parametrize("shape", FIELD_SHAPES)
def test_repaint_keeps_observations_and_samples_the_prior_elsewhere(shape):
    """Independent points: observed ones are reproduced exactly (the last replacement is
    with the data itself); unobserved ones are untouched by the observations, so they
    have the law of the plain sampler with the same steps (DDIM, eta = 1), whose
    50-step discretisation keeps 80-90 % of the prior variance."""
    diff, den, mu, std, truth, mask, g = _independent_problem(shape)
    B = 300
    x_T = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    x = repaint_sample(den, diff, x_T, truth, mask, num_steps=50, jump_length=10, resample=3, generator=g)
    assert x.shape == x_T.shape
    assert torch.equal(x[:, mask], truth[mask].expand(B, -1))
    plain = samplers.ddim_sample(den, diff, torch.randn(B, *shape, generator=g, dtype=torch.float64), 50, eta=1.0,
                                 generator=g)
    free = ~mask
    z, z_plain = ((x - mu) / std)[:, free], ((plain - mu) / std)[:, free]
    n = z.numel()
    assert abs(float(z.mean() - z_plain.mean())) < 4.5 * math.sqrt(2.0 / n)
    assert abs(float(z.var() / z_plain.var()) - 1.0) < 4.5 * math.sqrt(4.0 / n)
    # members differ at unobserved points: per-point std over members near the prior's
    assert float((x.std(0) / std)[free].mean()) > 0.8


def test_repaint_all_steps_uses_the_diffusions_reverse_variance():
    """num_steps=None: DDPM steps over all T (here fixed_large), still exact at observed points."""
    shape = (1, 12)
    diff = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=200), variance="fixed_large")
    den = GaussianDataDenoiser(diff, 0.0, 1.0)
    y = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(shape)
    mask = torch.zeros(shape)
    mask[0, ::3] = 1.0
    g = torch.Generator().manual_seed(1)
    x = repaint_sample(den, diff, torch.randn(200, *shape, generator=g, dtype=torch.float64), y, mask,
                       jump_length=20, resample=2, generator=g)
    assert torch.equal(x[:, 0, ::3], y[0, ::3].expand(200, -1))
    free = x[:, 0, 1::3]
    assert abs(float(free.mean())) < 4.5 / math.sqrt(free.numel())
    assert 0.8 < float(free.std()) < 1.2


def test_repaint_approaches_the_exact_gaussian_conditional():
    """Correlated (GP) data: the member mean at unobserved points matches the exact
    conditional mean Sigma_UO Sigma_OO^-1 (y_O - mu_O) + mu_U; resampling is what gets
    it there (plain replacement, resample=1, is far off)."""
    diff, den, truth, mask, g = _gp_problem()
    cond_mean, cond_var = den.conditional(truth, mask)
    free = ~mask
    B = 400

    def run(resample):
        x_T = torch.randn(B, 1, 32, generator=g, dtype=torch.float64)
        return repaint_sample(den, diff, x_T, truth, mask, num_steps=100, jump_length=10, resample=resample,
                              generator=g)

    x = run(20)
    err = (x.mean(0) - cond_mean)[free]
    mc = (cond_var[free] / B).sqrt()  # Monte-Carlo standard error of the member mean
    # measured at this seed: rms error 0.034 (prior std 1), rms error / MC error 1.46;
    # with resample=1: 0.32 and 13.9
    assert float(err.pow(2).mean().sqrt()) < 0.08
    assert float((err / mc).pow(2).mean().sqrt()) < 3.0
    ratio = x.var(0)[free] / cond_var[free]
    assert 0.75 < float(ratio.mean()) < 1.25
    # the conditional is far from the prior here, so matching it is not trivial
    assert float((cond_mean[free] - 0.5).abs().max()) > 0.5
    plain = run(1)
    plain_err = (plain.mean(0) - cond_mean)[free]
    assert float(plain_err.pow(2).mean().sqrt()) > 3 * float(err.pow(2).mean().sqrt())


# ----------------------------------------------------------------------- DPS
def test_dps_one_step_matches_the_closed_form():
    """One DPS step from x_T straight to the data, elementwise Gaussian data: x0^ is
    affine in x_t with slope kappa = sqrt(ab) s^2 / (ab s^2 + 1 - ab), so
    grad ||m (y - x0^)||^2 = -2 kappa m (y - x0^) and the output is
    x0^ + (step_size / ||m (y - x0^)||) 2 kappa m (y - x0^)."""
    diff = _diffusion(T=100)
    shape, s2 = (1, 5, 4), 0.49
    den = GaussianDataDenoiser(diff, 0.3, math.sqrt(s2))
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) < 0.5
    out = dps_sample(den, diff, x_T, y, mask, num_steps=1, step_size=0.7)
    t = 0  # leading spacing, one step: the only timestep is 0
    ab = float(diff.schedule.alphas_cumprod[t])
    kappa = math.sqrt(ab) * s2 / (ab * s2 + 1 - ab)
    x0_hat = 0.3 + kappa * (x_T - math.sqrt(ab) * 0.3)
    r = mask * (y - x0_hat)
    norm = r.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out, x0_hat + 0.7 / norm * 2 * kappa * r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("prediction", "sigma_data"), [("v", 1.0), ("edm", 2.0)], ids=["v", "edm-sd2"])
@pytest.mark.parametrize("shape", FIELD_SHAPES)
def test_dps_fits_observations_and_varies_elsewhere(shape, prediction, sigma_data):
    diff, den, mu, std, truth, mask, g = _independent_problem(shape, seed=4, prediction=prediction,
                                                              sigma_data=sigma_data)
    B = 200
    x = dps_sample(den, diff, torch.randn(B, *shape, generator=g, dtype=torch.float64), truth, mask,
                   num_steps=50, step_size=0.3, generator=g)
    misfit = ((x - truth) / std)[:, mask]
    # stated tolerance: rms misfit < 0.3 prior std at 50 steps, step_size 0.3 (measured 0.16-0.2)
    assert float(misfit.pow(2).mean().sqrt()) < 0.3
    free = ~mask
    assert float((x.std(0) / std)[free].mean()) > 0.7
    z = ((x - mu) / std)[:, free]
    assert abs(float(z.mean())) < 0.1


def test_dps_on_correlated_data_follows_the_conditional():
    diff, den, truth, mask, g = _gp_problem(seed=3)
    cond_mean, cond_var = den.conditional(truth, mask)
    B = 300
    x = dps_sample(den, diff, torch.randn(B, 1, 32, generator=g, dtype=torch.float64), truth, mask,
                   num_steps=200, step_size=0.1, generator=g)
    assert float((x - truth)[:, mask].pow(2).mean().sqrt()) < 0.1  # measured 0.05
    free = ~mask
    assert float((x.mean(0) - cond_mean)[free].abs().max()) < 0.25  # DPS is approximate: measured 0.15
    assert float(x.std(0)[free].mean()) > 0.5 * float(cond_var[free].sqrt().mean())


@pytest.mark.parametrize("sigma_data", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("shape", FIELD_SHAPES)
def test_edm_inpainting_equals_v_with_the_exact_denoiser(shape, sigma_data):
    """The exact denoiser gives the same reverse process (and the same gradient of x0^ with
    respect to x_t, through c_in) for EDM as for v: RePaint (all steps and skipped) and DPS
    (DDPM and skipped) produce the same members to float64 rounding."""
    v = _independent_problem(shape, seed=6, prediction="v", T=100)
    e = _independent_problem(shape, seed=6, prediction="edm", sigma_data=sigma_data, T=100)
    truth, mask = v[4], v[5]
    x_T = torch.randn(4, *shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def gens():
        return [torch.Generator().manual_seed(20 + i) for i in range(4)]

    runs = [(repaint_sample, dict(num_steps=None, jump_length=10, resample=2)),
            (repaint_sample, dict(num_steps=20, jump_length=5, resample=2)),
            (dps_sample, dict(num_steps=None, step_size=0.3)),
            (dps_sample, dict(num_steps=20, step_size=0.3))]
    for sampler, kw in runs:
        a = sampler(v[1], v[0], x_T, truth, mask, generator=gens(), **kw)
        b = sampler(e[1], e[0], x_T, truth, mask, generator=gens(), **kw)
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-8)
        if sampler is repaint_sample:
            assert torch.equal(b[:, mask], truth[mask].expand(4, -1))


def test_edm_dps_on_correlated_data_equals_v():
    """The full-covariance (GP) denoiser outputs EDM's F too: DPS members equal v's."""
    runs = []
    for prediction, sd in (("v", 1.0), ("edm", 0.5)):
        diff, den, truth, mask, g = _gp_problem(seed=3, prediction=prediction, sigma_data=sd)
        x_T = torch.randn(8, 1, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        runs.append(dps_sample(den, diff, x_T, truth, mask, num_steps=30, step_size=0.1,
                               generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-8, atol=1e-8)


# ---------------------------------------------------- real networks, batches
def test_tiny_conditional_unet_batch_independent_members():
    """A (random) conditional 2-D UNet: observations reproduced, and with one generator per
    member a member is the same drawn alone or in a batch of three."""
    from scidiff.nets import UNet

    torch.manual_seed(0)
    net = UNet(1, dims=2, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(),
               head_channels=8, num_params=2).eval()
    diff = _diffusion(T=100)
    shape = (1, 8, 12)
    y = torch.randn(shape)
    mask = torch.zeros(1, 1, 8, 12)
    mask[..., ::3, ::4] = 1.0
    params = torch.tensor([[0.1, -0.2], [0.5, 0.3], [-1.0, 0.0]])
    x_T = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5))

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    for sampler, kw in ((repaint_sample, dict(num_steps=10, jump_length=3, resample=2)),
                        (dps_sample, dict(num_steps=10, step_size=0.5))):
        batch = sampler(net, diff, x_T, y, mask, cond=Conditioning(params=params), generator=gens([7, 8, 9]), **kw)
        alone = sampler(net, diff, x_T[1:2], y, mask, cond=Conditioning(params=params[1:2]), generator=gens([8]),
                        **kw)
        torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-5)
        assert batch.shape == x_T.shape and torch.isfinite(batch).all()
        assert not torch.allclose(batch[0], batch[2])
    rp = repaint_sample(net, diff, x_T, y, mask, num_steps=10, cond=Conditioning(params=params))
    assert torch.equal(rp[mask.expand_as(rp).bool()], y.expand(3, -1, -1, -1)[mask.expand_as(rp).bool()])


# ---------------------------------------------------------------- bad input
def test_bad_observations_raise_naming_the_shapes():
    diff = _diffusion(T=50)
    den = GaussianDataDenoiser(diff, 0.0, 1.0)
    x_T = torch.randn(2, 1, 6, 8)
    with pytest.raises(ValueError, match=r"observed has shape \(1, 6, 7\).*\(2, 1, 6, 8\)"):
        repaint_sample(den, diff, x_T, torch.zeros(1, 6, 7), torch.ones(1, 6, 8))
    with pytest.raises(ValueError, match=r"obs_mask has shape \(3, 1, 6, 8\)"):
        dps_sample(den, diff, x_T, torch.zeros(1, 6, 8), torch.ones(3, 1, 6, 8))
    with pytest.raises(ValueError, match="only 0 .* and 1"):
        check_observations(x_T, torch.zeros(1, 6, 8), torch.full((1, 6, 8), 0.5))
    y = torch.full((1, 6, 8), float("nan"))
    mask = torch.zeros(1, 6, 8, dtype=torch.bool)
    mask[0, 2, 3] = True
    with pytest.raises(ValueError, match="not finite at 1 points"):
        check_observations(x_T, y, mask)
    y[0, 2, 3] = 1.5  # NaN where unobserved is fine: it never reaches the sample
    out = repaint_sample(den, diff, x_T, y, mask, num_steps=5, resample=1)
    assert torch.isfinite(out).all() and torch.all(out[:, 0, 2, 3] == 1.5)
    with pytest.raises(ValueError, match="step_size"):
        dps_sample(den, diff, x_T, y, mask, step_size=0.0)

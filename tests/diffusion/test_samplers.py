"""Samplers against exact answers: the analytic Gaussian denoiser, closed-form laws, a
literal transcription of DDPM Algorithm 2, and pinned numbers."""

import math

import pytest
import torch

from scidiff.diffusion import GaussianDiffusion, NoiseSchedule, samplers
from scidiff.diffusion.analytic import GaussianDataDenoiser

FIELD_SHAPES = [(2, 40), (1, 6, 10), (1, 3, 4, 5)]  # [C, *S]: 1-D, 2-D, 3-D, non-square
# (prediction, sigma_data): EDM with data far narrower and far wider than its sigma_data
PREDICTIONS = [("eps", 1.0), ("v", 1.0), ("edm", 0.5), ("edm", 2.0)]
PRED_IDS = ["eps", "v", "edm-sd0.5", "edm-sd2"]


def _gaussian_setup(shape, T=1000, prediction="eps", seed=0, sigma_data=1.0, schedule="linear", ztsnr=False):
    sched = NoiseSchedule.from_name(schedule, num_timesteps=T, zero_terminal_snr=ztsnr)
    diff = GaussianDiffusion(sched, prediction=prediction, sigma_data=sigma_data)
    g = torch.Generator().manual_seed(seed)
    mu = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64) + 1.0
    std = 0.3 + 1.2 * torch.rand(shape, generator=g, dtype=torch.float64)
    return sched, diff, GaussianDataDenoiser(diff, mu, std), mu, std


def _exact_law(sched, mu, std, steps, eta):
    """Mean and variance of a DDIM(eta)/DDPM chain's output for x_0 ~ N(mu, std^2) and
    x_T ~ N(0, 1), propagated in closed form: with the exact denoiser every step is
    affine, x_prev = A x_t + B + sigma z. ``steps``: list of (t, ab_prev, sigma^2)."""
    m, v = torch.zeros_like(mu), torch.ones_like(mu)
    s2 = std**2
    for t, ab_p, sig2 in steps:
        ab = float(sched.alphas_cumprod[t])
        den = ab * s2 + 1 - ab
        k_x0 = math.sqrt(ab) * s2 / den  # x0^ = mu + k_x0 (x_t - sqrt(ab) mu)
        k_eps = math.sqrt(1 - ab) / den  # eps^ = k_eps (x_t - sqrt(ab) mu)
        d = math.sqrt(max(1 - ab_p - sig2, 0.0))
        A = math.sqrt(ab_p) * k_x0 + d * k_eps
        B = math.sqrt(ab_p) * mu - A * math.sqrt(ab) * mu
        m, v = A * m + B, A**2 * v + sig2
    return m, v


def _ddim_steps(sched, n, spacing, eta):
    seq = samplers.timestep_sequence(sched.num_timesteps, n, spacing).tolist()
    out = []
    for t, p in zip(seq, seq[1:] + [-1]):
        ab, ab_p = float(sched.alphas_cumprod[t]), 1.0 if p < 0 else float(sched.alphas_cumprod[p])
        out.append((t, ab_p, eta**2 * (1 - ab_p) / (1 - ab) * (1 - ab / ab_p)))
    return out


def _ddpm_steps(sched):
    post = sched.betas * (1 - sched.alphas_cumprod_prev) / (1 - sched.alphas_cumprod)
    return [(t, float(sched.alphas_cumprod_prev[t]), float(post[t]) if t > 0 else 0.0)
            for t in range(sched.num_timesteps - 1, -1, -1)]


def _assert_moments(x, m, v, n_sigma=4.5):
    """Pooled standardised moments of samples ``x`` [N, ...] against the law (m, v)."""
    z = (x - m) / v.sqrt()
    n = z.numel()
    assert abs(float(z.mean())) < n_sigma / math.sqrt(n), f"mean {float(z.mean()):.4f}"
    assert abs(float(z.var()) - 1) < n_sigma * math.sqrt(2 / n), f"var {float(z.var()):.4f}"


@pytest.mark.parametrize(("prediction", "sigma_data"), [("eps", 1.0), ("edm", 0.5), ("edm", 2.0)],
                         ids=["eps", "edm-sd0.5", "edm-sd2"])
@pytest.mark.parametrize("shape", FIELD_SHAPES)
def test_ddpm_matches_the_data_law(shape, prediction, sigma_data):
    sched, diff, den, mu, std = _gaussian_setup(shape, T=400, prediction=prediction, sigma_data=sigma_data)
    g = torch.Generator().manual_seed(1)
    x = samplers.ddpm_sample(den, diff, torch.randn(400, *shape, generator=g, dtype=torch.float64), generator=g)
    m, v = _exact_law(sched, mu, std, _ddpm_steps(sched), eta=1.0)
    _assert_moments(x, m, v)
    # fixed_small ancestral sampling (T = 400) under-disperses slightly: the exact reverse
    # variance also carries Var[x0 | x_t]; within 7 % of the data variance here
    assert float((m - mu).abs().max() / std.min()) < 0.01
    assert 0.93 < float((v / std**2).min()) and float((v / std**2).max()) <= 1.0


@pytest.mark.parametrize("shape", FIELD_SHAPES)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize(("prediction", "sigma_data"), PREDICTIONS, ids=PRED_IDS)
def test_ddim_50_steps_matches_its_exact_law(shape, spacing, prediction, sigma_data):
    sched, diff, den, mu, std = _gaussian_setup(shape, prediction=prediction, sigma_data=sigma_data)
    g = torch.Generator().manual_seed(2)
    for eta in (0.0, 1.0):
        x_T = torch.randn(400, *shape, generator=g, dtype=torch.float64)
        x = samplers.ddim_sample(den, diff, x_T, 50, eta=eta, spacing=spacing, generator=g)
        m, v = _exact_law(sched, mu, std, _ddim_steps(sched, 50, spacing, eta), eta)
        _assert_moments(x, m, v)
        # the data law up to DDIM's first-order discretisation error at 50 steps
        assert float((m - mu).abs().max() / std.min()) < 0.1
        assert 0.7 < float((v / std**2).min()) and float((v / std**2).max()) < 1.0


def test_ddim_converges_to_the_data_law_as_steps_grow():
    sched, diff, den, mu, std = _gaussian_setup((1, 8, 12))
    gaps = []
    for n in (10, 50, 200, 1000):
        _, v = _exact_law(sched, mu, std, _ddim_steps(sched, n, "trailing", 0.0), 0.0)
        gaps.append(float((1 - v / std**2).abs().max()))
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.01


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_on_unit_gaussian_data_is_a_product_of_cosines(spacing):
    """For x_0 ~ N(0, 1) the exact denoiser makes each DDIM step x_s = cos(theta_s - theta_t) x_t
    with ab = cos^2 theta; the chain's output is pinned by that product."""
    sched = NoiseSchedule.from_name("cosine", num_timesteps=1000)
    diff = GaussianDiffusion(sched, prediction="v")
    den = GaussianDataDenoiser(diff, 0.0, 1.0)
    x_T = torch.linspace(-2, 2, 30, dtype=torch.float64).reshape(1, 1, 5, 6)
    out = samplers.ddim_sample(den, diff, x_T, 37, spacing=spacing)
    factor = 1.0
    for t, ab_p, _ in _ddim_steps(sched, 37, spacing, 0.0):
        ab = float(sched.alphas_cumprod[t])
        factor *= math.cos(math.acos(math.sqrt(ab)) - math.acos(math.sqrt(ab_p)))
    torch.testing.assert_close(out, factor * x_T, rtol=1e-12, atol=1e-12)


def test_ddim_eta1_over_all_steps_has_the_ddpm_posterior_variance():
    sched = NoiseSchedule.from_name("linear", num_timesteps=1000)
    diff = GaussianDiffusion(sched, prediction="x0")
    post = sched.betas * (1 - sched.alphas_cumprod_prev) / (1 - sched.alphas_cumprod)
    x_t, x0 = torch.randn(1, 1, 3, dtype=torch.float64), torch.randn(1, 1, 3, dtype=torch.float64)
    z = torch.ones_like(x_t)
    for t in (1, 2, 10, 300, 999):
        noisy = samplers.ddim_step(diff, x0, x_t, t, t - 1, eta=1.0, noise=z).prev_sample
        clean = samplers.ddim_step(diff, x0, x_t, t, t - 1, eta=1.0, noise=0 * z).prev_sample
        assert float((noisy - clean)[0, 0, 0]) ** 2 == pytest.approx(float(post[t]), rel=1e-9)
        mean = diff.q_posterior_mean_variance(x0, x_t, torch.tensor([t]))[0]
        torch.testing.assert_close(clean, mean)


def test_timestep_sequences():
    assert samplers.timestep_sequence(1000, 4, "leading").tolist() == [750, 500, 250, 0]
    assert samplers.timestep_sequence(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert samplers.timestep_sequence(1000, 4, "linspace").tolist() == [999, 666, 333, 0]
    assert samplers.timestep_sequence(10, 3, "leading").tolist() == [6, 3, 0]
    assert samplers.timestep_sequence(10, 10, "trailing").tolist() == list(range(9, -1, -1))
    with pytest.raises(ValueError, match=r"num_steps \(11\) must not exceed .* T = 10"):
        samplers.timestep_sequence(10, 11)
    with pytest.raises(ValueError, match="spacing: unknown value 'uniform'"):
        samplers.timestep_sequence(10, 5, "uniform")


def test_ddim_step_goes_to_the_next_element_not_t_minus_T_over_n():
    """The previous timestep is the next element of the sequence (T=10, n=3, trailing:
    9 -> 6 -> 2 -> final), recorded through the callback."""
    sched = NoiseSchedule.from_name("linear", num_timesteps=10, beta_end=0.2)
    diff = GaussianDiffusion(sched)
    seen = []
    samplers.ddim_sample(lambda x, t, c: torch.zeros_like(x), diff, torch.zeros(1, 1, 2), 3,
                         spacing="trailing", callback=lambda info: seen.append(info.t))
    assert seen == samplers.timestep_sequence(10, 3, "trailing").tolist() == [9, 6, 2]


@pytest.mark.parametrize(("prediction", "sigma_data"), [("eps", 1.0), ("edm", 0.5), ("edm", 2.0)],
                         ids=["eps", "edm-sd0.5", "edm-sd2"])
@pytest.mark.parametrize("shape", FIELD_SHAPES)
def test_inversion_round_trip(shape, prediction, sigma_data):
    sched, diff, den, mu, std = _gaussian_setup(shape, prediction=prediction, sigma_data=sigma_data)
    g = torch.Generator().manual_seed(3)
    x0 = mu + std * torch.randn(16, *shape, generator=g, dtype=torch.float64)

    def rel_err(n, refine):
        x_T = samplers.ddim_invert(den, diff, x0, n, refine_steps=refine)
        return float((samplers.ddim_sample(den, diff, x_T, n) - x0).norm() / x0.norm())

    refined = {n: rel_err(n, 3) for n in (20, 50, 100)}
    plain50 = rel_err(50, 0)
    assert refined[50] < 1e-3
    assert refined[20] > refined[50] > refined[100]
    assert plain50 > 10 * refined[50]


def test_inversion_is_exact_for_unit_gaussian_data():
    """For N(0, 1) data each DDIM step is a scalar multiple, so the refined inversion's
    fixed point is the exact inverse: the round trip is exact to rounding."""
    sched = NoiseSchedule.from_name("linear", num_timesteps=1000)
    diff = GaussianDiffusion(sched)
    den = GaussianDataDenoiser(diff, 0.0, 1.0)
    x0 = torch.randn(2, 1, 9, dtype=torch.float64)
    x_T = samplers.ddim_invert(den, diff, x0, 25, refine_steps=40)
    torch.testing.assert_close(samplers.ddim_sample(den, diff, x_T, 25), x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sigma_data", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("shape", FIELD_SHAPES)
def test_edm_samples_equal_v_samples_with_the_exact_denoiser(shape, sigma_data):
    """With the exact denoiser every parameterisation gives the same reverse process, so EDM
    samples equal v samples to float64 rounding for any sigma_data (for sd = 1 F = -v exactly):
    DDPM, DDIM with each spacing and eta in {0, 0.7}, and DDIM inversion."""
    T = 100
    _, v_diff, v_den, mu, std = _gaussian_setup(shape, T=T, prediction="v")
    _, e_diff, e_den, _, _ = _gaussian_setup(shape, T=T, prediction="edm", sigma_data=sigma_data)
    x_T = torch.randn(6, *shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    def both(fn):
        a, b = fn(v_den, v_diff), fn(e_den, e_diff)
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
        return a

    both(lambda den, d: samplers.ddpm_sample(den, d, x_T, generator=torch.Generator().manual_seed(1)))
    for spacing in ("leading", "trailing", "linspace"):
        for eta in (0.0, 0.7):
            both(lambda den, d: samplers.ddim_sample(den, d, x_T, 20, eta=eta, spacing=spacing,
                                                     generator=torch.Generator().manual_seed(2)))
    x0 = mu + std * x_T
    z = both(lambda den, d: samplers.ddim_invert(den, d, x0, 50, spacing="trailing"))
    back = samplers.ddim_sample(e_den, e_diff, z, 50, spacing="trailing")
    assert float((back - x0).norm() / x0.norm()) < 1e-3  # T = 100, 50 steps, 3 refinements: 8e-5


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_zero_terminal_snr_edm_samples_the_data_law(sigma_data):
    """Zero terminal SNR (ab_{T-1} = 0, c_skip = 0, c_out = sd, c_in = 1 there) with EDM and
    trailing DDIM, which starts at t = T - 1: finite, equal to v's samples, and the exact law."""
    shape = (1, 6, 10)
    sched, e_diff, e_den, mu, std = _gaussian_setup(shape, prediction="edm", sigma_data=sigma_data, ztsnr=True)
    _, v_diff, v_den, _, _ = _gaussian_setup(shape, prediction="v", ztsnr=True)
    x_T = torch.randn(400, *shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = samplers.ddim_sample(e_den, e_diff, x_T, 50, spacing="trailing")
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x, samplers.ddim_sample(v_den, v_diff, x_T, 50, spacing="trailing"),
                               rtol=1e-9, atol=1e-9)
    m, v = _exact_law(sched, mu, std, _ddim_steps(sched, 50, "trailing", 0.0), 0.0)
    _assert_moments(x, m, v)


def _affine_dummy(x, t, cond):
    """A deterministic stand-in for a trained model: eps^ = 0.1 x + t / 1000."""
    return 0.1 * x + (t.to(x.dtype) / 1000).reshape(-1, *[1] * (x.ndim - 1))


def test_ddpm_loop_matches_algorithm_2_transcribed():
    """DDPM Algorithm 2, written out in Python floats with the paper's symbols
    (t = T..1, sigma_t^2 = beta~_t), against ddpm_sample with the same noise draws."""
    T = 50
    sched = NoiseSchedule.from_name("linear", num_timesteps=T)
    diff = GaussianDiffusion(sched)
    x_T = torch.tensor([[[0.3, -1.2, 2.0]]], dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    zs = [torch.randn(x_T.shape, generator=g, dtype=torch.float64) for _ in range(T - 1)]
    out = samplers.ddpm_sample(_affine_dummy, diff, x_T, generator=torch.Generator().manual_seed(7))

    beta = sched.betas.tolist()
    abar = sched.alphas_cumprod.tolist()
    x = x_T[0, 0].tolist()
    for step, t in enumerate(range(T, 0, -1)):  # paper time t <-> our index t - 1
        b, ab = beta[t - 1], abar[t - 1]
        ab_prev = abar[t - 2] if t > 1 else 1.0
        sigma = math.sqrt((1 - ab_prev) / (1 - ab) * b)
        z = zs[step][0, 0].tolist() if t > 1 else [0.0] * 3
        eps = [0.1 * xi + (t - 1) / 1000 for xi in x]
        x = [1 / math.sqrt(1 - b) * (xi - b / math.sqrt(1 - ab) * ei) + sigma * zi for xi, ei, zi in zip(x, eps, z)]
    torch.testing.assert_close(out[0, 0], torch.tensor(x, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def _shrinking_dummy(x, t, cond):
    """eps^ = 0.9 (t + 1) / 100 x + 0.01: roughly the shape of a trained model's output."""
    return 0.009 * (t.to(x.dtype) + 1).reshape(-1, *[1] * (x.ndim - 1)) * x + 0.01


def test_pinned_sampling_loops():
    """Regression pins (float32, CPU) of full loops with a deterministic dummy model."""
    sched = NoiseSchedule.from_name("linear", num_timesteps=100)
    diff = GaussianDiffusion(sched)
    x_T = torch.randn(2, 1, 4, 6, generator=torch.Generator().manual_seed(0))
    ddpm = samplers.ddpm_sample(_shrinking_dummy, diff, x_T, generator=torch.Generator().manual_seed(1))
    ddim = samplers.ddim_sample(_shrinking_dummy, diff, x_T, 10, spacing="trailing")
    ddim_eta = samplers.ddim_sample(
        _shrinking_dummy, diff, x_T, 10, eta=0.5, generator=torch.Generator().manual_seed(1)
    )
    got = [float(v.sum()) for v in (ddpm, ddim, ddim_eta)] + [float(ddim[0, 0, 1, 2])]
    assert got == pytest.approx(PINNED, rel=1e-4)


PINNED = [5.26351, -6.23031, -8.55835, 2.381853]


def test_per_sample_generators_make_samples_independent_of_the_batch():
    sched = NoiseSchedule.from_name("linear", num_timesteps=50)
    diff = GaussianDiffusion(sched)
    x_T = torch.randn(4, 1, 7, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]
    together = samplers.ddpm_sample(_affine_dummy, diff, x_T, generator=gens)
    alone = samplers.ddpm_sample(_affine_dummy, diff, x_T[2:3], generator=[torch.Generator().manual_seed(102)])
    torch.testing.assert_close(together[2:3], alone)
    with pytest.raises(ValueError, match="generator: got a list of 2 generators for a batch of 4"):
        samplers.ddpm_sample(_affine_dummy, diff, x_T, generator=gens[:2])


def test_sampler_bad_input():
    sched = NoiseSchedule.from_name("linear", num_timesteps=20, beta_end=0.2)
    diff = GaussianDiffusion(sched)
    with pytest.raises(ValueError, match=r"num_steps \(21\)"):
        samplers.ddim_sample(_affine_dummy, diff, torch.zeros(1, 1, 4), 21)
    with pytest.raises(ValueError, match="x_T must be"):
        samplers.ddim_sample(_affine_dummy, diff, torch.zeros(4), 5)
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        samplers.ddim_sample(_affine_dummy, diff, torch.zeros(1, 1, 4), 5, final_alpha_cumprod="zero")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        samplers.ddim_sample(_affine_dummy, diff, torch.zeros(1, 1, 4), 5, eta=-1.0)

"""The probability-flow ODE likelihood against exact Gaussian log-densities.

With the exact denoiser the flow maps the smoothed data N(mu, s^2 + sigma_0^2) onto
the noisy marginals exactly, so the ODE NLL is the exact NLL of the data smoothed at
the first noise level (sigma_0^2 = beta_0 / (1 - beta_0) = 1e-4 for the linear
schedule) up to the integration error and the prior mismatch at T - 1. Measured
(100 Heun steps, linear T = 1000): 3e-3 bits/dim from the smoothed NLL, 4e-3 from the
exact NLL. The stationary Gaussian random field uses the Wiener-filter denoiser, which
couples all points (dense Jacobian), so Hutchinson's estimate has a real error bar.
"""

import math

import pytest
import torch

from scidiff.diffusion import GaussianDiffusion, NoiseSchedule, likelihood, ode_likelihood
from scidiff.diffusion.analytic import GaussianDataDenoiser, GaussianFieldDenoiser
from tests.diffusion.test_likelihood_variance import exact_gamma, expected_bound

LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sigma0_sq(diff):
    ab = float(diff.schedule.alphas_cumprod[0])
    return (1 - ab) / ab


def power_spectrum(shape, amplitude=1.0, index=2.5):
    """P(k) = A |k|^-n on the fftn modes of ``shape`` (radians per grid spacing), P(0) = A k_min^-n."""
    axes = torch.meshgrid(*[2 * math.pi * torch.fft.fftfreq(n, dtype=torch.float64) for n in shape], indexing="ij")
    k = torch.sqrt(sum(a**2 for a in axes))
    k[(0,) * len(shape)] = 2 * math.pi / max(shape)
    return (amplitude * k**-index)[None]


@pytest.mark.parametrize(("prediction", "sigma_data"), [("eps", 1.0), ("x0", 1.0), ("v", 1.0), ("edm", 0.5),
                                                       ("edm", 2.0)])
@pytest.mark.parametrize("shape", [(1, 16), (2, 4, 4), (1, 2, 2, 4)])
def test_exact_trace_matches_the_gaussian_nll(shape, prediction, sigma_data):
    diff = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=1000), prediction=prediction,
                             sigma_data=sigma_data)
    n = math.prod(shape)
    s = torch.linspace(0.3, 1.5, n, dtype=torch.float64).reshape(shape)
    mu = torch.linspace(-1.0, 1.0, n, dtype=torch.float64).reshape(shape)
    den = GaussianDataDenoiser(diff, mu, s)
    x0 = mu + s * torch.randn(6, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = likelihood.ode_nll(den, diff, x0, exact_trace=True, num_steps=100)
    exact = -den.log_prob(x0) / n / LN2
    smoothed = -den.log_prob(x0, _sigma0_sq(diff)) / n / LN2
    assert (out.bits_per_dim - exact).abs().max() < 0.01
    assert (out.bits_per_dim - smoothed).abs().max() < 0.005
    assert (out.standard_error_bits == 0).all()
    torch.testing.assert_close(out.nats_per_dim, out.prior - out.divergence)
    # the flow ends on the prior: x_{T-1} is standard normal per dimension for Gaussian data
    assert out.latent.shape == x0.shape and out.dims.tolist() == [float(n)] * 6


@pytest.mark.parametrize("exact", [True, False])
def test_divergence_is_that_of_the_full_map_including_c_in(exact):
    """A linear EDM model F = k * input: eps^(x_t) = (a_t + b_t k c_in_t) x_t with
    a_t, b_t the coefficients of predict_eps_from_edm, so d eps^ / d xbar = sqrt(ab) (a_t + b_t k c_in_t)
    per dimension; the trace (exact, or Rademacher probes on this diagonal Jacobian) must carry c_in."""
    sd, k = 0.5, 0.8
    diff = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=200), prediction="edm", sigma_data=sd)
    model = lambda x, t, c: k * x  # noqa: E731
    xbar = torch.randn(3, 1, 2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.ones_like(xbar)
    for t in (0, 60, 199):
        eps, div = ode_likelihood._eps_and_divergence(model, diff, xbar, t, None, w, 2, "rademacher", exact,
                                                      torch.Generator().manual_seed(1))
        ab = float(diff.schedule.alphas_cumprod[t])
        d_ = 1 - ab + ab * sd**2
        a, b, c_in = math.sqrt(1 - ab) / d_, -sd * math.sqrt(ab) / math.sqrt(d_), 1 / math.sqrt(d_)
        slope = a + b * k * c_in
        torch.testing.assert_close(eps, slope * math.sqrt(ab) * xbar)
        torch.testing.assert_close(div, torch.full_like(div, 10 * math.sqrt(ab) * slope))


def test_more_steps_converge_and_the_grid_is_fixed():
    diff = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=1000))
    den = GaussianDataDenoiser(diff, 0.0, 0.5)
    x0 = 0.5 * torch.randn(4, 1, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    smoothed = -den.log_prob(x0, _sigma0_sq(diff)) / 8 / LN2
    runs = [likelihood.ode_nll(den, diff, x0, exact_trace=True, num_steps=n) for n in (25, 50, 100)]
    errs = [float((r.bits_per_dim - smoothed).abs().max()) for r in runs]
    assert errs[0] > 2.5 * errs[1] > 6 * errs[2]  # second order: ~4x per doubling
    calls = []

    class Count(GaussianDataDenoiser):
        def forward(self, x, t, cond=None):
            calls.append(int(t[0]))
            return super().forward(x, t, cond)

    counted = Count(diff, 0.0, 0.5)
    grid = ode_likelihood.ode_timesteps(diff, 100)
    for data in (x0, 10 * x0):  # the same calls whatever the data: every DDP rank stays in step
        calls.clear()
        res = likelihood.ode_nll(counted, diff, data, num_probes=2, num_steps=100, generator=torch.Generator())
        assert len(calls) == res.num_evaluations == 2 * (grid.numel() - 1)
        assert sorted(set(calls)) == grid.tolist()
    assert grid[0] == 0 and grid[-1] == 999 and (grid.diff() > 0).all()


def test_hutchinson_confidence_interval_and_physical_units():
    diff = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=1000))
    s = torch.linspace(0.4, 1.2, 16, dtype=torch.float64).reshape(1, 16)
    den = GaussianDataDenoiser(diff, 0.0, s)
    x0 = s * torch.randn(8, 1, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    smoothed = -den.log_prob(x0, _sigma0_sq(diff)) / 16 / LN2
    g = torch.Generator().manual_seed(3)
    # a diagonal Jacobian: Rademacher probes give the exact trace, Gaussian probes do not
    rad = likelihood.ode_nll(den, diff, x0, num_probes=2, generator=g)
    assert (rad.standard_error_bits < 1e-12).all()
    gau = likelihood.ode_nll(den, diff, x0, num_probes=16, probe="gaussian", generator=g)
    assert (gau.standard_error_bits > 0.01).all()
    z = (gau.bits_per_dim - smoothed) / (gau.standard_error_bits**2 + 0.005**2).sqrt()
    assert z.abs().max() < 3.5 and float(z.pow(2).mean()) < 3.0
    lo, hi = gau.confidence_interval_bits
    torch.testing.assert_close(hi - lo, 2 * 1.96 * gau.standard_error_bits)
    # physical units: data c * x has log|det dz/dx| = -d log c, NLL + log c per dim, the exact NLL of c * x
    c = 3.0
    phys = likelihood.ode_nll(den, diff, x0, num_probes=2, log_det=torch.full((8,), -16 * math.log(c)), generator=g)
    torch.testing.assert_close(phys.nats_per_dim, rad.nats_per_dim + math.log(c))
    scaled = GaussianDataDenoiser(diff, 0.0, c * s)
    exact_phys = -scaled.log_prob(c * x0, c**2 * _sigma0_sq(diff)) / 16 / LN2
    assert (phys.bits_per_dim - exact_phys).abs().max() < 0.005
    # and the variational bound shifts by the same log c
    a = likelihood.variational_bound(den, diff, x0, generator=torch.Generator().manual_seed(0))
    b = likelihood.variational_bound(den, diff, x0, log_det=torch.full((8,), -16 * math.log(c)),
                                     generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(b.nats_per_dim, a.nats_per_dim + math.log(c))


def test_mask_weights_and_errors():
    diff = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=200))
    den = GaussianDataDenoiser(diff, 0.0, 0.7)
    x0 = 0.7 * torch.randn(3, 1, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask = torch.ones_like(x0)
    mask[..., 6:] = 0
    wild = x0.clone()
    wild[..., 6:] = 1e3
    a = likelihood.ode_nll(den, diff, x0, mask=mask, exact_trace=True, num_steps=50)
    b = likelihood.ode_nll(den, diff, wild, mask=mask, exact_trace=True, num_steps=50)
    torch.testing.assert_close(a.nats_per_dim, b.nats_per_dim)
    assert a.dims.tolist() == [6.0] * 3
    part = likelihood.ode_nll(den, diff, x0[..., :6], exact_trace=True, num_steps=50)
    torch.testing.assert_close(a.nats_per_dim, part.nats_per_dim)
    # uniform weights change nothing; 0/1 weights are a mask as far as the per-dimension mean goes
    full = likelihood.ode_nll(den, diff, x0, exact_trace=True, num_steps=50)
    torch.testing.assert_close(likelihood.ode_nll(den, diff, x0, exact_trace=True, num_steps=50,
                                                  weights=torch.full((10,), 2.0)).nats_per_dim, full.nats_per_dim)
    torch.testing.assert_close(likelihood.ode_nll(den, diff, x0, exact_trace=True, num_steps=50,
                                                  weights=mask[0, 0]).nats_per_dim * 10 / 6,
                               a.nats_per_dim * 10 / 6)
    with pytest.raises(ValueError, match="num_probes"):
        likelihood.ode_nll(den, diff, x0, num_probes=1)
    with pytest.raises(ValueError, match="probe: unknown"):
        likelihood.ode_nll(den, diff, x0, probe="sphere")
    ztsnr = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=50, zero_terminal_snr=True),
                              prediction="v")
    with pytest.raises(ValueError, match="alpha_bar > 0"):
        likelihood.ode_nll(GaussianDataDenoiser(ztsnr, 0.0, 1.0), ztsnr, x0)


# ----------------------------------------------------- stationary Gaussian field
def test_grf_denoiser_is_the_wiener_filter():
    diff = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=100))
    P = power_spectrum((8, 6))
    den = GaussianFieldDenoiser(diff, P)
    x = den.sample(4000, generator=torch.Generator().manual_seed(5))
    power = torch.fft.fftn(x, dim=(2, 3)).abs().pow(2).mean(0) / 48
    torch.testing.assert_close(power, P, rtol=0.1, atol=0.0)
    # a white spectrum is the elementwise denoiser
    white = GaussianFieldDenoiser(diff, torch.full((2, 5, 4), 0.3, dtype=torch.float64))
    ref = GaussianDataDenoiser(diff, 0.0, math.sqrt(0.3))
    x_t = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    t = torch.tensor([0, 50, 99])
    torch.testing.assert_close(white(x_t, t), ref(x_t, t))
    torch.testing.assert_close(white.log_prob(x_t), ref.log_prob(x_t))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianFieldDenoiser(diff, torch.rand(1, 8, 6, dtype=torch.float64) + 0.1)


def test_grf_ode_and_bound_match_the_exact_likelihood():
    """2-D GRF (P = k^-2.5): the ODE NLL (Hutchinson, dense Jacobian) within its interval
    and 0.01 bits/dim of the exact log-density; the optimal-variance bound within its
    standard error of NLL + the closed-form gap (< 1e-3 bits/dim), fixed_large far above."""
    diff = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=1000))
    shape = (12, 12)
    P = power_spectrum(shape)
    den = GaussianFieldDenoiser(diff, P)
    n = math.prod(shape)
    x0 = den.sample(6, generator=torch.Generator().manual_seed(6))
    exact = -den.log_prob(x0) / n / LN2
    smoothed = -den.log_prob(x0, _sigma0_sq(diff)) / n / LN2
    out = likelihood.ode_nll(den, diff, x0, num_probes=8, num_steps=100, generator=torch.Generator().manual_seed(7))
    assert (out.standard_error_bits > 1e-4).all()  # the Wiener filter couples points
    assert ((out.bits_per_dim - smoothed).abs() < 3.5 * out.standard_error_bits + 0.005).all()
    assert (out.bits_per_dim - exact).abs().mean() < 0.01
    small = GaussianFieldDenoiser(diff, power_spectrum((4, 4)))
    x_small = small.sample(4, generator=torch.Generator().manual_seed(8))
    exact_trace = likelihood.ode_nll(small, diff, x_small, exact_trace=True, num_steps=100)
    assert (exact_trace.bits_per_dim + small.log_prob(x_small) / 16 / LN2).abs().max() < 0.01

    # the bound: every real Fourier mode is an independent Gaussian with variance P_m
    s2 = P.flatten()
    sigma2 = likelihood.optimal_variance_from_gamma(diff, exact_gamma(diff, s2))
    data = den.sample(48, generator=torch.Generator().manual_seed(9))
    nll = -den.log_prob(data) / n
    nll_expected = float((0.5 * torch.log(2 * math.pi * math.e * s2)).mean())
    for choice, table in (("optimal", sigma2), ("fixed_large", diff._tables64["fixed_large_log_variance"].exp())):
        bound = likelihood.variational_bound(den, diff, data, variance=table if choice == "optimal" else choice,
                                             timestep_batch=250, generator=torch.Generator().manual_seed(10))
        d = (bound.nats_per_dim - nll) / LN2
        terms, prior = expected_bound(diff, s2, table)
        closed = (float(terms.sum() + prior) - nll_expected) / LN2
        assert abs(float(d.mean()) - closed) < 4 * float(d.std()) / math.sqrt(len(d)) + 1e-3, (choice, closed)
        if choice == "optimal":
            assert closed < 2e-3
        else:
            assert closed > 0.1

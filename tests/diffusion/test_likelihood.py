"""The variational bound against its closed form for Gaussian data and the exact denoiser.

For x_0 ~ N(0, s^2) and the exact denoiser, x0^ = E[x_0 | x_t] and the posterior
variance V_t = Var[x_0 | x_t] = s^2 (1 - ab_t) / (ab_t s^2 + 1 - ab_t) is constant, so
each expected term has a closed form (sigma_t^2 the reverse variance, c1 the posterior
mean's x_0 coefficient):

    E L_t = 1/2 [ log(sigma_t^2 / beta~_t) + beta~_t / sigma_t^2 - 1 + c1_t^2 V_t / sigma_t^2 ]
    E L_0 = 1/2 log(2 pi sigma_0^2) + V_0 / (2 sigma_0^2)
"""

import math

import pytest
import torch

from scidiff.diffusion import GaussianDiffusion, NoiseSchedule, likelihood
from scidiff.diffusion.analytic import GaussianDataDenoiser


def _expected_terms(diff, s):
    sch = diff.schedule
    ab, ab_prev, beta = sch.alphas_cumprod, sch.alphas_cumprod_prev, sch.betas
    post = beta * (1 - ab_prev) / (1 - ab)
    c1 = beta * ab_prev.sqrt() / (1 - ab)
    V = s**2 * (1 - ab) / (ab * s**2 + 1 - ab)
    sigma2 = torch.exp(diff._tables64["posterior_log_variance_clipped" if diff.variance == "fixed_small"
                                     else "fixed_large_log_variance"])
    terms = 0.5 * (torch.log(sigma2 / post) + post / sigma2 - 1 + c1**2 * V / sigma2)
    terms[0] = 0.5 * math.log(2 * math.pi * sigma2[0]) + V[0] / (2 * sigma2[0])
    return terms


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("shape", [(1, 64), (1, 8, 8), (1, 4, 4, 4)])
def test_bound_terms_match_their_closed_form(variance, shape):
    sched = NoiseSchedule.from_name("linear", num_timesteps=200)
    diff = GaussianDiffusion(sched, variance=variance)
    s = 0.5
    den = GaussianDataDenoiser(diff, 0.0, s)
    g = torch.Generator().manual_seed(0)
    x0 = s * torch.randn(64, *shape, generator=g, dtype=torch.float64)
    bound = likelihood.variational_bound(den, diff, x0, generator=g, timestep_batch=64)
    assert bound.terms.shape == (64, 200)
    expected = _expected_terms(diff, s)
    got = bound.terms.mean(dim=0)
    # each term is an average over 64 x 64 (sample, point) draws; compare the sum and the big terms
    assert float(got.sum()) == pytest.approx(float(expected.sum()), rel=0.03)
    torch.testing.assert_close(got[1:50], expected[1:50], rtol=0.1, atol=0.02)
    # prior term: KL(N(sqrt(ab) x0, 1 - ab) || N(0, 1)) in closed form
    ab = float(sched.alphas_cumprod[-1])
    prior = 0.5 * (ab * (x0**2).mean(dim=tuple(range(1, x0.ndim))) + (1 - ab) - 1 - math.log(1 - ab))
    torch.testing.assert_close(bound.prior, prior)
    # the bound is an upper bound on the exact NLL of the data (on average)
    nll = 0.5 * math.log(2 * math.pi * s**2) + (x0**2).mean(dim=tuple(range(1, x0.ndim))) / (2 * s**2)
    assert float(bound.nats_per_dim.mean()) > float(nll.mean())
    torch.testing.assert_close(bound.bits_per_dim, bound.nats_per_dim / math.log(2))


def test_importance_sampled_estimate_is_unbiased():
    sched = NoiseSchedule.from_name("linear", num_timesteps=100)
    diff = GaussianDiffusion(sched, variance="fixed_large")
    den = GaussianDataDenoiser(diff, 0.0, 1.0)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 1, 32, generator=g, dtype=torch.float64)
    exact = _expected_terms(diff, 1.0)
    # a proposal proportional to the expected terms cuts the standard error
    est = likelihood.estimate_bound(den, diff, x0, num_terms=8, proposal=exact, generator=g)
    uniform = likelihood.estimate_bound(den, diff, x0, num_terms=8, generator=g)
    full = likelihood.variational_bound(den, diff, x0, generator=g)
    assert float(est.standard_error_bits.mean()) < 0.7 * float(uniform.standard_error_bits.mean())
    gap_bits = float((est.bits_per_dim - full.bits_per_dim).mean())
    assert abs(gap_bits) < 5 * float(est.standard_error_bits.pow(2).mean().sqrt()) / math.sqrt(16) + 0.05
    runs = torch.stack([likelihood.estimate_bound(den, diff, x0, num_terms=8, generator=g).nats_per_dim
                        for _ in range(40)])
    se = float(runs.mean(dim=1).std() / math.sqrt(40))
    assert abs(float(runs.mean()) - float(full.nats_per_dim.mean())) < 4 * se + 1e-3
    torch.testing.assert_close(est.prior, full.prior)


def test_masked_points_and_log_det():
    sched = NoiseSchedule.from_name("linear", num_timesteps=50)
    diff = GaussianDiffusion(sched)
    den = GaussianDataDenoiser(diff, 0.0, 1.0)
    x0 = torch.randn(2, 1, 10, dtype=torch.float64)
    mask = torch.ones_like(x0)
    mask[..., 5:] = 0
    wild = x0.clone()
    wild[..., 5:] = 1e3  # masked points may hold anything
    a = likelihood.variational_bound(den, diff, x0, mask=mask, generator=torch.Generator().manual_seed(0))
    b = likelihood.variational_bound(den, diff, wild, mask=mask, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.nats_per_dim, b.nats_per_dim)
    assert a.dims.tolist() == [5.0, 5.0]
    # z = x / 2 has log|dz/dx| = -log 2 per point: the physical NLL per dim rises by log 2
    log_det = torch.full((2,), -5 * math.log(2.0), dtype=torch.float64)
    c = likelihood.variational_bound(den, diff, x0, mask=mask, log_det=log_det,
                                     generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(c.nats_per_dim, a.nats_per_dim + math.log(2.0))
    with pytest.raises(ValueError, match="log_det must have shape"):
        likelihood.variational_bound(den, diff, x0, log_det=torch.zeros(3))


@pytest.mark.parametrize("sigma_data", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("shape", [(1, 12), (2, 3, 4), (1, 2, 3, 2)])
def test_edm_bound_equals_the_v_bound(shape, sigma_data):
    """The exact denoiser gives the same reverse process whatever the parameterisation, so
    the bound of EDM equals that of v term by term (same noise draws), for the diffusion's
    own variance, fixed_large and the Analytic-DPM optimum (itself the same table)."""
    sched = NoiseSchedule.from_name("linear", num_timesteps=100)
    v = GaussianDiffusion(sched, prediction="v")
    edm = GaussianDiffusion(sched, prediction="edm", sigma_data=sigma_data)
    mu, s = 0.3, 0.8
    v_den, e_den = GaussianDataDenoiser(v, mu, s), GaussianDataDenoiser(edm, mu, s)
    x0 = mu + s * torch.randn(8, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    opt_v = likelihood.estimate_optimal_variance(v_den, v, x0, generator=torch.Generator().manual_seed(1))
    opt_e = likelihood.estimate_optimal_variance(e_den, edm, x0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(opt_e, opt_v, rtol=1e-9, atol=0)
    for variance in (None, "fixed_large", opt_v):
        a = likelihood.variational_bound(v_den, v, x0, variance=variance, generator=torch.Generator().manual_seed(2))
        b = likelihood.variational_bound(e_den, edm, x0, variance=variance, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(b.terms, a.terms, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b.nats_per_dim, a.nats_per_dim, rtol=1e-10, atol=0)
    est_v = likelihood.estimate_bound(v_den, v, x0, num_terms=4, generator=torch.Generator().manual_seed(3))
    est_e = likelihood.estimate_bound(e_den, edm, x0, num_terms=4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(est_e.nats_per_dim, est_v.nats_per_dim, rtol=1e-10, atol=0)

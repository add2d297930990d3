"""What ``estimate_bound`` returns besides the estimate: its sampled timesteps and terms.

For x_0 ~ N(0, s^2) and the exact denoiser every expected term has a closed form
(``test_likelihood._expected_terms``). Pinned here: the sampled terms are exactly the
terms of ``timestep_terms`` at the returned timesteps (same noise draws), the weighted
terms are L_t / pi(t) and their mean is the reported estimate, and the per-timestep
(Horvitz-Thompson) estimates are unbiased for each L_t and sum to the estimate.
"""

import math

import pytest
import torch

from scidiff.diffusion import GaussianDiffusion, NoiseSchedule, likelihood
from scidiff.diffusion.analytic import GaussianDataDenoiser
from tests.diffusion.test_likelihood import _expected_terms


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def setup(T=50, variance="fixed_large"):
    diff = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=T), variance=variance)
    return diff, GaussianDataDenoiser(diff, 0.0, 0.5)


def test_sampled_timesteps_and_terms_are_those_of_the_estimate():
    diff, den = setup()
    x0 = 0.5 * torch.randn(4, 1, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    proposal = torch.linspace(2.0, 1.0, 50, dtype=torch.float64)
    est = likelihood.estimate_bound(den, diff, x0, num_terms=12, proposal=proposal,
                                    generator=torch.Generator().manual_seed(5))
    assert est.timesteps.shape == (12,) and est.timesteps.dtype == torch.int64 and int(est.timesteps.min()) >= 1
    assert est.terms.shape == est.weighted_terms.shape == (4, 12)
    pi = proposal.clone()
    pi[0] = 0
    pi = pi / pi.sum()
    torch.testing.assert_close(est.proposal, pi)
    torch.testing.assert_close(est.weighted_terms, est.terms / pi[est.timesteps])
    # the same draws, replayed through the public pieces: t_k, then L_0, then L_{t_k}
    g = torch.Generator().manual_seed(5)
    ts = torch.multinomial(pi, 12, replacement=True, generator=g)
    recon = likelihood.timestep_terms(den, diff, x0, torch.zeros(1, dtype=torch.long), generator=g)[:, 0]
    terms = likelihood.timestep_terms(den, diff, x0, ts, generator=g)
    torch.testing.assert_close(est.timesteps, ts)
    torch.testing.assert_close(est.reconstruction, recon)
    torch.testing.assert_close(est.terms, terms)
    # the estimate is prior + L_0 + mean_k L_{t_k} / pi(t_k), and so are the per-timestep estimates' sums
    total = est.prior + est.reconstruction + est.weighted_terms.mean(dim=1)
    torch.testing.assert_close(est.nats_per_dim, total)
    per_t = est.per_timestep()
    assert per_t.shape == (4, 50)
    torch.testing.assert_close(per_t.sum(dim=1) + est.prior, est.nats_per_dim)
    drawn = torch.zeros(50, dtype=torch.bool)
    drawn[est.timesteps] = True
    assert torch.all(per_t[:, 1:][:, ~drawn[1:]] == 0) and torch.all(per_t[:, drawn] > 0)  # KLs (L_0 is a density)


def test_per_timestep_estimates_are_unbiased():
    """Averaged over independent draws, each block of per-timestep estimates matches its
    closed-form expectation within 4 standard errors (uniform proposal)."""
    diff, den = setup()
    g = torch.Generator().manual_seed(2)
    x0 = 0.5 * torch.randn(8, 1, 32, generator=g, dtype=torch.float64)
    runs = torch.stack([likelihood.estimate_bound(den, diff, x0, num_terms=25, generator=g).per_timestep().mean(0)
                        for _ in range(60)])  # [R, T]
    expected = _expected_terms(diff, 0.5)
    blocks = [(0, 1), (1, 3), (3, 10), (10, 25), (25, 50)]
    for lo, hi in blocks:
        per_run = runs[:, lo:hi].sum(dim=1)
        se = float(per_run.std() / math.sqrt(runs.shape[0]))
        want = float(expected[lo:hi].sum())
        assert abs(float(per_run.mean()) - want) < 4 * se + 0.02 * abs(want), (lo, hi)
    # each timestep is drawn about 60 * 25 / 49 ~ 31 times: every one at least once
    assert bool((runs[:, 1:] > 0).any(dim=0).all())


def test_an_old_style_estimate_without_terms_says_so():
    est = likelihood.BoundEstimate(*(torch.zeros(1) for _ in range(5)))
    assert est.timesteps is None and est.weighted_terms is None
    with pytest.raises(ValueError, match="no sampled terms"):
        est.per_timestep()

"""Ensemble scores against closed forms and direct O(M^2) computations."""

import math

import numpy as np
import pytest
import torch

from scidiff.evaluation import (
    CRPS,
    EnergyScore,
    RankHistogram,
    SpreadSkillRatio,
    crps_ensemble,
    energy_score,
    gaussian_crps,
)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _crps_reference(forecasts: np.ndarray, obs: np.ndarray, fair: bool) -> np.ndarray:
    """Direct O(M^2) CRPS, [B, M, ...] against [B, ...]."""
    m = forecasts.shape[1]
    skill = np.abs(forecasts - obs[:, None]).mean(axis=1)
    pairs = np.zeros_like(obs, dtype=np.float64)
    for i in range(m):
        for j in range(m):
            pairs += np.abs(forecasts[:, i] - forecasts[:, j])
    return skill - pairs / (2 * m * ((m - 1) if fair else m))


def test_crps_of_large_gaussian_ensemble_matches_closed_form():
    g = _generator(0)
    mean = torch.randn(2, 1, 5, 3, generator=g, dtype=torch.float64)
    std = 0.5 + torch.rand(2, 1, 5, 3, generator=g, dtype=torch.float64)
    obs = mean + 1.5 * std * torch.randn(2, 1, 5, 3, generator=g, dtype=torch.float64)
    members = mean.unsqueeze(1) + std.unsqueeze(1) * torch.randn(
        2, 20000, 1, 5, 3, generator=g, dtype=torch.float64
    )
    exact = gaussian_crps(mean, std, obs)
    for estimator in ("fair", "ensemble"):
        crps = crps_ensemble(members, obs, estimator)
        # Monte-Carlo error of a 20000-member CRPS is ~ std / sqrt(M) ~ 0.007 std
        assert torch.allclose(crps, exact, atol=0.03 * float(std.max()))
        assert abs(float((crps - exact).mean())) < 0.005


def test_fair_crps_is_unbiased_and_ensemble_crps_is_not():
    # M = 3 members and the observation from N(0, 1): the fair CRPS averages to the
    # CRPS of N(0, 1); the ensemble CRPS exceeds it by E|X - X'| / (2M) = 1 / (M sqrt(pi)).
    g = _generator(1)
    m, n = 3, 200_000
    obs = torch.randn(1, 1, n, generator=g, dtype=torch.float64)
    members = torch.randn(1, m, 1, n, generator=g, dtype=torch.float64)
    exact = gaussian_crps(torch.zeros(()), torch.ones(()), obs)
    fair = crps_ensemble(members, obs, "fair") - exact
    plain = crps_ensemble(members, obs, "ensemble") - exact
    se_fair = float(fair.std() / math.sqrt(n))
    se_plain = float(plain.std() / math.sqrt(n))
    assert abs(float(fair.mean())) < 4 * se_fair
    assert abs(float(plain.mean()) - 1 / (m * math.sqrt(math.pi))) < 4 * se_plain
    assert float(plain.mean()) > 0.15  # the bias 0.188 is far outside the noise


def test_crps_metric_matches_direct_computation_with_mask_and_weights():
    g = _generator(2)
    forecasts = torch.randn(3, 6, 2, 7, 4, generator=g, dtype=torch.float64)
    obs = torch.randn(3, 2, 7, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 1, 7, 4, generator=g) > 0.3
    coslat = torch.cos(torch.linspace(-1.2, 1.2, 7, dtype=torch.float64)).reshape(7, 1)
    obs_with_nan = torch.where(mask, obs, torch.nan)  # missing values stored as NaN
    for estimator, fair in (("fair", True), ("ensemble", False)):
        metric = CRPS(num_channels=2, estimator=estimator)
        metric.update(forecasts[:2], obs_with_nan[:2], mask=mask[:2], weights=coslat)
        metric.update(forecasts[2:], obs_with_nan[2:], mask=mask[2:], weights=coslat)
        reference = _crps_reference(forecasts.numpy(), obs.numpy(), fair)
        w = (mask.numpy() * coslat.numpy()) * np.ones_like(reference)
        expected = (w * reference).sum(axis=(0, 2, 3)) / w.sum(axis=(0, 2, 3))
        np.testing.assert_allclose(metric.compute().numpy(), expected, rtol=1e-12)


def test_crps_map_and_single_member_mae():
    g = _generator(3)
    forecasts = torch.randn(5, 1, 1, 6, generator=g, dtype=torch.float64)
    obs = torch.randn(5, 1, 6, generator=g, dtype=torch.float64)
    metric = CRPS(num_channels=1, estimator="ensemble", spatial_shape=(6,))
    metric.update(forecasts, obs)
    mae_map = (forecasts[:, 0] - obs).abs().mean(dim=0)
    assert torch.allclose(metric.compute(), mae_map)
    with pytest.raises(ValueError, match="2 members"):
        crps_ensemble(forecasts, obs, "fair")
    with pytest.raises(ValueError, match="estimator"):
        CRPS(num_channels=1, estimator="unfair")
    with pytest.raises(ValueError, match="average"):
        CRPS(num_channels=1, average="mean")


def test_spread_skill_ratio_is_one_for_calibrated_ensemble():
    g = _generator(4)
    m = 5
    mean = 3.0 * torch.randn(400, 1, 8, 6, generator=g, dtype=torch.float64)
    std = 0.2 + torch.rand(1, 1, 8, 6, generator=g, dtype=torch.float64)
    obs = mean + std * torch.randn(400, 1, 8, 6, generator=g, dtype=torch.float64)
    members = mean.unsqueeze(1) + std.unsqueeze(1) * torch.randn(
        400, m, 1, 8, 6, generator=g, dtype=torch.float64
    )
    metric = SpreadSkillRatio(num_channels=1)
    metric.update(members, obs)
    ratio = float(metric.compute())
    assert abs(ratio - 1.0) < 0.02
    # without the sqrt((M+1)/M) correction the ratio would be sqrt(5/6) = 0.913
    assert abs(ratio * math.sqrt(m / (m + 1)) - 0.913) < 0.02


def test_spread_skill_ratio_of_under_dispersed_ensemble_matches_closed_form():
    # members N(mu, 0.5^2), obs N(mu, 1): E s^2 = 0.25, E (mean - y)^2 = 1 + 0.25 / M
    g = _generator(5)
    m = 5
    mean = torch.randn(300, 2, 10, 10, generator=g, dtype=torch.float64)
    obs = mean + torch.randn(300, 2, 10, 10, generator=g, dtype=torch.float64)
    members = mean.unsqueeze(1) + 0.5 * torch.randn(
        300, m, 2, 10, 10, generator=g, dtype=torch.float64
    )
    metric = SpreadSkillRatio(num_channels=2)
    metric.update(members, obs)
    expected = math.sqrt((m + 1) / m * 0.25 / (1 + 0.25 / m))  # 0.5345
    assert torch.allclose(
        metric.compute(), torch.full((2,), expected, dtype=torch.float64), atol=0.01
    )
    # the skill, the ensemble mean's RMSE: closed form sqrt(1 + 0.25 / M), and exactly numpy's
    assert torch.allclose(metric.skill(), torch.full((2,), math.sqrt(1 + 0.25 / m), dtype=torch.float64), atol=0.01)
    direct = np.sqrt(((members.mean(1) - obs) ** 2).mean(dim=(0, 2, 3)).numpy())
    np.testing.assert_allclose(metric.skill().numpy(), direct, rtol=1e-12)


def test_energy_score_matches_direct_pairwise_computation():
    g = _generator(6)
    forecasts = torch.randn(4, 7, 2, 5, 3, generator=g, dtype=torch.float64)
    obs = torch.randn(4, 2, 5, 3, generator=g, dtype=torch.float64)
    weights = torch.rand(5, 3, generator=g, dtype=torch.float64)
    x = (forecasts * weights.sqrt()).reshape(4, 7, -1).numpy()
    y = (obs * weights.sqrt()).reshape(4, -1).numpy()
    for estimator, denominator in (("fair", 2 * 7 * 6), ("ensemble", 2 * 7 * 7)):
        expected = []
        for b in range(4):
            skill = np.mean([np.linalg.norm(x[b, i] - y[b]) for i in range(7)])
            pairs = sum(
                np.linalg.norm(x[b, i] - x[b, j]) for i in range(7) for j in range(7)
            )
            expected.append(skill - pairs / denominator)
        score = energy_score(forecasts, obs, estimator, weights=weights)
        np.testing.assert_allclose(score.numpy(), expected, rtol=1e-12)
        metric = EnergyScore(estimator=estimator)
        metric.update(forecasts[:1], obs[:1], weights=weights)
        metric.update(forecasts[1:], obs[1:], weights=weights)
        assert abs(float(metric.compute()) - np.mean(expected)) < 1e-12


def test_energy_score_of_a_single_point_is_the_crps():
    g = _generator(7)
    forecasts = torch.randn(6, 9, 1, 1, generator=g, dtype=torch.float64)
    obs = torch.randn(6, 1, 1, generator=g, dtype=torch.float64)
    for estimator in ("fair", "ensemble"):
        crps = crps_ensemble(forecasts, obs, estimator).reshape(6)
        assert torch.allclose(energy_score(forecasts, obs, estimator), crps, atol=1e-12)


def _rank_histogram(spread: float, m: int = 9, seed: int = 8) -> torch.Tensor:
    g = _generator(seed)
    mean = torch.randn(500, 1, 10, 10, generator=g, dtype=torch.float64)
    obs = mean + torch.randn(500, 1, 10, 10, generator=g, dtype=torch.float64)
    members = mean.unsqueeze(1) + spread * torch.randn(
        500, m, 1, 10, 10, generator=g, dtype=torch.float64
    )
    metric = RankHistogram(num_channels=1, num_members=m)
    metric.update(members, obs)
    return metric.compute()[0]


def test_rank_histogram_flat_for_calibrated_ensemble():
    freq = _rank_histogram(1.0)
    assert freq.shape == (10,)
    assert abs(float(freq.sum()) - 1) < 1e-12
    # 50 000 ranks: each frequency is 0.1 +- 0.0013
    assert torch.all((freq - 0.1).abs() < 0.006), freq


def test_rank_histogram_u_shaped_when_under_dispersed_and_dome_when_over_dispersed():
    narrow = _rank_histogram(0.5)
    assert narrow[0] > 0.2 and narrow[-1] > 0.2 and narrow[4] < 0.07, narrow
    wide = _rank_histogram(2.0)
    assert wide[0] < 0.03 and wide[-1] < 0.03 and wide[4] > 0.12, wide


def test_rank_histogram_shares_ties_and_counts_weights():
    # every member equals the observation: the rank is uniform over 0..M
    forecasts = torch.ones(2, 4, 1, 3)
    metric = RankHistogram(num_channels=1, num_members=4)
    metric.update(forecasts, torch.ones(2, 1, 3))
    assert torch.allclose(
        metric.compute(), torch.full((1, 5), 0.2, dtype=torch.float64)
    )
    # two points, ranks 0 and 4, weights 3 and 1
    forecasts = (
        torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 4, 1, 1).expand(1, 4, 1, 2)
    )
    obs = torch.tensor([[[-1.0, 5.0]]])
    metric = RankHistogram(num_channels=1, num_members=4)
    metric.update(forecasts, obs, weights=torch.tensor([3.0, 1.0]))
    assert torch.allclose(
        metric.compute(), torch.tensor([[0.75, 0, 0, 0, 0.25]], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="members"):
        metric.update(torch.zeros(1, 3, 1, 2), obs)

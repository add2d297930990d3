"""Probabilistic scores of an ensemble against observations.

Shapes: ensembles ``forecasts`` are ``[B, M, C, *S]`` (``M`` members of each of
``B`` forecasts), observations ``obs`` are ``[B, C, *S]``, with 1-3 spatial dims.
Scores are in the units of the field (CRPS, energy score) or dimensionless
(spread-skill ratio, rank histogram).

References:
    Gneiting & Raftery (2007), "Strictly proper scoring rules", JASA: CRPS and
    energy score, ``S(F, y) = E|X - y| - 1/2 E|X - X'|``.
    Ferro (2014), "Fair scores for ensemble forecasts", QJRMS: the fair CRPS,
    unbiased for the score of the distribution the members are drawn from.
    Fortin et al. (2014), "Why should ensemble spread match the RMSE of the
    ensemble mean?", J. Hydrometeor.: the ``sqrt((M + 1) / M)`` correction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from scidiff.evaluation.weighting import (
    Average,
    PointMeanMetric,
    point_weights,
    weighted,
)
from scidiff.shapes import check_field

Estimator = Literal["fair", "ensemble"]


def _check_estimator(estimator: str) -> str:
    if estimator not in ("fair", "ensemble"):
        raise ValueError(f"estimator must be 'fair' or 'ensemble', got {estimator!r}")
    return estimator


def check_ensemble(forecasts: Tensor, obs: Tensor) -> None:
    """Raise ``ValueError`` unless ``forecasts`` is ``[B, M, C, *S]`` and ``obs`` is ``[B, C, *S]``."""
    check_field(obs, "obs")
    if forecasts.ndim != obs.ndim + 1:
        raise ValueError(
            f"forecasts must be [B, M, C, *S] for obs {tuple(obs.shape)}, got {tuple(forecasts.shape)}"
        )
    if forecasts.shape[0] != obs.shape[0] or forecasts.shape[2:] != obs.shape[1:]:
        raise ValueError(
            f"forecasts {tuple(forecasts.shape)} do not match obs {tuple(obs.shape)} "
            "(expected [B, M, C, *S] against [B, C, *S])"
        )


def crps_ensemble(
    forecasts: Tensor, obs: Tensor, estimator: Estimator = "fair"
) -> Tensor:
    """Pointwise CRPS of an ensemble, in the units of the field.

    ``CRPS = 1/M sum_i |x_i - y| - 1/(2 M D) sum_{i,j} |x_i - x_j|`` with
    ``D = M - 1`` for the fair estimator (Ferro 2014: its expectation is the CRPS of
    the distribution the members come from, whatever ``M``) and ``D = M`` for the
    plain ensemble estimator (the CRPS of the empirical distribution, which
    penalises small ensembles). The pair sum is computed in ``O(M log M)`` from the
    sorted members: ``sum_{i,j} |x_i - x_j| = 2 sum_k (2k - M - 1) x_(k)``.

    Args:
        forecasts: ``[B, M, C, *S]`` ensemble members.
        obs: ``[B, C, *S]`` observations.
        estimator: ``"fair"`` (needs ``M >= 2``) or ``"ensemble"``.

    Returns:
        ``[B, C, *S]`` float64 CRPS at every point.
    """
    _check_estimator(estimator)
    check_ensemble(forecasts, obs)
    m = forecasts.shape[1]
    if estimator == "fair" and m < 2:
        raise ValueError("the fair CRPS needs at least 2 members")
    x = forecasts.to(torch.float64)
    y = obs.to(torch.float64).unsqueeze(1)
    skill = (x - y).abs().mean(dim=1)
    rank = torch.arange(1, m + 1, dtype=torch.float64, device=x.device)
    coef = (2.0 * rank - m - 1.0).reshape(1, m, *([1] * (x.ndim - 2)))
    pair_sum = 2.0 * (x.sort(dim=1).values * coef).sum(dim=1)
    denominator = 2.0 * m * ((m - 1) if estimator == "fair" else m)
    return skill - pair_sum / denominator


class CRPS(PointMeanMetric):
    """Mean continuous ranked probability score of ensembles, per channel.

    Lower is better; 0 for a perfect deterministic forecast; in the units of the
    field. For one member the (ensemble) CRPS is the mean absolute error.

    Args:
        num_channels: ``C``.
        estimator: ``"fair"`` (default, unbiased for the members' distribution) or
            ``"ensemble"`` (CRPS of the empirical ensemble distribution).
        spatial_shape: ``None`` for the mean over samples and points (``[C]``), or
            ``S`` for a CRPS map ``[C, *S]`` (mean over samples).
        average: ``"none"`` or ``"channels"``.

    Example:
        >>> import torch
        >>> metric = CRPS(num_channels=2)
        >>> metric.update(torch.randn(4, 8, 2, 16, 32), torch.randn(4, 2, 16, 32))
        >>> metric.compute().shape
        torch.Size([2])
    """

    higher_is_better = False

    def __init__(
        self,
        num_channels: int,
        estimator: Estimator = "fair",
        spatial_shape: Sequence[int] | None = None,
        average: Average = "none",
        **kwargs,
    ) -> None:
        super().__init__(num_channels, spatial_shape, average, **kwargs)
        self.estimator = _check_estimator(estimator)
        self._add_sum_state("crps_sum")
        self._add_sum_state("weight_sum")

    def update(
        self,
        forecasts: Tensor,
        obs: Tensor,
        mask: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> None:
        """Args: forecasts ``[B, M, C, *S]``; obs ``[B, C, *S]``; mask (1 = valid) and
        area weights broadcastable to ``obs``."""
        self._check_field(obs, "obs")
        w = point_weights(obs, mask, weights)
        crps = crps_ensemble(forecasts, obs, self.estimator)
        self.crps_sum += self._sum_points(weighted(w, crps))
        self.weight_sum += self._sum_points(w)

    def compute(self) -> Tensor:
        """Returns: ``[C]`` (or ``[C, *S]`` maps; a scalar with ``average="channels"``)."""
        return self._reduce_channels(self.crps_sum / self.weight_sum)


class SpreadSkillRatio(PointMeanMetric):
    """Spread-skill ratio ``sqrt((M + 1) / M) * spread / RMSE``, per channel.

    ``spread^2`` is the weighted mean of the unbiased ensemble variance (ddof 1)
    and ``RMSE^2`` the weighted mean squared error of the ensemble mean. For a
    calibrated ensemble (observation exchangeable with the members)
    ``E[(mean - y)^2] = (M + 1) / M * E[s^2]`` (Fortin et al. 2014), so the ratio is
    1; below 1 the ensemble is under-dispersed (over-confident), above 1 over-dispersed.
    The correction is applied per update, so ensembles of different sizes may mix.

    Args:
        num_channels: ``C``.
        spatial_shape: ``None`` for ``[C]``, or ``S`` for ratio maps ``[C, *S]``.
        average: ``"none"`` or ``"channels"`` (averages the per-channel ratios).
    """

    higher_is_better = None

    def __init__(
        self,
        num_channels: int,
        spatial_shape: Sequence[int] | None = None,
        average: Average = "none",
        **kwargs,
    ) -> None:
        super().__init__(num_channels, spatial_shape, average, **kwargs)
        self._add_sum_state("spread_sq_sum")  # sum w * (M + 1) / M * s^2
        self._add_sum_state("error_sq_sum")  # sum w * (mean - y)^2
        self._add_sum_state("weight_sum")

    def update(
        self,
        forecasts: Tensor,
        obs: Tensor,
        mask: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> None:
        """Args: forecasts ``[B, M, C, *S]`` with ``M >= 2``; obs ``[B, C, *S]``;
        mask and weights broadcastable to ``obs``."""
        check_ensemble(forecasts, obs)
        self._check_field(obs, "obs")
        m = forecasts.shape[1]
        if m < 2:
            raise ValueError("the spread-skill ratio needs at least 2 members")
        w = point_weights(obs, mask, weights)
        x = forecasts.to(torch.float64)
        variance = x.var(dim=1, correction=1)
        error_sq = (x.mean(dim=1) - obs.to(torch.float64)) ** 2
        self.spread_sq_sum += self._sum_points(weighted(w, variance)) * ((m + 1) / m)
        self.error_sq_sum += self._sum_points(weighted(w, error_sq))
        self.weight_sum += self._sum_points(w)

    def compute(self) -> Tensor:
        """Returns: ``[C]`` (or ``[C, *S]``; a scalar with ``average="channels"``), dimensionless."""
        return self._reduce_channels(torch.sqrt(self.spread_sq_sum / self.error_sq_sum))

    def skill(self) -> Tensor:
        """The ensemble mean's RMSE (the ratio's denominator), ``[C]`` (or ``[C, *S]``), in the
        units of the fields; summed over the ranks under DDP, as :meth:`compute` is."""
        with self.sync_context():
            return self._reduce_channels(torch.sqrt(self.error_sq_sum / self.weight_sum))


def energy_score(
    forecasts: Tensor,
    obs: Tensor,
    estimator: Estimator = "fair",
    mask: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Energy score of each ensemble over the whole field (all channels and points).

    ``ES = 1/M sum_i ||x_i - y|| - 1/(2 M D) sum_{i,j} ||x_i - x_j||`` with the
    weighted Euclidean norm ``||v||^2 = sum_p w_p v_p^2`` over all channels and
    points, ``D = M - 1`` (fair) or ``M`` (ensemble). The multivariate CRPS: it
    rewards members with the right spatial structure, not only the right
    marginals. Channels with different units should be normalised first.

    Args:
        forecasts: ``[B, M, C, *S]``; obs: ``[B, C, *S]``.
        estimator: ``"fair"`` or ``"ensemble"``.
        mask, weights: broadcastable to ``obs``.

    Returns:
        ``[B]`` float64 energy score per forecast.
    """
    _check_estimator(estimator)
    check_ensemble(forecasts, obs)
    b, m = forecasts.shape[:2]
    if estimator == "fair" and m < 2:
        raise ValueError("the fair energy score needs at least 2 members")
    root_w = point_weights(obs, mask, weights).sqrt().reshape(b, 1, -1)
    x = weighted(root_w, forecasts.to(torch.float64).reshape(b, m, -1))
    y = weighted(root_w, obs.to(torch.float64).reshape(b, 1, -1))
    skill = torch.linalg.vector_norm(x - y, dim=-1).mean(dim=1)
    pair_sum = torch.cdist(x, x).sum(dim=(1, 2))
    return skill - pair_sum / (2.0 * m * ((m - 1) if estimator == "fair" else m))


class EnergyScore(Metric):
    """Mean energy score over forecasts (lower is better; units of the field).

    Args:
        estimator: ``"fair"`` (default) or ``"ensemble"``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, estimator: Estimator = "fair", **kwargs) -> None:
        super().__init__(**kwargs)
        self.estimator = _check_estimator(estimator)
        self.add_state(
            "score_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(
        self,
        forecasts: Tensor,
        obs: Tensor,
        mask: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> None:
        """Args: forecasts ``[B, M, C, *S]``; obs ``[B, C, *S]``; mask, weights broadcastable to obs."""
        score = energy_score(forecasts, obs, self.estimator, mask, weights)
        self.score_sum += score.sum()
        self.count += score.numel()

    def compute(self) -> Tensor:
        """Returns: scalar mean energy score."""
        return self.score_sum / self.count


class RankHistogram(PointMeanMetric):
    """Rank of the observation among the members (Talagrand diagram), per channel.

    The rank of ``y`` is the number of members below it, ``0..M``; ties are
    shared equally among the tied ranks (the expectation of random tie-breaking,
    so quantised data give a deterministic histogram). A calibrated ensemble gives
    a flat histogram at ``1 / (M + 1)``; a U shape means under-dispersion (the
    observation often falls outside the ensemble), a dome over-dispersion, a slope
    a bias. Points count with their mask and area weights.

    Args:
        num_channels: ``C``.
        num_members: ``M``; every update must have this many members.
        average: ``"none"`` (``[C, M + 1]``) or ``"channels"`` (``[M + 1]``).
    """

    higher_is_better = None

    def __init__(
        self, num_channels: int, num_members: int, average: Average = "none", **kwargs
    ) -> None:
        super().__init__(num_channels, None, average, **kwargs)
        if int(num_members) < 1:
            raise ValueError(f"num_members must be >= 1, got {num_members}")
        self.num_members = int(num_members)
        self.add_state(
            "counts",
            torch.zeros(self.num_channels, self.num_members + 1, dtype=torch.float64),
            dist_reduce_fx="sum",
        )

    def update(
        self,
        forecasts: Tensor,
        obs: Tensor,
        mask: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> None:
        """Args: forecasts ``[B, M, C, *S]``; obs ``[B, C, *S]``; mask, weights broadcastable to obs."""
        check_ensemble(forecasts, obs)
        self._check_field(obs, "obs")
        m = forecasts.shape[1]
        if m != self.num_members:
            raise ValueError(
                f"forecasts have {m} members, the metric was built for {self.num_members}"
            )
        y = obs.unsqueeze(1)
        below = (forecasts < y).sum(dim=1)
        tied = (forecasts == y).sum(dim=1)
        w = point_weights(obs, mask, weights)
        share = w / (tied + 1).to(torch.float64)
        # spread `share` uniformly over ranks below..below+tied: +share at the first
        # rank, -share one past the last, then a cumulative sum along the ranks
        c = self.num_channels
        start = below.transpose(0, 1).reshape(c, -1)
        stop = (below + tied + 1).transpose(0, 1).reshape(c, -1)
        share = share.transpose(0, 1).reshape(c, -1)
        delta = torch.zeros(c, m + 2, dtype=torch.float64, device=obs.device)
        delta.scatter_add_(1, start, share).scatter_add_(1, stop, -share)
        self.counts += delta.cumsum(dim=1)[:, : m + 1]

    def compute(self) -> Tensor:
        """Returns: relative frequencies ``[C, M + 1]`` (each row sums to 1), or ``[M + 1]``."""
        if self.average == "channels":
            counts = self.counts.sum(dim=0)
            return counts / counts.sum()
        return self.counts / self.counts.sum(dim=1, keepdim=True)


def gaussian_crps(mean: Tensor, std: Tensor, obs: Tensor) -> Tensor:
    """Closed-form CRPS of ``N(mean, std^2)`` at ``obs`` (Gneiting et al. 2005):
    ``std * (z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi))``, ``z = (obs - mean) / std``."""
    z = (obs - mean) / std
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z**2) / math.sqrt(2.0 * math.pi)
    return std * (z * (2.0 * cdf - 1.0) + 2.0 * pdf - 1.0 / math.sqrt(math.pi))


__all__ = [
    "CRPS",
    "EnergyScore",
    "RankHistogram",
    "SpreadSkillRatio",
    "crps_ensemble",
    "energy_score",
    "gaussian_crps",
]

"""Statistics of generated fields against data: per-point moment maps, the spread of
the domain mean, and the Wasserstein-1 distance between value distributions.

Samples and data need not be paired: ``samples`` are ``[N, C, *S]`` (or an
ensemble ``[B, M, C, *S]``, whose members are pooled) and ``data`` ``[N', C, *S]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

from scidiff.evaluation.weighting import (
    Average,
    check_average,
    check_spatial_shape,
    point_weights,
    weighted,
)
from scidiff.shapes import check_field


def fold_members(
    samples: Tensor, mask: Tensor | None, spatial_ndim: int
) -> tuple[Tensor, Tensor | None]:
    """Pool ensemble members: ``[B, M, C, *S] -> [B*M, C, *S]``, repeating a
    per-sample ``mask`` ``[B, ...]`` for every member. Fields pass through."""
    if samples.ndim != spatial_ndim + 3:
        return samples, mask
    b, m = samples.shape[:2]
    if (
        mask is not None
        and mask.ndim == samples.ndim - 1
        and mask.shape[0] == b
        and b > 1
    ):
        mask = mask.unsqueeze(1).expand(b, m, *mask.shape[1:]).flatten(0, 1)
    return samples.flatten(0, 1), mask


class _FieldsMetric(Metric):
    full_state_update = False
    is_differentiable = False

    def __init__(self, num_channels: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if int(num_channels) < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        self.num_channels = int(num_channels)

    def _check(
        self, x: Tensor, name: str, spatial_shape: tuple[int, ...] | None = None
    ) -> None:
        check_field(x, name)
        if x.shape[1] != self.num_channels:
            raise ValueError(
                f"{name} has {x.shape[1]} channels, expected {self.num_channels}"
            )
        if spatial_shape is not None and tuple(x.shape[2:]) != spatial_shape:
            raise ValueError(
                f"{name} has spatial shape {tuple(x.shape[2:])}, expected {spatial_shape}"
            )


class _PairedFieldsMetric(_FieldsMetric):
    """A metric of samples against data whose states are accumulated per group (``"samples"``,
    ``"data"``) by ``_accumulate(group, fields, mask, weights)``."""

    def _accumulate(self, group: str, x: Tensor, mask: Tensor | None, weights: Tensor | None) -> None:
        raise NotImplementedError

    def update(
        self,
        samples: Tensor,
        data: Tensor,
        mask: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> None:
        """Args:
        samples: ``[N, C, *S]`` or ``[B, M, C, *S]`` (members pooled).
        data: ``[N', C, *S]``, the same grid.
        mask: 0/1 broadcastable to ``data`` (repeated over members for a per-sample mask).
        weights: area weights broadcastable to both (e.g. cos latitude ``[H, 1]``).
        """
        samples, samples_mask = fold_members(samples, mask, data.ndim - 2)
        self._check(samples, "samples")
        self._check(data, "data")
        if samples.shape[2:] != data.shape[2:]:
            raise ValueError(
                f"samples {tuple(samples.shape)} and data {tuple(data.shape)} differ in grid"
            )
        self._accumulate("samples", samples, samples_mask, weights)
        self._accumulate("data", data, mask, weights)


@dataclass
class MomentMaps:
    """Per-point moments of samples and data, each ``[C, *S]`` in field units.

    Attributes:
        mean_samples, mean_data: means over fields.
        bias: ``mean_samples - mean_data``.
        std_samples, std_data: unbiased standard deviations over fields (ddof 1).
        std_ratio: ``std_samples / std_data`` (1 = right variability; < 1 too smooth).
    Points with fewer than 2 valid values are NaN.
    """

    mean_samples: Tensor
    mean_data: Tensor
    bias: Tensor
    std_samples: Tensor
    std_data: Tensor
    std_ratio: Tensor


class BiasStdMaps(_FieldsMetric):
    """Per-point bias and standard-deviation maps of samples against data.

    Accumulates float64 sums of ``1, x, x^2`` per point (sum reductions across
    ranks; float64 keeps ``E[x^2] - E[x]^2`` accurate for fields whose mean is
    large against their spread, e.g. temperatures in kelvin).

    Args:
        num_channels: ``C``.
        spatial_shape: ``S``.
    """

    higher_is_better = None

    def __init__(
        self, num_channels: int, spatial_shape: Sequence[int], **kwargs
    ) -> None:
        super().__init__(num_channels, **kwargs)
        self.spatial_shape = check_spatial_shape(spatial_shape)
        for group in ("samples", "data"):
            for moment in ("count", "sum", "sum_sq"):
                self.add_state(
                    f"{group}_{moment}",
                    torch.zeros(
                        self.num_channels, *self.spatial_shape, dtype=torch.float64
                    ),
                    dist_reduce_fx="sum",
                )

    def _accumulate(self, group: str, x: Tensor, mask: Tensor | None) -> None:
        w = point_weights(x, mask)
        if not torch.all((w == 0) | (w == 1)):
            raise ValueError("mask must hold 0 and 1 only")
        x = x.to(torch.float64)
        for moment, value in (
            ("count", w),
            ("sum", weighted(w, x)),
            ("sum_sq", weighted(w, x * x)),
        ):
            name = f"{group}_{moment}"
            setattr(self, name, getattr(self, name) + value.sum(dim=0))

    def update(self, samples: Tensor, data: Tensor, mask: Tensor | None = None) -> None:
        """Args:
        samples: ``[N, C, *S]`` or ``[B, M, C, *S]``.
        data: ``[N', C, *S]``.
        mask: 0/1 broadcastable to ``data`` (a per-sample mask ``[B, ...]`` is
            repeated over the members of an ensemble of ``B`` samples).
        """
        samples, samples_mask = fold_members(samples, mask, len(self.spatial_shape))
        self._check(samples, "samples", self.spatial_shape)
        self._check(data, "data", self.spatial_shape)
        self._accumulate("samples", samples, samples_mask)
        self._accumulate("data", data, mask)

    def _moments(self, group: str) -> tuple[Tensor, Tensor]:
        n = getattr(self, f"{group}_count")
        mean = getattr(self, f"{group}_sum") / n
        variance = (getattr(self, f"{group}_sum_sq") - n * mean**2) / (n - 1)
        nan = torch.full_like(mean, float("nan"))
        mean = torch.where(n > 0, mean, nan)
        std = torch.where(n > 1, variance.clamp_min(0).sqrt(), nan)
        return mean, std

    def compute(self) -> MomentMaps:
        """Returns: :class:`MomentMaps`, every map ``[C, *S]``."""
        mean_s, std_s = self._moments("samples")
        mean_d, std_d = self._moments("data")
        return MomentMaps(mean_s, mean_d, mean_s - mean_d, std_s, std_d, std_s / std_d)


class DomainMeanStdRatio(_PairedFieldsMetric):
    """The spread of each field's domain mean, samples against data.

    The domain mean of a field is its weighted mean over its valid points (mask times area
    weights, as every mean over points in scidiff). Its standard deviation over fields
    (pooled over samples and members) is the large-scale variability that the per-point
    moments and the spectra do not see: spectra remove each field's mean, and one mode
    weighs nothing among the per-point statistics. A denoiser that cannot change a field's
    mean generates ensembles whose domain means barely vary while every wavenumber
    ``k != 0`` is right (see the architecture page, "Normalisation groups").

    ``compute`` returns ``std(domain means of samples) / std(domain means of data)`` per
    channel (1 = right; unbiased stds, ddof 1), NaN for a channel with fewer than 2
    fields, or whose data domain means are constant (std below ``1e-6`` of the data's
    root-mean-square value: e.g. anomalies with their mean removed per field), where the
    ratio means nothing. Fields without a valid point are skipped. Float64 sum states:
    exact under DDP.

    The spread is pooled over every field, so for a conditional model it holds the
    conditions' variation too: where the condition fixes a field's mean (downscaling from
    a coarse field) it says little about the members' own spread, which the CRPS and the
    spread-skill ratio judge there.

    Args:
        num_channels: ``C``.
    """

    higher_is_better = None
    CONSTANT = 1e-6

    def __init__(self, num_channels: int, **kwargs) -> None:
        super().__init__(num_channels, **kwargs)
        # per group: fields, sum and sum of squares of their domain means; for the data also the
        # sum of their mean squares (the scale that tells a constant domain mean from a varying one)
        for name in ("samples_count", "samples_sum", "samples_sum_sq", "data_count", "data_sum", "data_sum_sq",
                     "data_mean_sq"):
            self.add_state(name, torch.zeros(self.num_channels, dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, group: str, x: Tensor, mask: Tensor | None, weights: Tensor | None) -> None:
        w = point_weights(x, mask, weights)
        x = x.to(torch.float64)
        points = tuple(range(2, x.ndim))
        total = w.sum(dim=points)  # [N, C]
        valid = total > 0
        safe = torch.where(valid, total, 1.0)
        mean = torch.where(valid, weighted(w, x).sum(dim=points) / safe, 0.0)
        moments = {"count": valid.to(torch.float64), "sum": mean, "sum_sq": mean * mean}
        if group == "data":
            moments["mean_sq"] = torch.where(valid, weighted(w, x * x).sum(dim=points) / safe, 0.0)
        for moment, value in moments.items():
            name = f"{group}_{moment}"
            setattr(self, name, getattr(self, name) + value.sum(dim=0))

    def std(self, group: str) -> Tensor:
        """``[C]`` standard deviation of the domain means of ``"samples"`` or ``"data"`` (NaN below 2
        fields), in field units. Synced across ranks: under DDP, call it on every rank (a collective)."""
        if group not in ("samples", "data"):
            raise ValueError(f"group must be 'samples' or 'data', got {group!r}")
        with self.sync_context():
            return self._std(group)

    def _std(self, group: str) -> Tensor:
        n = getattr(self, f"{group}_count")
        mean = getattr(self, f"{group}_sum") / n.clamp_min(1)
        variance = (getattr(self, f"{group}_sum_sq") - n * mean**2) / (n - 1).clamp_min(1)
        return torch.where(n > 1, variance.clamp_min(0).sqrt(), torch.nan)

    def compute(self) -> Tensor:
        """Returns: ``[C]`` std ratio of the domain means, samples / data (NaN where it means nothing)."""
        std_data = self._std("data")
        rms = (self.data_mean_sq / self.data_count.clamp_min(1)).sqrt()
        constant = ~(std_data > self.CONSTANT * rms)
        return torch.where(constant, torch.nan, self._std("samples") / std_data)


class Wasserstein1(_PairedFieldsMetric):
    """Wasserstein-1 distance between the value distributions of samples and data.

    ``W1 = integral |F_samples(v) - F_data(v)| dv`` over the distribution of point
    values (pooled over fields and points, counted with mask and area weights),
    per channel, in field units: how far, on average, values must move to turn
    one histogram into the other. The distributions are held as histograms on
    fixed bins, so the state is a sum that reduces exactly across ranks; within a
    bin the CDFs are linear, so the error is at most about one bin width (times
    the mass that differs in that bin). Values outside ``value_range`` are clamped
    to its ends (see :meth:`out_of_range`).

    Args:
        num_channels: ``C``.
        value_range: ``(low, high)`` for every channel, or one pair per channel, in field units.
        num_bins: histogram bins per channel.
        average: ``"none"`` (``[C]``) or ``"channels"`` (scalar).
    """

    higher_is_better = False

    def __init__(
        self,
        num_channels: int,
        value_range: tuple[float, float] | Sequence[tuple[float, float]],
        num_bins: int = 1000,
        average: Average = "none",
        **kwargs,
    ) -> None:
        super().__init__(num_channels, **kwargs)
        self.average = check_average(average)
        bounds = torch.as_tensor(value_range, dtype=torch.float64)
        if bounds.shape == (2,):
            bounds = bounds.expand(self.num_channels, 2)
        if bounds.shape != (self.num_channels, 2) or not torch.all(
            bounds[:, 1] > bounds[:, 0]
        ):
            raise ValueError(
                f"value_range must be (low, high) with low < high, or {self.num_channels} such pairs, "
                f"got {value_range}"
            )
        if int(num_bins) < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = int(num_bins)
        self.low = bounds[:, 0].clone()
        self.bin_width = (bounds[:, 1] - bounds[:, 0]) / self.num_bins
        for group in ("samples", "data"):
            # [underflow, bins..., overflow]
            self.add_state(
                f"{group}_hist",
                torch.zeros(self.num_channels, self.num_bins + 2, dtype=torch.float64),
                dist_reduce_fx="sum",
            )

    def _accumulate(
        self, group: str, x: Tensor, mask: Tensor | None, weights: Tensor | None
    ) -> None:
        c = self.num_channels
        w = point_weights(x, mask, weights).transpose(0, 1).reshape(c, -1)
        v = x.to(torch.float64).transpose(0, 1).reshape(c, -1)
        low = self.low.to(v.device).unsqueeze(1)
        width = self.bin_width.to(v.device).unsqueeze(1)
        position = torch.where(w > 0, (v - low) / width, 0.0)
        index = (torch.floor(position).clamp(-1, self.num_bins) + 1).long()
        name = f"{group}_hist"
        hist = torch.zeros(c, self.num_bins + 2, dtype=torch.float64, device=v.device)
        setattr(self, name, getattr(self, name) + hist.scatter_add_(1, index, w))

    def out_of_range(self) -> tuple[Tensor, Tensor]:
        """Fractions ``[C]`` of sample and data values that fell outside ``value_range``.

        Synced across ranks: under DDP, call it on every rank (it is a collective).
        """
        with self.sync_context():
            return tuple(
                (h[:, 0] + h[:, -1]) / h.sum(dim=1)
                for h in (self.samples_hist, self.data_hist)
            )

    def compute(self) -> Tensor:
        """Returns: ``[C]`` W1 in field units (a scalar with ``average="channels"``)."""
        cdf_edges = []
        for hist in (self.samples_hist, self.data_hist):
            p = hist / hist.sum(dim=1, keepdim=True)
            # CDF at the bin edges low + j * width, j = 0..K, the underflow mass sitting at low
            inner = p[:, 0:1] + torch.cumsum(p[:, 1:-1], dim=1)
            cdf_edges.append(torch.cat([p[:, 0:1], inner], dim=1))
        diff = cdf_edges[0] - cdf_edges[1]
        a, b = diff[:, :-1], diff[:, 1:]
        same_sign = a * b >= 0
        # integral of |linear function| over one bin, from its end values a and b
        integral = torch.where(
            same_sign,
            0.5 * (a.abs() + b.abs()),
            0.5
            * (a**2 + b**2)
            / (a.abs() + b.abs()).clamp_min(torch.finfo(torch.float64).tiny),
        )
        distance = integral.sum(dim=1) * self.bin_width.to(integral.device)
        return distance.mean() if self.average == "channels" else distance


__all__ = ["BiasStdMaps", "DomainMeanStdRatio", "MomentMaps", "Wasserstein1", "fold_members"]

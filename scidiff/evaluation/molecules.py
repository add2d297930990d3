"""Atom counts of voxelised molecular densities ``[B, n_elements, Z, Y, X]``.

Each channel holds the density of one element (atoms per unit volume, each
atom a blob that integrates to ``atom_integral``). Two estimates of the number
of atoms per element:

* the integrated density ``sum_voxels rho * voxel_volume / atom_integral``,
  which is right on average even when blobs overlap;
* the number of peaks: voxels that are the maximum of their
  ``(2r + 1)^3`` neighbourhood and exceed a threshold, which is what a
  downstream atom-placement step would recover.

For a generated molecule both should agree with each other and with the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric


def _check_voxels(density: Tensor) -> None:
    if density.ndim != 5:
        raise ValueError(
            f"density must be voxels [B, n_elements, Z, Y, X] (rank 3), got shape {tuple(density.shape)}"
        )


def integrated_density(
    density: Tensor, voxel_volume: float = 1.0, atom_integral: float = 1.0
) -> Tensor:
    """Atom-count estimate per element from the integral of the density.

    Args:
        density: ``[B, C, Z, Y, X]`` (atoms per unit volume).
        voxel_volume: volume of one voxel (e.g. Å^3).
        atom_integral: integral of one atom's density (1 when densities are normalised).

    Returns:
        ``[B, C]`` float64.
    """
    _check_voxels(density)
    return density.to(torch.float64).sum(dim=(2, 3, 4)) * (voxel_volume / atom_integral)


def find_peaks(
    density: Tensor,
    threshold: float | Sequence[float] | Tensor,
    min_distance: int = 1,
    periodic: bool = False,
) -> Tensor:
    """Local maxima above a threshold, by comparison with a max-pool.

    A voxel is a peak when it equals the maximum of the cube of side
    ``2 * min_distance + 1`` around it and exceeds ``threshold``.

    Args:
        density: ``[B, C, Z, Y, X]``.
        threshold: one value, or one per channel (density units).
        min_distance: neighbourhood radius in voxels (peaks closer than this merge).
        periodic: wrap the neighbourhood around the box (periodic crystals), else
            voxels outside the box do not count.

    Returns:
        ``[B, C, Z, Y, X]`` bool peak mask.
    """
    _check_voxels(density)
    if int(min_distance) < 1:
        raise ValueError(f"min_distance must be >= 1, got {min_distance}")
    r = int(min_distance)
    x = density.to(torch.float64)
    threshold = torch.as_tensor(threshold, dtype=torch.float64, device=x.device)
    if threshold.ndim == 1:
        if threshold.numel() != x.shape[1]:
            raise ValueError(
                f"threshold has {threshold.numel()} values for {x.shape[1]} channels"
            )
        threshold = threshold.reshape(1, -1, 1, 1, 1)
    if periodic:
        neighbourhood_max = F.max_pool3d(
            F.pad(x, (r,) * 6, mode="circular"), 2 * r + 1, stride=1
        )
    else:
        neighbourhood_max = F.max_pool3d(x, 2 * r + 1, stride=1, padding=r)
    return (x == neighbourhood_max) & (x > threshold)


def count_peaks(
    density: Tensor,
    threshold: float | Sequence[float] | Tensor,
    min_distance: int = 1,
    periodic: bool = False,
) -> Tensor:
    """Number of peaks per sample and element, ``[B, C]`` int64 (see :func:`find_peaks`)."""
    return find_peaks(density, threshold, min_distance, periodic).sum(dim=(2, 3, 4))


@dataclass
class AtomCountSummary:
    """Per-element atom counts over a set of voxel grids, each ``[C]``.

    Attributes:
        integrated_mean, integrated_std: integrated-density count, mean and std over grids.
        peaks_mean, peaks_std: peak count, mean and std over grids.
        mismatch: mean ``|peaks - integrated|`` per grid (0 for clean, separated atoms).
    """

    integrated_mean: Tensor
    integrated_std: Tensor
    peaks_mean: Tensor
    peaks_std: Tensor
    mismatch: Tensor


class AtomCounts(Metric):
    """Per-element atom counts of voxel densities: integrated density and peaks.

    Use one instance for generated samples and one for data, and compare.

    Args:
        num_channels: number of elements ``C``.
        threshold: peak threshold, one value or one per element (density units).
        voxel_volume: volume of one voxel.
        atom_integral: integral of one atom's density.
        min_distance: peak neighbourhood radius in voxels.
        periodic: periodic box for the peak search.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self,
        num_channels: int,
        threshold: float | Sequence[float],
        voxel_volume: float = 1.0,
        atom_integral: float = 1.0,
        min_distance: int = 1,
        periodic: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if int(num_channels) < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        self.num_channels = int(num_channels)
        self.threshold = threshold
        self.voxel_volume = float(voxel_volume)
        self.atom_integral = float(atom_integral)
        self.min_distance = int(min_distance)
        self.periodic = bool(periodic)
        for name in (
            "integrated_sum",
            "integrated_sq_sum",
            "peaks_sum",
            "peaks_sq_sum",
            "mismatch_sum",
        ):
            self.add_state(
                name,
                torch.zeros(self.num_channels, dtype=torch.float64),
                dist_reduce_fx="sum",
            )
        self.add_state(
            "count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, density: Tensor) -> None:
        """Args: density ``[B, C, Z, Y, X]`` (atoms per unit volume)."""
        _check_voxels(density)
        if density.shape[1] != self.num_channels:
            raise ValueError(
                f"density has {density.shape[1]} channels, expected {self.num_channels}"
            )
        integrated = integrated_density(density, self.voxel_volume, self.atom_integral)
        peaks = count_peaks(
            density, self.threshold, self.min_distance, self.periodic
        ).to(torch.float64)
        self.integrated_sum += integrated.sum(dim=0)
        self.integrated_sq_sum += (integrated**2).sum(dim=0)
        self.peaks_sum += peaks.sum(dim=0)
        self.peaks_sq_sum += (peaks**2).sum(dim=0)
        self.mismatch_sum += (peaks - integrated).abs().sum(dim=0)
        self.count += density.shape[0]

    def compute(self) -> AtomCountSummary:
        """Returns: :class:`AtomCountSummary` (std with ddof 1)."""
        n = self.count

        def mean_std(total: Tensor, total_sq: Tensor) -> tuple[Tensor, Tensor]:
            mean = total / n
            return mean, ((total_sq - n * mean**2) / (n - 1)).clamp_min(0).sqrt()

        integrated = mean_std(self.integrated_sum, self.integrated_sq_sum)
        peaks = mean_std(self.peaks_sum, self.peaks_sq_sum)
        return AtomCountSummary(*integrated, *peaks, self.mismatch_sum / n)


__all__ = [
    "AtomCountSummary",
    "AtomCounts",
    "count_peaks",
    "find_peaks",
    "integrated_density",
]

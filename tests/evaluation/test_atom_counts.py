"""Atom counts of voxel densities: integrated density and peaks of planted blobs."""

import math

import pytest
import torch

from scidiff.evaluation import AtomCounts, count_peaks, find_peaks, integrated_density

SHAPE = (20, 24, 28)  # non-cubic voxel grid (z, y, x)


def _blob(centre, sigma=1.0, shape=SHAPE, periodic=False):
    """One atom: a Gaussian normalised so that its voxel sum is exactly 1."""
    axes = torch.meshgrid(
        *[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"
    )
    r2 = torch.zeros(shape, dtype=torch.float64)
    for axis, c, n in zip(axes, centre, shape):
        d = axis - c
        if periodic:
            d = torch.remainder(d + n / 2, n) - n / 2
        r2 = r2 + d**2
    blob = torch.exp(-0.5 * r2 / sigma**2)
    return blob / blob.sum()


def _molecule(num_atoms, seed):
    """Atoms at least 5 voxels apart and 4 voxels from the faces."""
    g = torch.Generator().manual_seed(seed)
    centres = []
    while len(centres) < num_atoms:
        c = [4 + float(torch.rand((), generator=g)) * (n - 8) for n in SHAPE]
        if all(math.dist(c, other) >= 5 for other in centres):
            centres.append(c)
    return sum(_blob(c) for c in centres)


def test_planted_atoms_are_recovered_by_integral_and_peaks():
    counts = [(5, 3), (7, 1), (2, 6)]  # (carbon, oxygen) per molecule
    density = torch.stack(
        [
            torch.stack([_molecule(n, seed=10 * i + e) for e, n in enumerate(pair)])
            for i, pair in enumerate(counts)
        ]
    )  # [3, 2, Z, Y, X]
    voxel = 0.125  # 0.5 A voxels; densities in atoms / A^3
    density = density / voxel
    expected = torch.tensor(counts, dtype=torch.float64)
    assert torch.allclose(
        integrated_density(density, voxel_volume=voxel), expected, atol=1e-9
    )
    assert torch.equal(
        count_peaks(density, threshold=0.05 * float(density.max())), expected.long()
    )
    metric = AtomCounts(num_channels=2, threshold=[0.1, 0.1], voxel_volume=voxel)
    metric.update(density[:1])
    metric.update(density[1:])
    summary = metric.compute()
    assert torch.allclose(summary.integrated_mean, expected.mean(dim=0))
    assert torch.allclose(summary.peaks_mean, expected.mean(dim=0))
    assert torch.allclose(summary.peaks_std, expected.std(dim=0))
    assert torch.allclose(
        summary.mismatch, torch.zeros(2, dtype=torch.float64), atol=1e-9
    )


def test_atom_across_a_periodic_face_is_one_peak_only_with_periodic_search():
    density = _blob((10.0, 12.0, 0.3), periodic=True).reshape(1, 1, *SHAPE)
    assert int(count_peaks(density, 1e-4, periodic=True)) == 1
    assert (
        int(count_peaks(density, 1e-4, periodic=False)) == 2
    )  # a maximum on each face
    peaks = find_peaks(density, 1e-4, periodic=True)
    assert peaks[0, 0, 10, 12, 0]


def test_close_atoms_merge_with_a_larger_min_distance():
    density = (_blob((10.0, 12.0, 10.0)) + _blob((10.0, 12.0, 13.0))).reshape(
        1, 1, *SHAPE
    )
    assert int(count_peaks(density, 1e-3, min_distance=1)) == 2
    assert int(count_peaks(density, 1e-3, min_distance=3)) == 1


def test_molecule_metrics_need_rank_3_voxels():
    with pytest.raises(ValueError, match="rank 3"):
        integrated_density(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        AtomCounts(num_channels=3, threshold=0.1).update(torch.zeros(1, 2, 4, 4, 4))

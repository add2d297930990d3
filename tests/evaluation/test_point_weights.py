"""Mask x area weights, and the checks every metric makes on its inputs."""

import pytest
import torch

from scidiff.evaluation import (
    CRPS,
    SpreadSkillRatio,
    point_weights,
    radial_power_spectrum,
)


def test_point_weights_multiply_mask_and_weights_and_broadcast():
    x = torch.zeros(2, 3, 4, 5)
    mask = torch.tensor([True, False, True, True, True])
    coslat = torch.linspace(0.1, 1.0, 4).reshape(4, 1)
    w = point_weights(x, mask, coslat)
    assert w.shape == x.shape and w.dtype == torch.float64
    assert torch.allclose(w[1, 2], coslat.double() * mask.double())
    assert torch.equal(point_weights(x), torch.ones(x.shape, dtype=torch.float64))


def test_point_weights_reject_bad_shapes_and_negative_weights():
    x = torch.zeros(2, 3, 4, 5)
    with pytest.raises(ValueError, match="mask"):
        point_weights(x, mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="enlarge"):
        point_weights(x, weights=torch.ones(7, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="non-negative"):
        point_weights(x, weights=-torch.ones(5))


def test_metrics_check_shapes_and_modes():
    metric = CRPS(num_channels=2)
    with pytest.raises(ValueError, match="channels"):
        metric.update(torch.zeros(1, 3, 1, 8), torch.zeros(1, 1, 8))
    with pytest.raises(ValueError, match="forecasts"):
        metric.update(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="spatial_shape"):
        CRPS(num_channels=2, spatial_shape=(2, 2, 2, 2))
    with pytest.raises(ValueError, match="2 members"):
        SpreadSkillRatio(num_channels=1).update(
            torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 4)
        )
    with pytest.raises(ValueError, match="mask"):
        radial_power_spectrum(torch.zeros(1, 1, 8), mask=torch.full((8,), 0.5))

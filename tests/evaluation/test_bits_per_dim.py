"""BitsPerDim and BoundTerms: sums of nats over dims, in bits."""

import math

import numpy as np
import pytest
import torch

from scidiff.evaluation import BitsPerDim, BoundTerms


def test_bits_per_dim_weights_every_dimension_equally():
    metric = BitsPerDim()
    metric.update(torch.tensor([100.0, 120.0]), dims=64)
    metric.update(
        torch.tensor([30.0]), dims=torch.tensor([16])
    )  # a masked sample, 16 valid dims
    assert float(metric.compute()) == pytest.approx(
        250.0 / (144 * math.log(2)), rel=1e-12
    )
    per_sample = np.array([100 / 64, 120 / 64, 30 / 16]) / math.log(2)
    expected_se = per_sample.std(ddof=1) / math.sqrt(3)
    assert float(metric.standard_error()) == pytest.approx(expected_se, rel=1e-10)


def test_bits_per_dim_of_standard_normal_data_is_its_entropy():
    # -log N(x; 0, 1) averaged over x ~ N(0, 1) is 0.5 log(2 pi e) nats per dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 10, 10, generator=g, dtype=torch.float64)
    nats = (0.5 * x**2 + 0.5 * math.log(2 * math.pi)).sum(dim=(1, 2, 3))
    metric = BitsPerDim()
    metric.update(nats, dims=300)
    entropy_bits = 0.5 * math.log2(2 * math.pi * math.e)  # 2.0471
    assert abs(float(metric.compute()) - entropy_bits) < 4 * float(
        metric.standard_error()
    )
    with pytest.raises(ValueError, match="dims"):
        metric.update(nats, dims=0)
    with pytest.raises(ValueError, match="nats"):
        metric.update(nats.reshape(8, 8), dims=300)


def test_bound_terms_average_over_samples():
    metric = BoundTerms(num_timesteps=4)
    terms = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    metric.update(terms[:1])
    metric.update(terms[1:])
    assert torch.equal(metric.compute(), terms.mean(dim=0))
    with pytest.raises(ValueError, match="terms"):
        metric.update(torch.zeros(2, 5))

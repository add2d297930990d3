"""The contrastive encoder pair: unit vectors from fields of rank 1-3 and from conditions, the
symmetric InfoNCE loss against a direct computation, and retrieval accuracy on constructed cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scidiff.conditioning import Conditioning
from scidiff.nets.contrastive import ConditionEncoder, ContrastiveEncoder, FieldEncoder, info_nce, retrieval_accuracy


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_encoders_give_unit_vectors_for_any_rank(dims):
    torch.manual_seed(0)
    enc = ContrastiveEncoder(FieldEncoder(2, dims, out_dim=8, width=4, levels=2, padding="circular"),
                             ConditionEncoder(num_params=2, embedding_dim=3, out_dim=8))
    x = torch.randn(5, 2, *([8] * dims))
    z_field, z_cond = enc(x, Conditioning(params=torch.randn(5, 2), embedding=torch.randn(5, 3)))
    assert z_field.shape == z_cond.shape == (5, 8)
    torch.testing.assert_close(z_field.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(z_cond.norm(dim=1), torch.ones(5))
    assert float(enc.scale()) == pytest.approx(1 / 0.07)


def test_info_nce_equals_the_symmetric_cross_entropy_and_rewards_alignment():
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    b = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    logits = 10.0 * a @ b.T
    direct = 0.0
    for i in range(6):  # -log softmax of the matching pair, rows and columns
        direct += -(logits[i, i] - torch.logsumexp(logits[i], 0)) - (logits[i, i] - torch.logsumexp(logits[:, i], 0))
    assert float(info_nce(a, b, 10.0)) == pytest.approx(float(direct) / 12, rel=1e-6)
    assert float(info_nce(a, a, 50.0)) < 1e-3 < float(info_nce(a, b, 50.0))
    assert float(info_nce(a, b, 0.0)) == pytest.approx(math.log(6), rel=1e-6)   # no scale: chance


def test_retrieval_accuracy_on_constructed_vectors():
    keys = torch.eye(4)
    queries = torch.stack([keys[0], keys[1], 0.9 * keys[3] + 0.1 * keys[2], keys[0]])
    acc = retrieval_accuracy(F.normalize(queries, dim=1), keys, torch.tensor([0, 1, 2, 3]), k=(1, 2))
    assert acc == {1: 0.5, 2: 0.75}


def test_condition_encoder_refuses_missing_or_wrong_conditions():
    with pytest.raises(ValueError, match="no condition to contrast"):
        ConditionEncoder()
    enc = ConditionEncoder(num_params=2, out_dim=4)
    with pytest.raises(ValueError, match=r"cond.params: the condition encoder takes \[B, 2\], got \(3, 1\)"):
        enc(Conditioning(params=torch.zeros(3, 1)))

"""Conditional fidelity's scores and their standard errors on constructed embeddings.

The encoder here maps a field to the unit vector of its first two values and a condition (one
parameter, an angle) to the unit vector at that angle, so which member retrieves which condition
is known by construction."""

from __future__ import annotations

import math

import numpy as np
import torch

from scidiff.evaluation.fidelity import ConditionFidelity
from scidiff.inference.runtime import DistContext


class AngleEncoder:
    def embed_fields(self, x):
        v = x.flatten(1)[:, :2].double()
        return v / v.norm(dim=1, keepdim=True)

    def embed_conditions(self, params, embedding):
        return torch.stack([params[:, 0].cos(), params[:, 0].sin()], dim=1).double()


def field_at(angle: float) -> torch.Tensor:
    return torch.tensor([[math.cos(angle), math.sin(angle), 0.0, 0.0]], dtype=torch.float64).reshape(1, 2, 2)


ANGLES = [0.0, 1.5, 3.0, 4.5]   # four conditions, well apart on the circle


def scores(member_angles: list[list[float]], real_angles: list[float], batches: int = 1) -> dict[str, float]:
    fid = ConditionFidelity(AngleEncoder())
    n = len(real_angles)
    for part in np.array_split(np.arange(n), batches):   # batch by batch, as the evaluation feeds it
        ens = torch.stack([torch.stack([field_at(a) for a in member_angles[i]]) for i in part])
        real = torch.stack([field_at(real_angles[i]) for i in part])
        params = torch.tensor([[ANGLES[i]] for i in part], dtype=torch.float64)
        fid.update(ens, real, params, None)
    return fid.results(DistContext())


def test_scores_and_their_standard_errors_over_conditions():
    # sample i is generated at condition i; its members sit at the listed angles (a member near another
    # condition's angle retrieves that one)
    members = [[0.0, 0.0, 1.5], [1.5, 1.5, 1.5], [4.5, 0.0, 0.0], [4.5, 4.5, 3.0]]
    real = [0.0, 1.5, 4.5, 3.0]   # the real fields of samples 2 and 3 retrieve the other's condition
    s = scores(members, real, batches=2)
    hits = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=float)   # member at its own angle
    per_sample = hits.mean(1)
    assert s["fidelity/candidates"] == 4
    assert math.isclose(s["fidelity/top1"], hits.mean())
    # the error is over the 4 conditions, not the 12 members: the members of a sample share its condition
    assert math.isclose(s["fidelity/top1_se"], per_sample.std(ddof=1) / 2)
    real_hits = np.array([1.0, 1.0, 0.0, 0.0])
    assert math.isclose(s["fidelity/real_top1"], 0.5)
    assert math.isclose(s["fidelity/real_top1_se"], real_hits.std(ddof=1) / 2)
    # every member is among the 5 most similar of 4 candidates
    assert s["fidelity/top5"] == 1.0 and s["fidelity/top5_se"] == 0.0 and s["fidelity/real_top5_se"] == 0.0
    cos = np.cos(np.array([[a - ANGLES[i] for a in row] for i, row in enumerate(members)]))
    assert math.isclose(s["fidelity/similarity"], cos.mean())
    assert math.isclose(s["fidelity/similarity_se"], cos.mean(1).std(ddof=1) / 2)
    real_cos = np.cos(np.array(real) - np.array(ANGLES))
    assert math.isclose(s["fidelity/real_similarity"], real_cos.mean())
    assert math.isclose(s["fidelity/real_similarity_se"], real_cos.std(ddof=1) / 2)


def test_one_sample_has_no_standard_error():
    fid = ConditionFidelity(AngleEncoder())
    fid.update(torch.stack([field_at(0.0), field_at(0.0)])[None], field_at(0.0)[None],
               torch.tensor([[0.0]], dtype=torch.float64), None)
    s = fid.results(DistContext())
    assert s["fidelity/top1"] == 1.0 and math.isnan(s["fidelity/top1_se"]) and math.isnan(s["fidelity/real_top1_se"])

"""A contrastive field encoder (CLIP for fields): fields and their conditions in one embedding space.

Two encoders map a field ``x [B, C, *S]`` (rank 1-3) and its condition (the normalised
parameters ``[B, P]`` and/or an embedding ``[B, E]``) to unit vectors of the same width ``D``.
They are trained with the symmetric InfoNCE loss of CLIP (Radford et al. 2021): in a batch of
``B`` pairs, the cosine similarities times a learned scale ``exp(s)`` are the logits of a
``B``-way classification of each field's condition and of each condition's field, whose right
answers are the pairs themselves:

    L = (CE(S, diag) + CE(S^T, diag)) / 2,    S_ij = exp(s) <f(x_i), g(c_j)>.

The trained pair scores how well a field matches a condition (the similarity), which is what
the conditional-fidelity metric of ``scidiff-evaluate`` measures on generated members, and its
condition vectors are themselves embeddings a diffusion model can be conditioned on.
Torch only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.nets.layers import Conv, check_dims


class FieldEncoder(nn.Module):
    """Fields ``[B, C, *S]`` -> unit vectors ``[B, D]``: strided convolutions (halving the grid
    ``levels`` times), a global average and a linear projection.

    Args:
        in_channels: ``C``.
        dims: spatial rank (1, 2 or 3).
        out_dim: ``D``.
        width: channels of the first level (doubled per level).
        levels: number of halvings.
        padding: the boundary of each axis, as for the UNet (``zeros``, ``circular``, ``reflect``).
    """

    def __init__(self, in_channels: int, dims: int = 2, out_dim: int = 64, width: int = 32, levels: int = 3,
                 padding: str | Sequence[str] = "zeros") -> None:
        super().__init__()
        self.dims, self.in_channels, self.out_dim = check_dims(dims), int(in_channels), int(out_dim)
        layers: list[nn.Module] = [Conv(dims, in_channels, width, 3, padding=padding), nn.SiLU()]
        c = width
        for _ in range(levels):
            layers += [Conv(dims, c, 2 * c, 3, stride=2, padding=padding), nn.SiLU(),
                       Conv(dims, 2 * c, 2 * c, 3, padding=padding), nn.SiLU()]
            c *= 2
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x).flatten(2).mean(-1)
        return F.normalize(self.head(h), dim=-1)


class ConditionEncoder(nn.Module):
    """Conditions (normalised parameters ``[B, P]`` and/or an embedding ``[B, E]``) -> unit
    vectors ``[B, D]``: an MLP of their concatenation."""

    def __init__(self, num_params: int = 0, embedding_dim: int = 0, out_dim: int = 64, hidden: int = 128,
                 depth: int = 3) -> None:
        super().__init__()
        self.num_params, self.embedding_dim = int(num_params), int(embedding_dim)
        width = self.num_params + self.embedding_dim
        if width == 0:
            raise ValueError("contrastive: the data have no condition to contrast fields with "
                             "(configure data.params or data.embedding)")
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, cond: Conditioning) -> Tensor:
        parts = []
        for name, width in (("params", self.num_params), ("embedding", self.embedding_dim)):
            if not width:
                continue
            value = getattr(cond, name)
            if value is None or value.shape[-1] != width:
                got = None if value is None else tuple(value.shape)
                raise ValueError(f"cond.{name}: the condition encoder takes [B, {width}], got {got}")
            parts.append(value)
        return F.normalize(self.mlp(torch.cat(parts, dim=-1).float()), dim=-1)


class ContrastiveEncoder(nn.Module):
    """The field and condition encoders and the learned logit scale ``exp(s)`` (initialised at
    1 / 0.07, capped at 100 as in CLIP)."""

    def __init__(self, field: FieldEncoder, condition: ConditionEncoder) -> None:
        super().__init__()
        if field.out_dim != condition.mlp[-1].out_features:
            raise ValueError(f"contrastive: the field encoder gives {field.out_dim} dims, the condition encoder "
                             f"{condition.mlp[-1].out_features}")
        self.field, self.condition = field, condition
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, x: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
        return self.field(x), self.condition(cond)


def info_nce(z_field: Tensor, z_cond: Tensor, scale: Tensor | float) -> Tensor:
    """The symmetric InfoNCE loss of ``B`` matched pairs of unit vectors ``[B, D]`` (module docstring)."""
    logits = scale * z_field @ z_cond.T
    target = torch.arange(z_field.shape[0], device=z_field.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def distinct_keys(raw: Tensor, z_cond: Tensor) -> tuple[Tensor, Tensor]:
    """The candidates of a retrieval: ``(z_keys [K, D], index [N])``, one unit vector per distinct
    row of the raw conditions ``raw [N, W]`` (a condition given to several fields is one key) and
    each row's key; ``z_cond [N, D]`` the rows' encoded conditions."""
    keys, index = torch.unique(raw, dim=0, return_inverse=True)
    summed = torch.zeros(len(keys), z_cond.shape[1], dtype=z_cond.dtype, device=z_cond.device)
    return F.normalize(summed.index_add_(0, index, z_cond), dim=-1), index


def retrieval_hits(z_query: Tensor, z_keys: Tensor, truth: Tensor, k: Sequence[int] = (1, 5)) -> dict[int, Tensor]:
    """Whether each query retrieves its own key among its ``k`` most similar keys (cosine similarity):
    ``{k: [Q] bool}``; arguments as :func:`retrieval_accuracy`, which averages them."""
    sims = z_query @ z_keys.T
    out = {}
    for kk in k:
        top = sims.topk(min(kk, sims.shape[1]), dim=1).indices
        out[int(kk)] = (top == truth.to(top.device)[:, None]).any(dim=1)
    return out


def retrieval_accuracy(z_query: Tensor, z_keys: Tensor, truth: Tensor, k: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-``k`` accuracy of retrieving each query's key among all keys by cosine similarity.

    Args:
        z_query: ``[Q, D]`` unit vectors (e.g. fields); ``z_keys``: ``[K, D]`` the candidates (e.g.
            the distinct conditions of an evaluation: a condition given to several fields is one key).
        truth: ``[Q]`` the index of each query's own key. Chance is ``k / K``.
    """
    return {kk: float(hit.double().mean()) for kk, hit in retrieval_hits(z_query, z_keys, truth, k).items()}


__all__ = ["ConditionEncoder", "ContrastiveEncoder", "FieldEncoder", "distinct_keys", "info_nce", "retrieval_accuracy",
           "retrieval_hits"]

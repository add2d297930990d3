"""Time and condition embeddings shared by the UNet and the DiT.

A denoiser turns ``(t, cond)`` into one vector per sample,

    c = MLP_t(sinusoidal(t)) + MLP_p(params) + MLP_e(embedding),

which drives FiLM (UNet) or adaLN (DiT) in every block. Where
``cond.drop[i]`` is true (classifier-free guidance) or a configured part is
missing, ``MLP_p(params)`` and ``MLP_e(embedding)`` are replaced by learned
null vectors. A precomputed ``embedding [B, E]`` is a single token, and
cross-attention onto a single key reduces to a learned linear map of it, so it
enters through the same adaLN/FiLM path as the parameters.

Spatial conditions ``fields [B, Cf, *S']`` are resampled to the field's grid
and concatenated to the input together with one indicator channel that is 1
where the condition is present and 0 where it is dropped; a dropped sample
sees zeros plus that 0 indicator, so "no condition" is never confused with a
condition that happens to be zero.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scidiff.conditioning import Conditioning

FieldResample = Literal["linear", "nearest", "area", "error"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of (integer or float) timesteps, ``[B] -> [B, dim]`` float32.

    ``emb[:, i] = cos(t * w_i)`` and ``emb[:, half + i] = sin(t * w_i)`` with
    ``w_i = max_period ** (-i / half)`` (Transformer / ADM positional encoding).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, device=t.device, dtype=torch.float32)
        / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def mlp(in_features: int, dim: int) -> nn.Sequential:
    """``Linear -> SiLU -> Linear``, the embedding MLP used throughout."""
    return nn.Sequential(nn.Linear(in_features, dim), nn.SiLU(), nn.Linear(dim, dim))


class TimestepEmbedding(nn.Module):
    """``t: [B]`` integer timesteps -> ``[B, dim]``: sinusoidal features through an MLP.

    Args:
        dim: output width.
        freq_dim: number of sinusoidal features.
    """

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = mlp(freq_dim, dim)

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FourierFeatures(nn.Module):
    """Random Fourier features ``[sin(2 pi x W), cos(2 pi x W)]`` with fixed ``W ~ N(0, scale^2)``.

    Lets an MLP resolve fine variations of low-dimensional inputs (Tancik et al., 2020).

    Args:
        in_features: ``P``, the input width.
        num_features: output width (even).
        scale: standard deviation of the frequencies, in cycles per unit of input.
    """

    def __init__(self, in_features: int, num_features: int, scale: float = 1.0):
        super().__init__()
        if num_features % 2:
            raise ValueError(f"num_features must be even, got {num_features}")
        self.register_buffer(
            "weight", torch.randn(in_features, num_features // 2) * scale
        )

    def forward(self, x: Tensor) -> Tensor:
        proj = 2 * math.pi * x @ self.weight.to(x.dtype)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class ParamEmbedding(nn.Module):
    """Physical parameters ``[B, P]`` (normalised) -> ``[B, dim]`` through an MLP.

    Args:
        num_params: ``P``.
        dim: output width.
        fourier_features: if > 0, the MLP sees ``[params, FourierFeatures(params)]``
            with that many Fourier features.
        fourier_scale: frequency scale of the Fourier features.
    """

    def __init__(
        self,
        num_params: int,
        dim: int,
        fourier_features: int = 0,
        fourier_scale: float = 1.0,
    ):
        super().__init__()
        self.fourier = (
            FourierFeatures(num_params, fourier_features, fourier_scale)
            if fourier_features
            else None
        )
        self.mlp = mlp(num_params + fourier_features, dim)

    def forward(self, params: Tensor) -> Tensor:
        if self.fourier is not None:
            params = torch.cat([params, self.fourier(params)], dim=-1)
        return self.mlp(params)


def _drop_mask(cond: Conditioning | None, batch: int, device: torch.device) -> Tensor:
    """``BoolTensor[B]``: ``cond.drop``, or all ``False`` when it is unset."""
    if cond is None or cond.drop is None:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    return cond.drop.to(device)


def _check_batch(cond: Conditioning | None, batch: int) -> None:
    if cond is not None and cond.batch_size not in (None, batch):
        raise ValueError(
            f"cond has batch size {cond.batch_size}, but x has batch size {batch}"
        )


class ConditionEmbedding(nn.Module):
    """``(t, cond) -> [B, dim]``: time embedding plus the parameter and vector embeddings.

    Parts the model was built for but that are missing from ``cond`` (or
    ``cond is None``) count as dropped and use the learned null vectors.

    Args:
        dim: output width.
        num_params: ``P`` of ``cond.params`` (0 = no parameter conditioning).
        embedding_dim: ``E`` of ``cond.embedding`` (0 = none).
        freq_dim: number of sinusoidal features of ``t``.
        param_fourier_features, param_fourier_scale: see :class:`ParamEmbedding`.
    """

    def __init__(
        self,
        dim: int,
        num_params: int = 0,
        embedding_dim: int = 0,
        freq_dim: int = 256,
        param_fourier_features: int = 0,
        param_fourier_scale: float = 1.0,
    ):
        super().__init__()
        self.num_params = int(num_params or 0)
        self.embedding_dim = int(embedding_dim or 0)
        self.time = TimestepEmbedding(dim, freq_dim)
        if self.num_params:
            self.params = ParamEmbedding(
                self.num_params, dim, param_fourier_features, param_fourier_scale
            )
            self.null_params = nn.Parameter(torch.randn(dim) * 0.02)
        if self.embedding_dim:
            self.vector = mlp(self.embedding_dim, dim)
            self.null_vector = nn.Parameter(torch.randn(dim) * 0.02)

    def forward(self, t: Tensor, cond: Conditioning | None) -> Tensor:
        batch = t.shape[0]
        _check_batch(cond, batch)
        emb = self.time(t)
        drop = _drop_mask(cond, batch, t.device)[:, None]
        params = cond.params if cond is not None else None
        vector = cond.embedding if cond is not None else None
        if params is not None and not self.num_params:
            raise ValueError(
                f"cond.params has shape {tuple(params.shape)}, but the model was built with num_params=0"
            )
        if vector is not None and not self.embedding_dim:
            raise ValueError(
                f"cond.embedding has shape {tuple(vector.shape)}, but the model was built with embedding_dim=0"
            )
        if self.num_params:
            emb = emb + self._part(
                params, self.num_params, "params", self.params, self.null_params, drop
            )
        if self.embedding_dim:
            emb = emb + self._part(
                vector,
                self.embedding_dim,
                "embedding",
                self.vector,
                self.null_vector,
                drop,
            )
        return emb

    @staticmethod
    def _part(value, width, name, net, null, drop):
        if value is None:
            return null.expand(drop.shape[0], -1)
        if value.shape[1] != width:
            raise ValueError(
                f"cond.{name} must have shape [B, {width}], got {tuple(value.shape)}"
            )
        # zero dropped entries first: NaN placeholders must not poison the gradients
        value = value.to(null.dtype).masked_fill(drop, 0.0)
        return torch.where(drop, null, net(value))


class FieldConditioning(nn.Module):
    """Concatenate spatial conditions to the input: ``[B, C, *S] -> [B, C + Cf + 1, *S]``.

    ``cond.fields [B, Cf, *S']`` is resampled to ``S`` when ``S' != S`` (e.g. a
    coarse field for downscaling), zeroed where dropped, and followed by an
    indicator channel (1 = condition present, 0 = dropped or missing).

    Args:
        field_channels: ``Cf`` (0 = no spatial conditioning; then this is the identity).
        dims: spatial rank.
        resample: how to bring ``S'`` to ``S``: ``linear`` (bi/trilinear),
            ``nearest``, ``area`` (averaging, for finer conditions) or ``error``
            (refuse mismatched grids).
    """

    def __init__(
        self, field_channels: int, dims: int, resample: FieldResample = "linear"
    ):
        super().__init__()
        if resample not in get_args(FieldResample):
            raise ValueError(
                f"field_resample must be one of {get_args(FieldResample)}, got {resample!r}"
            )
        self.field_channels = int(field_channels or 0)
        self.dims = dims
        self.resample = resample

    @property
    def extra_channels(self) -> int:
        """Channels added to the input: ``Cf + 1``, or 0 without spatial conditioning."""
        return self.field_channels + 1 if self.field_channels else 0

    def forward(self, x: Tensor, cond: Conditioning | None) -> Tensor:
        fields = cond.fields if cond is not None else None
        if not self.field_channels:
            if fields is not None:
                raise ValueError(
                    f"cond.fields has shape {tuple(fields.shape)}, but the model was built with field_channels=0"
                )
            return x
        b, _, *spatial = x.shape
        _check_batch(cond, b)
        keep = ~_drop_mask(cond, b, x.device)
        if fields is None:
            fields = x.new_zeros(b, self.field_channels, *spatial)
            keep = torch.zeros_like(keep)
        else:
            if fields.ndim != x.ndim or fields.shape[1] != self.field_channels:
                expected = (
                    f"[B, {self.field_channels}, "
                    + ", ".join(f"S{i}'" for i in range(self.dims))
                    + "]"
                )
                raise ValueError(
                    f"cond.fields must have shape {expected}, got {tuple(fields.shape)}"
                )
            fields = fields.to(x.dtype)
            if tuple(fields.shape[2:]) != tuple(spatial):
                fields = self._resample(fields, spatial)
        keep = keep.to(x.dtype).reshape(b, 1, *([1] * self.dims))
        indicator = keep.expand(b, 1, *spatial)
        return torch.cat([x, fields * keep, indicator], dim=1)

    def _resample(self, fields: Tensor, spatial: list[int]) -> Tensor:
        if self.resample == "error":
            raise ValueError(
                f"cond.fields has grid {tuple(fields.shape[2:])} but x has grid {tuple(spatial)} "
                "(set field_resample to linear, nearest or area to resample)"
            )
        if self.resample == "linear":
            mode = ("linear", "bilinear", "trilinear")[self.dims - 1]
            return F.interpolate(fields, size=spatial, mode=mode, align_corners=False)
        return F.interpolate(fields, size=spatial, mode=self.resample)

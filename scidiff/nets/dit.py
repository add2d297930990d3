"""DiT denoiser (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers")
for fields of spatial rank 1, 2 or 3.

The field is cut into non-overlapping patches (a patch size per axis), each
patch becomes a token with an N-d sin-cos position embedding computed for the
actual grid (so 32x64 lat/lon or 24x24x24 voxels need no fixed input size),
and a stack of adaLN-Zero transformer blocks follows. Every block's gates and
the final projection start at zero, so the model outputs exactly zero at
initialisation and each block starts as the identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.nets.embeddings import ConditionEmbedding, FieldConditioning, FieldResample
from scidiff.nets.layers import attention, check_dims, check_input, conv_nd, per_axis


def sincos_1d(positions: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """``[N]`` positions -> ``[N, dim]`` with ``[sin(p w_i), cos(p w_i)]``, ``w_i = max_period**(-i/(dim/2))``."""
    half = dim // 2
    freqs = max_period ** (-torch.arange(half, dtype=torch.float64) / half)
    args = positions.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def sincos_position_embedding(grid: Sequence[int], dim: int) -> Tensor:
    """N-d sin-cos position embedding of a token grid, ``[prod(grid), dim]`` float32.

    The width is split evenly between the axes (an even number of channels per
    axis, any remainder zero); tokens are in row-major order of ``grid``, the
    order of ``x.flatten(2)``.
    """
    per = 2 * (dim // (2 * len(grid)))
    if per == 0:
        raise ValueError(
            f"hidden width {dim} is too small for a {len(grid)}-d position embedding"
        )
    coords = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    parts = [sincos_1d(c.reshape(-1), per) for c in coords]
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, dim - emb.shape[-1])).to(torch.float32)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample ``[B, D]`` shift and scale."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT, Sec. 3.2).

    ``(shift, scale, gate) x 2 = Linear(SiLU(c))`` (zero-initialised);
    ``x += gate_1 * Attn(modulate(LN(x), shift_1, scale_1))``;
    ``x += gate_2 * MLP(modulate(LN(x), shift_2, scale_2))``.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden_mlp = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_mlp),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_mlp, hidden_size),
        )
        self.ada = nn.Linear(hidden_size, 6 * hidden_size)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x: [B, N, D]`` tokens, ``c: [B, D]`` conditioning (already through SiLU)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        h = self.proj(
            attention(self.qkv(modulate(self.norm1(x), shift1, scale1)), self.num_heads)
        )
        x = torch.addcmul(x, gate1[:, None], h)  # x + gate_1 * h
        h = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return torch.addcmul(x, gate2[:, None], h)


class DiT(nn.Module):
    """DiT: ``forward(x [B, C, *S], t [B], cond) -> [B, C_out, *S]``; ``S`` divisible by ``patch_size``.

    Args:
        in_channels: ``C``, channels of the field.
        dims: spatial rank (1, 2 or 3).
        patch_size: patch size, one int for every axis or one per axis.
        hidden_size: token width ``D``.
        depth: number of transformer blocks.
        num_heads: attention heads (``D`` divisible by it).
        mlp_ratio: MLP width as a multiple of ``D``.
        learned_variance: output ``2C`` channels instead of ``C``.
        num_params, param_fourier_features, param_fourier_scale, field_channels, field_resample, embedding_dim:
            conditioning, as for :class:`~scidiff.nets.UNet`.
        checkpoint: gradient checkpointing of every block (less memory, more compute).
    """

    def __init__(
        self,
        in_channels: int,
        dims: int = 2,
        patch_size: int | Sequence[int] = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        learned_variance: bool = False,
        num_params: int = 0,
        param_fourier_features: int = 0,
        param_fourier_scale: float = 1.0,
        field_channels: int = 0,
        field_resample: FieldResample = "linear",
        embedding_dim: int = 0,
        checkpoint: bool = False,
    ):
        super().__init__()
        self.dims = check_dims(dims)
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learned_variance else in_channels
        self.patch_size = tuple(
            int(p) for p in per_axis(patch_size, self.dims, "patch_size")
        )
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}"
            )
        self.hidden_size = hidden_size
        self.checkpoint = checkpoint
        self.fields = FieldConditioning(field_channels, self.dims, field_resample)
        self.patch_embed = conv_nd(
            self.dims,
            in_channels + self.fields.extra_channels,
            hidden_size,
            kernel_size=self.patch_size,
            stride=self.patch_size,
        )
        self.cond_embed = ConditionEmbedding(
            hidden_size,
            num_params=num_params,
            embedding_dim=embedding_dim,
            param_fourier_features=param_fourier_features,
            param_fourier_scale=param_fourier_scale,
        )
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(hidden_size, 2 * hidden_size)
        self.final = nn.Linear(
            hidden_size, math.prod(self.patch_size) * self.out_channels
        )
        self._pos_cache: tuple[tuple, Tensor] | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        # DiT's initialisation: Xavier linears, the patch embedding as a linear,
        # N(0, 0.02) time MLP, and zeros for every adaLN modulation and the output.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in self.cond_embed.time.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)
        for layer in (self.final_ada, self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def position_embedding(
        self, grid: Sequence[int], device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        """``[1, N, D]`` sin-cos embedding of the token grid (cached for the last grid seen)."""
        if torch.compiler.is_compiling():  # traced into the graph: no cache to guard on
            return sincos_position_embedding(grid, self.hidden_size).to(device=device, dtype=dtype)[None]
        key = (tuple(grid), device, dtype)
        if self._pos_cache is None or self._pos_cache[0] != key:
            pos = sincos_position_embedding(grid, self.hidden_size).to(
                device=device, dtype=dtype
            )
            self._pos_cache = (key, pos[None])
        return self._pos_cache[1]

    def tokens(self, x: Tensor, cond: Conditioning | None) -> tuple[Tensor, tuple[int, ...]]:
        """The input tokens ``[B, N, D]`` (patches of the field and its condition fields, with
        their positions) and the token grid."""
        h = self.patch_embed(self.fields(x, cond))  # [B, D, *G]
        grid = tuple(h.shape[2:])
        # contiguous: elementwise ops keep a transposed layout, and every Linear would copy it
        h = h.flatten(2).transpose(1, 2).contiguous()  # [B, N, D]
        return h + self.position_embedding(grid, h.device, h.dtype), grid

    def run_block(self, block: nn.Module, h: Tensor, c: Tensor) -> Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, c, use_reentrant=False)
        return block(h, c)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None,
                residuals: Sequence[Tensor] | None = None) -> Tensor:
        """``x: [B, C, *S]``, ``t: [B]`` int timesteps, ``cond`` or ``None`` -> ``[B, C_out, *S]``.

        ``residuals`` (a ControlNet's, :class:`scidiff.nets.controlnet.ControlNet`): tokens
        ``[B, N, D]`` added to the outputs of the first ``len(residuals)`` blocks."""
        check_input(x, t, self.in_channels, self.dims, divisor=self.patch_size)
        b = x.shape[0]
        h, grid = self.tokens(x, cond)
        c = F.silu(self.cond_embed(t, cond))
        residuals = list(residuals or ())
        if len(residuals) > len(self.blocks):
            raise ValueError(f"residuals: at most {len(self.blocks)} (one per block), got {len(residuals)}")
        for i, block in enumerate(self.blocks):
            h = self.run_block(block, h, c)
            if i < len(residuals):
                h = h + residuals[i]
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        h = self.final(
            modulate(self.final_norm(h), shift, scale)
        )  # [B, N, prod(p) * C_out]
        return self.unpatchify(h, grid, b)

    def unpatchify(self, h: Tensor, grid: Sequence[int], batch: int) -> Tensor:
        """``[B, N, prod(p) * C_out]`` -> ``[B, C_out, G_1 p_1, ..., G_d p_d]``."""
        d = self.dims
        h = h.reshape(batch, *grid, *self.patch_size, self.out_channels)
        # [B, G_1..G_d, p_1..p_d, C] -> [B, C, G_1, p_1, ..., G_d, p_d]
        order = [0, 2 * d + 1] + [j for i in range(d) for j in (1 + i, 1 + d + i)]
        h = h.permute(*order)
        return h.reshape(
            batch, self.out_channels, *(g * p for g, p in zip(grid, self.patch_size))
        )

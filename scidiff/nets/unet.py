"""ADM-style UNet denoiser for fields of spatial rank 1, 2 or 3.

Architecture (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", Sec. 3):
residual blocks with GroupNorm, dropout and FiLM (scale-shift) injection of the
time + condition embedding; self-attention (``scaled_dot_product_attention``)
at chosen levels and in the middle; stride-2 convolutions down,
nearest-neighbour + convolution up; skip connections from every down block to
the matching up block. The network knows nothing of the noise schedule: it maps
``(x_t, t, cond)`` to ``C`` (or ``2C`` with a learned variance) channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.nets.embeddings import ConditionEmbedding, FieldConditioning, FieldResample
from scidiff.nets.layers import (
    Conv,
    Downsample,
    PaddingMode,
    ResBlock,
    SelfAttention,
    Upsample,
    check_dims,
    check_input,
    check_norm,
    norm_layer,
    pad_axes,
    padding_modes,
    zero_module,
)


class _EmbedSequential(nn.Sequential):
    """A sequence of layers; residual blocks also receive the embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """ADM UNet: ``forward(x [B, C, *S], t [B], cond) -> [B, C_out, *S]``.

    Args:
        in_channels: ``C``, channels of the field.
        dims: spatial rank (1, 2 or 3).
        model_channels: base width; level ``l`` has ``model_channels * channel_mult[l]`` channels.
        channel_mult: width multiplier per level; ``len(channel_mult) - 1`` downsamplings.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_levels: indices of the levels with self-attention (0 = full resolution).
        mid_attention: self-attention in the middle block.
        num_heads: attention heads (used when ``head_channels`` is 0).
        head_channels: channels per attention head (0 = use ``num_heads``).
        dropout: dropout probability inside the residual blocks.
        padding: ``zeros``, ``circular`` (periodic axis) or ``reflect``, or one mode per axis,
            e.g. ``["zeros", "circular"]`` for a lat/lon grid.
        learned_variance: output ``2C`` channels (mean and variance interpolation) instead of ``C``.
        num_params: ``P`` of ``cond.params`` (0 = none).
        param_fourier_features, param_fourier_scale: Fourier features of the parameters.
        field_channels: ``Cf`` of ``cond.fields`` (0 = none).
        field_resample: how fields on another grid are brought to the field's grid.
        embedding_dim: ``E`` of ``cond.embedding`` (0 = none).
        checkpoint: recompute each block's activations in the backward pass
            (gradient checkpointing): less memory for large 3-D fields, ~30% more compute.
        norm_group_channels: the fewest channels in each GroupNorm group (default 4, as EDM's
            UNets): GroupNorm with one channel per group (what the old rule, gcd(channels, 32)
            groups, gave widths of 32 and fewer) removes every channel's spatial mean, and the
            network then cannot generate a field's domain mean (the k = 0 mode: 4x too small a
            spread on the quickstart's 16x16 fields). 1 rebuilds models trained before this key
            existed (their checkpoints load with it).
        norm: ``group`` (GroupNorm, as ADM and EDM) or ``none`` (no normalisation layer).
            GroupNorm's statistics are the whole sample's, so they scale every location and scale
            of a generated field together; ``none`` keeps a field's scales independent where the
            data's are (measured on the quickstart: docs/benchmarks/conditional-fidelity.md).
        pad_to_multiple: sizes not divisible by ``2**(len(channel_mult) - 1)`` are padded
            (zeros, or edge replication on ``reflect`` axes) and the output cropped back;
            ``False`` refuses them. Circular axes are always refused, since padding would
            break their periodicity.
    """

    def __init__(
        self,
        in_channels: int,
        dims: int = 2,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1, 2),
        mid_attention: bool = True,
        num_heads: int = 4,
        head_channels: int = 64,
        dropout: float = 0.0,
        padding: PaddingMode | Sequence[PaddingMode] = "zeros",
        learned_variance: bool = False,
        num_params: int = 0,
        param_fourier_features: int = 0,
        param_fourier_scale: float = 1.0,
        field_channels: int = 0,
        field_resample: FieldResample = "linear",
        embedding_dim: int = 0,
        pad_to_multiple: bool = True,
        checkpoint: bool = False,
        norm_group_channels: int = 4,
        norm: str = "group",
    ):
        super().__init__()
        self.dims = check_dims(dims)
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learned_variance else in_channels
        self.padding = padding_modes(padding, self.dims)
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_levels = {int(a) for a in attention_levels}
        if not channel_mult:
            raise ValueError("channel_mult must have at least one level")
        if bad := attention_levels - set(range(len(channel_mult))):
            raise ValueError(
                f"attention_levels {sorted(bad)} are not levels of channel_mult={channel_mult} "
                f"(0..{len(channel_mult) - 1})"
            )
        self.factor = 2 ** (len(channel_mult) - 1)
        self.pad_to_multiple = pad_to_multiple
        self.checkpoint = checkpoint
        self.norm_group_channels = norm_group_channels = int(norm_group_channels)
        if norm_group_channels < 1:
            raise ValueError(f"norm_group_channels must be >= 1, got {norm_group_channels}")
        self.norm = check_norm(norm)

        def heads(ch: int) -> int:
            if head_channels:
                if ch % head_channels:
                    raise ValueError(
                        f"width {ch} is not divisible by head_channels={head_channels}"
                    )
                return ch // head_channels
            return num_heads

        emb_dim = 4 * model_channels
        self.cond_embed = ConditionEmbedding(
            emb_dim,
            num_params=num_params,
            embedding_dim=embedding_dim,
            freq_dim=model_channels,
            param_fourier_features=param_fourier_features,
            param_fourier_scale=param_fourier_scale,
        )
        self.fields = FieldConditioning(field_channels, self.dims, field_resample)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(self.dims, cin, cout, emb_dim, dropout, self.padding, norm_group_channels, norm)

        ch = model_channels * channel_mult[0]
        self.input_conv = Conv(
            self.dims,
            in_channels + self.fields.extra_channels,
            ch,
            3,
            padding=self.padding,
        )
        skips = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if level in attention_levels:
                    layers.append(SelfAttention(ch, heads(ch), norm_group_channels, norm))
                self.down.append(_EmbedSequential(*layers))
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(
                    _EmbedSequential(Downsample(self.dims, ch, self.padding))
                )
                skips.append(ch)

        mid = [res(ch, ch)]
        if mid_attention:
            mid.append(SelfAttention(ch, heads(ch), norm_group_channels, norm))
        mid.append(res(ch, ch))
        self.mid = _EmbedSequential(*mid)

        self.skip_channels = tuple(skips)  # the widths of the skips, then the middle: what a ControlNet adds to
        self.mid_channels = ch
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), model_channels * mult)]
                ch = model_channels * mult
                if level in attention_levels:
                    layers.append(SelfAttention(ch, heads(ch), norm_group_channels, norm))
                if level and i == num_res_blocks:
                    layers.append(Upsample(self.dims, ch, self.padding))
                self.up.append(_EmbedSequential(*layers))
        assert not skips

        self.out_norm = norm_layer(ch, norm, norm_group_channels)
        self.out_conv = zero_module(
            Conv(self.dims, ch, self.out_channels, 3, padding=self.padding)
        )

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None, *,
                residuals: Sequence[Tensor] | None = None) -> Tensor:
        """``x: [B, C, *S]``, ``t: [B]`` int timesteps, ``cond`` or ``None`` -> ``[B, C_out, *S]``.

        ``residuals`` (a ControlNet's, :class:`scidiff.nets.controlnet.ControlNet`): one tensor per
        skip connection (widths ``skip_channels``) and one for the middle block (``mid_channels``),
        added to them."""
        check_input(x, t, self.in_channels, self.dims)
        spatial = tuple(x.shape[2:])
        emb = F.silu(self.cond_embed(t, cond))
        h = self._pad(self.fields(x, cond))
        h = self.input_conv(h)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        if residuals is not None:
            if len(residuals) != len(hs) + 1:
                raise ValueError(f"residuals: expected {len(hs) + 1} tensors (skips and middle), got {len(residuals)}")
            hs = [a + r for a, r in zip(hs, residuals)]
            h = h + residuals[-1]
        for block in self.up:
            h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb)
        out = self.out_conv(F.silu(self.out_norm(h)))
        if tuple(out.shape[2:]) == spatial:  # not padded: the output itself, not a view of it (FSDP2 hooks it)
            return out
        return out[(..., *(slice(0, s) for s in spatial))].contiguous()

    def check_grid(self, spatial_shape: Sequence[int]) -> None:
        """Raise ``ValueError`` when fields on ``spatial_shape`` cannot pass through every level:
        a size not divisible by ``2**levels`` on a circular axis (or without ``pad_to_multiple``),
        or a reflect-padded axis with fewer than 2 points at the deepest level."""
        spatial = tuple(int(s) for s in spatial_shape)
        extra = [(-s) % self.factor for s in spatial]
        bad = [i for i, (e, m) in enumerate(zip(extra, self.padding))
               if e and (m == "circular" or not self.pad_to_multiple)]
        if bad:
            raise ValueError(
                f"spatial shape {spatial} must be divisible by 2**levels = {self.factor} on "
                f"axes {bad} (padding {[self.padding[i] for i in bad]}, pad_to_multiple="
                f"{self.pad_to_multiple}); choose a grid size that is a multiple of {self.factor} "
                "or fewer levels in channel_mult"
            )
        small = [i for i, (s, e, m) in enumerate(zip(spatial, extra, self.padding))
                 if m == "reflect" and (s + e) // self.factor < 2]
        if small:
            i = small[0]
            raise ValueError(
                f"channel_mult: spatial shape {spatial} is too small for {self.factor.bit_length()} levels: axis {i} "
                f"would have {(spatial[i] + extra[i]) // self.factor} point(s) at the deepest level, and its reflect "
                "padding needs 2; use fewer levels in channel_mult"
            )

    def _run(self, block: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def _pad(self, x: Tensor) -> Tensor:
        """Pad each axis at its end up to a multiple of ``2**levels`` (see ``pad_to_multiple``)."""
        spatial = x.shape[2:]
        self.check_grid(spatial)
        extra = [(-s) % self.factor for s in spatial]
        if not any(extra):
            return x
        modes = [
            "replicate" if m == "reflect" else "zeros" if m == "zeros" else m
            for m in self.padding
        ]
        for axis, e in enumerate(extra):
            if e:
                pads = [(0, 0)] * self.dims
                pads[axis] = (0, e)
                x = _pad_edge(x, pads, modes[axis])
        return x


def _pad_edge(x: Tensor, pads, mode: str) -> Tensor:
    if mode == "replicate":
        spec = []
        for lo, hi in reversed(pads):
            spec += [lo, hi]
        return F.pad(x, spec, mode="replicate")
    return pad_axes(x, pads, [mode] * len(pads))

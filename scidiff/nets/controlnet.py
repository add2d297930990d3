"""ControlNet (Zhang et al. 2023) for the UNet and the DiT: a new spatial condition for a frozen model.

For a UNet, a trainable copy of the base's input convolution, encoder and middle block reads
the noisy field together with the new condition field (through a small condition encoder whose
last convolution starts at zero); its feature maps reach the frozen base through convolutions
of width 1 that also start at zero, added to the base's skip connections and middle block.
For a DiT (as PixArt-delta does), a trainable copy of the base's first ``blocks`` transformer
blocks reads the base's input tokens plus the new condition's, patch-embedded by a condition
encoder whose last layer starts at zero; the copy's output tokens after each block reach the
base's block of the same index through linear layers that start at zero.
At initialisation every added term is exactly zero, so the ControlNet *is* the base model;
training moves only the copy, the condition encoder and the zero layers.

The new condition travels as the last ``control_channels`` channels of ``cond.fields`` (after
the base model's own condition fields, if any), so data stores, sampling, guidance (the null
condition drops it with the others) and the Denoiser contract need nothing new. ``scale``
multiplies the added terms at sampling time (0: the base model).
"""

from __future__ import annotations

import copy
import dataclasses

from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.nets.dit import DiT
from scidiff.nets.embeddings import FieldConditioning
from scidiff.nets.layers import Conv, conv_nd, zero_module
from scidiff.nets.unet import UNet


class ControlNet(nn.Module):
    """A frozen :class:`UNet` or :class:`DiT` with a trainable control branch for
    ``control_channels`` new fields.

    Args:
        base: the trained denoiser (frozen here).
        control_channels: channels of the new condition, the last of ``cond.fields``.
        scale: the control branch's weight (a sampling-time setting; 1 in training).
        hint_channels: width of the condition encoder.
        blocks: for a DiT, how many of its first blocks the control branch copies (``None``:
            half of them, at least one); a UNet's branch is always its whole encoder.
    """

    def __init__(self, base: nn.Module, control_channels: int, scale: float = 1.0, hint_channels: int = 16,
                 blocks: int | None = None) -> None:
        super().__init__()
        if not isinstance(base, (UNet, DiT)):
            raise ValueError(f"finetune.controlnet: needs a UNet or DiT denoiser, got {type(base).__name__}")
        if isinstance(control_channels, bool) or not isinstance(control_channels, int) or control_channels < 1:
            raise ValueError(f"finetune.controlnet: the new condition needs >= 1 channel, got {control_channels!r}")
        self.base = base.requires_grad_(False)
        self.dims, self.in_channels, self.out_channels = base.dims, base.in_channels, base.out_channels
        self.base_field_channels = base.fields.field_channels
        self.control_channels = int(control_channels)
        self.hint_channels = int(hint_channels)
        self.scale = float(scale)
        self.control = FieldConditioning(control_channels, base.dims, base.fields.resample)
        hint_in = control_channels + 1  # the new fields and their presence indicator
        if isinstance(base, UNet):
            if blocks is not None:
                raise ValueError("finetune.controlnet.blocks: only for a DiT (a UNet's branch is its whole encoder)")
            width = base.input_conv.conv.out_channels
            self.hint = nn.Sequential(
                Conv(base.dims, hint_in, hint_channels, 3, padding=base.padding), nn.SiLU(),
                zero_module(Conv(base.dims, hint_channels, width, 3, padding=base.padding)))
            self.input_conv = copy.deepcopy(base.input_conv).requires_grad_(True)
            self.down = copy.deepcopy(base.down).requires_grad_(True)
            self.mid = copy.deepcopy(base.mid).requires_grad_(True)
            self.zero = nn.ModuleList(zero_module(conv_nd(base.dims, c, c, 1))
                                      for c in (*base.skip_channels, base.mid_channels))
        else:
            depth = len(base.blocks)
            n = max(1, depth // 2) if blocks is None else blocks
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= depth:
                raise ValueError(f"finetune.controlnet.blocks: expected 1..{depth} (the DiT's depth), got {blocks!r}")
            self.hint = nn.Sequential(
                conv_nd(base.dims, hint_in, hint_channels, 3, padding=1), nn.SiLU(),
                zero_module(conv_nd(base.dims, hint_channels, base.hidden_size, kernel_size=base.patch_size,
                                    stride=base.patch_size)))
            self.blocks = copy.deepcopy(base.blocks[:n]).requires_grad_(True)
            self.zero = nn.ModuleList(zero_module(nn.Linear(base.hidden_size, base.hidden_size)) for _ in range(n))

    def settings(self) -> dict[str, int | None]:
        """The constructor's arguments that shape the branch (what a checkpoint records to rebuild it)."""
        return {"control_channels": self.control_channels, "hint_channels": self.hint_channels,
                "blocks": len(self.blocks) if isinstance(self.base, DiT) else None}

    def split(self, cond: Conditioning | None) -> tuple[Conditioning | None, Conditioning]:
        """``cond`` -> (the base model's condition, the new condition's)."""
        fields = None if cond is None else cond.fields
        if fields is None or fields.shape[1] != self.base_field_channels + self.control_channels:
            got = "none" if fields is None else fields.shape[1]
            raise ValueError(f"cond.fields: the ControlNet needs {self.base_field_channels} base + "
                             f"{self.control_channels} control channels, got {got}")
        base_fields = fields[:, : self.base_field_channels] if self.base_field_channels else None
        return (dataclasses.replace(cond, fields=base_fields),
                Conditioning(fields=fields[:, self.base_field_channels:], drop=cond.drop))

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        base_cond, control = self.split(cond)
        base = self.base
        hint = self.control(x[:, :0], control)   # the new field (dropped with the null condition)
        residuals = self._dit(x, t, base_cond, hint) if isinstance(base, DiT) else self._unet(x, t, base_cond, hint)
        if self.scale != 1.0:
            residuals = [self.scale * r for r in residuals]
        return base(x, t, base_cond, residuals=residuals)

    def _unet(self, x: Tensor, t: Tensor, base_cond: Conditioning, hint: Tensor) -> list[Tensor]:
        base = self.base
        emb = nn.functional.silu(base.cond_embed(t, base_cond))
        h = self.input_conv(base._pad(base.fields(x, base_cond))) + self.hint(base._pad(hint))
        residuals = [self.zero[0](h)]
        for block, zero in zip(self.down, self.zero[1:]):
            h = base._run(block, h, emb)
            residuals.append(zero(h))
        residuals.append(self.zero[-1](base._run(self.mid, h, emb)))
        return residuals

    def _dit(self, x: Tensor, t: Tensor, base_cond: Conditioning, hint: Tensor) -> list[Tensor]:
        base = self.base
        c = nn.functional.silu(base.cond_embed(t, base_cond))
        h, _ = base.tokens(x, base_cond)
        h = h + self.hint(hint).flatten(2).transpose(1, 2)
        residuals = []
        for block, zero in zip(self.blocks, self.zero):
            h = base.run_block(block, h, c)
            residuals.append(zero(h))
        return residuals


__all__ = ["ControlNet"]

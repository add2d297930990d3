"""Exponential moving average of a denoiser's weights.

The average lives in a frozen copy of the network (``EMA.model``), a submodule of
the :class:`~scidiff.training.DiffusionModule`, so it is saved in and restored
from every checkpoint with the rest of the state dict, and it is moved between
devices with the module.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """theta_ema <- d_n theta_ema + (1 - d_n) theta after every optimizer step.

    Args:
        model: the network being trained; a frozen deep copy holds the average.
        decay: the long-run decay d (e.g. 0.999 for ~1000-step memory).
        warmup: steps over which the decay ramps up, d_n = min(d, (1 + n) / (warmup + n))
            for the n-th update (n = 0, 1, ...). ``warmup = 10`` is the usual ramp (the
            average follows the fast-moving early weights); ``0`` starts at ``decay``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: int = 10) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        if warmup < 0:
            raise ValueError(f"ema warmup must be >= 0 steps, got {warmup}")
        self.decay, self.warmup = float(decay), int(warmup)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # a buffer, so the number of updates travels with the checkpoint
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        if self.warmup == 0:
            return self.decay
        return min(self.decay, (1.0 + n) / (self.warmup + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            ema_params[name].lerp_(p.detach(), 1.0 - d)   # ema + (1 - d) (p - ema)
        ema_buffers = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:
        # the averaged copy always runs in eval mode (no dropout)
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

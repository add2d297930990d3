"""Learning-rate schedules, instantiated from config with ``_partial_: true``, and the
optimiser set-up every training module returns to Lightning."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``
    at ``total_steps`` (flat afterwards). Stepped once per optimizer step.

    lr(s) = lr * (s + 1) / w                                      for s < w
    lr(s) = lr * (r + (1 - r) (1 + cos(pi * min(1, (s - w) / (S - w)))) / 2)   otherwise
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    warmup_steps = min(warmup_steps, total_steps)  # short runs (tests, smoke runs) only warm up
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def configure_optimization(optimizer: Callable[..., Optimizer], lr_scheduler: Callable[..., Any] | None,
                           params: Iterable, total_steps: int) -> Any:
    """What ``LightningModule.configure_optimizers`` returns: ``optimizer(params=...)``, with
    ``lr_scheduler(optimizer, total_steps=...)`` stepped every optimiser step when given."""
    opt = optimizer(params=params)
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(opt, total_steps=int(total_steps)),
                                               "interval": "step"}}

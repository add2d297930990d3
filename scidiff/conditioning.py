"""The ``Conditioning`` contract shared by denoisers, samplers and guidance.

A denoiser is called as ``denoiser(x, t, cond)`` with ``cond`` a
:class:`Conditioning` or ``None``. Every part is optional and batch-first:

* ``params``    ``[B, P]``          physical parameters, normalised;
* ``fields``    ``[B, Cf, *S]``     spatial conditions (coarse field, static maps, masks);
* ``embedding`` ``[B, E]``          precomputed vectors (e.g. CLIP-like);
* ``drop``      ``BoolTensor[B]``   ``True`` where the sample uses the *null*
  condition (classifier-free guidance). Denoisers learn the null embedding, so a
  single model gives both the conditional and the unconditional prediction.

This module imports torch only, so ``scidiff.diffusion`` and ``scidiff.nets``
can both depend on it without depending on each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

_PARTS = ("params", "fields", "embedding", "drop")


@dataclass(frozen=True)
class Conditioning:
    """Optional conditions for a batch of ``B`` samples (see module docstring)."""

    params: Tensor | None = None
    fields: Tensor | None = None
    embedding: Tensor | None = None
    drop: Tensor | None = None

    def __post_init__(self) -> None:
        sizes = {name: t.shape[0] for name in _PARTS if (t := getattr(self, name)) is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Conditioning parts disagree on the batch size: {sizes}")
        if self.params is not None and self.params.ndim != 2:
            raise ValueError(f"Conditioning.params must be [B, P], got shape {tuple(self.params.shape)}")
        if self.embedding is not None and self.embedding.ndim != 2:
            raise ValueError(
                f"Conditioning.embedding must be [B, E], got shape {tuple(self.embedding.shape)}"
            )
        if self.fields is not None and not 3 <= self.fields.ndim <= 5:
            raise ValueError(
                f"Conditioning.fields must be [B, Cf, *S] with 1-3 spatial dims, "
                f"got shape {tuple(self.fields.shape)}"
            )
        if self.drop is not None and (self.drop.ndim != 1 or self.drop.dtype != torch.bool):
            raise ValueError(
                f"Conditioning.drop must be a bool tensor [B], got {self.drop.dtype} "
                f"of shape {tuple(self.drop.shape)}"
            )

    @property
    def batch_size(self) -> int | None:
        """``B`` if any part is set, else ``None``."""
        for name in _PARTS:
            if (t := getattr(self, name)) is not None:
                return t.shape[0]
        return None

    def replace(self, **changes: Tensor | None) -> Conditioning:
        """A copy with some parts replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def map(self, fn) -> Conditioning:
        """Apply ``fn`` to every tensor part (e.g. ``lambda t: t.to(device)``)."""
        return Conditioning(**{n: (None if (t := getattr(self, n)) is None else fn(t)) for n in _PARTS})

    def to(self, *args, **kwargs) -> Conditioning:
        """Move floating parts like ``Tensor.to``; ``drop`` keeps its bool dtype."""
        moved = {}
        for name in _PARTS:
            t = getattr(self, name)
            if t is None:
                moved[name] = None
            elif name == "drop":
                moved[name] = t.to(device=_device_of(args, kwargs, t.device))
            else:
                moved[name] = t.to(*args, **kwargs)
        return Conditioning(**moved)

    def dropped(self, drop: Tensor) -> Conditioning:
        """A copy whose ``drop`` is ``drop`` or-ed with the existing one."""
        drop = drop.to(torch.bool)
        if self.drop is not None:
            drop = drop | self.drop
        return self.replace(drop=drop)

    @staticmethod
    def cat(conds: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch. Parts must be set in all or in none.

        ``drop`` left unset in some inputs counts as all-``False`` there.
        """
        out = {}
        for name in _PARTS:
            parts = [getattr(c, name) for c in conds]
            if all(p is None for p in parts):
                out[name] = None
            elif name == "drop":
                device = next(p.device for p in parts if p is not None)
                out[name] = torch.cat(
                    [
                        p if p is not None else torch.zeros(c.batch_size or 0, dtype=torch.bool, device=device)
                        for p, c in zip(parts, conds)
                    ]
                )
            elif any(p is None for p in parts):
                raise ValueError(f"Conditioning.cat: part {name!r} is set in some inputs only")
            else:
                out[name] = torch.cat(parts)
        return Conditioning(**out)


def _device_of(args: tuple, kwargs: dict, default: torch.device) -> torch.device:
    if "device" in kwargs:
        return torch.device(kwargs["device"])
    for a in args:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, Tensor):
            return a.device
    return default

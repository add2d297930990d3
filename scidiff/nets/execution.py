"""How a denoiser runs: arithmetic precision, ``torch.compile`` and memory format.

The fast paths of a GPU run, in one place, for training and for sampling alike:

* **precision** ``bf16``: the denoiser's forward runs under ``torch.autocast`` in bfloat16
  (matrix products, convolutions, attention); its output is returned in the input's dtype,
  so what consumes it (the loss, a sampler's state, the likelihood's sums) stays in float32
  or float64. The weights stay float32. Training's precision is Lightning's
  ``trainer.precision=bf16-mixed``, which does the same around the training step.
* **compile**: ``torch.compile`` of the denoiser once per process. The batch dimension of
  every input is marked dynamic before the first call, so neither a sampler's steps (the
  timestep is a tensor) nor a new batch size (a last micro-batch, guidance's doubled batch)
  compiles again; the spatial grid stays static (one grid per model). One exception, on CPUs:
  oneDNN chooses its convolution algorithm by batch size (below or from 16), so a UNet compiled
  at a batch below 16 compiles once more at a batch of 16 or more.
* **channels_last**: channels-last memory format for the convolutions of a 2-D or 3-D
  denoiser (``torch.channels_last`` / ``channels_last_3d``), the layout tensor cores'
  convolution kernels read without transposing. A 1-D field has no such layout.

:class:`Execution` is the configuration (``execution.*`` of ``scidiff-sample``,
``-evaluate`` and ``-invert``; ``module.compile`` / ``module.channels_last`` of training)
and :class:`Accelerated` the denoiser run with it. Only the precision changes the numbers
beyond rounding, so only it is part of an ensemble's identity (:meth:`Execution.identity`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from scidiff.conditioning import Conditioning

PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Lightning's spellings, accepted where a user might carry them over from trainer.precision
_PRECISION_ALIASES = {"32-true": "32", "bf16-mixed": "bf16"}


def check_compile(value: Any, key: str) -> str | None:
    """The ``torch.compile`` mode ``value`` asks for (``False``/``None``: none, ``True``: ``default``),
    or ``ValueError`` naming ``key``."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(f"{key}: expected true, false or a torch.compile mode {COMPILE_MODES}, got {value!r}")


def check_precision(value: Any, key: str) -> str:
    """``"32"`` or ``"bf16"`` from ``value`` (``32``, ``"32"``, ``"32-true"``, ``"bf16"``, ``"bf16-mixed"``),
    or ``ValueError`` naming ``key``."""
    name = _PRECISION_ALIASES.get(str(value), str(value)) if not isinstance(value, bool) else ""
    if name not in PRECISIONS:
        raise ValueError(f"{key}: expected 32 or bf16, got {value!r}")
    return name


def memory_format(dims: int) -> torch.memory_format:
    """The channels-last memory format of fields of spatial rank ``dims`` (2 or 3)."""
    if dims == 2:
        return torch.channels_last
    if dims == 3:
        return torch.channels_last_3d
    raise ValueError(f"channels_last: fields of spatial rank {dims} have no channels-last layout "
                     "(2-D and 3-D only); set channels_last=false")


def mark_batch_dynamic(x: Tensor, t: Tensor, cond: Conditioning | None) -> None:
    """Mark the batch dimension of every input dynamic for ``torch.compile`` (a new batch size
    then reuses the compiled graph). A batch of one is left alone: torch specialises size 1."""
    parts = [x, t] + ([p for p in (cond.params, cond.fields, cond.embedding, cond.drop) if p is not None]
                      if cond is not None else [])
    for p in parts:
        if p.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(p, 0)


@dataclass(frozen=True)
class Execution:
    """How to run a denoiser.

    Args:
        precision: ``"32"`` (float32) or ``"bf16"`` (bfloat16 autocast, float32 outputs).
        compile: ``False``, ``True`` (mode ``default``) or a ``torch.compile`` mode.
        channels_last: channels-last convolutions (2-D and 3-D denoisers).
        backend: the ``torch.compile`` backend (``inductor``; another name or a callable for
            debugging, e.g. ``aot_eager``).
    """

    precision: str = "32"
    compile: bool | str = False
    channels_last: bool = False
    backend: str | Callable = "inductor"

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", check_precision(self.precision, "execution.precision"))
        check_compile(self.compile, "execution.compile")
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"execution.channels_last: expected true or false, got {self.channels_last!r}")

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> Execution:
        """From a config node ``{precision, compile, channels_last}`` (``None``: the defaults)."""
        if node is None:
            return cls()
        if not isinstance(node, Mapping):
            raise ValueError(f"execution: expected {{precision, compile, channels_last}}, got {node!r}")
        known = {"precision", "compile", "channels_last", "backend"}
        if unknown := sorted(set(node) - known):
            raise ValueError(f"execution: unknown key(s) {unknown}; expected {sorted(known - {'backend'})}")
        return cls(**dict(node))

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, ``None`` in float32."""
        return PRECISIONS[self.precision]

    @property
    def is_default(self) -> bool:
        return self.precision == "32" and not self.compile and not self.channels_last

    def identity(self) -> dict[str, str]:
        """What of the execution changes the numbers beyond rounding: the precision when not float32."""
        return {} if self.precision == "32" else {"precision": self.precision}

    def describe(self) -> str:
        parts = [{"32": "float32", "bf16": "bf16 autocast"}[self.precision]]
        if mode := check_compile(self.compile, "execution.compile"):
            parts.append(f"torch.compile ({mode})")
        if self.channels_last:
            parts.append("channels-last")
        return ", ".join(parts)

    def apply(self, net: nn.Module, dims: int) -> nn.Module:
        """``net`` itself with the defaults, else :class:`Accelerated` around it."""
        return net if self.is_default else Accelerated(net, self, dims)


class Accelerated(nn.Module):
    """``net`` run with an :class:`Execution`; a denoiser itself (``forward(x, t, cond, **kw)``),
    returning its output in ``x``'s dtype. ``net`` stays the only registered submodule, so the
    weights, ``.to(device)`` and the state dict are the network's own (under ``net.``).

    Args:
        net: the denoiser.
        execution: the precision, compilation and memory format.
        dims: the spatial rank of the fields ``net`` takes (for the memory format).
    """

    def __init__(self, net: nn.Module, execution: Execution, dims: int) -> None:
        super().__init__()
        self.net = net
        self.execution = execution
        self.format = memory_format(dims) if execution.channels_last else None
        if self.format is not None:
            net.to(memory_format=self.format)
        mode = check_compile(execution.compile, "execution.compile")
        # kept out of the module tree: the compiled wrapper holds ``net`` again
        self.__dict__["_compiled"] = (torch.compile(net, mode=mode, backend=execution.backend)
                                      if mode is not None else None)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None, **kwargs: Any) -> Tensor:
        dtype = x.dtype
        if self.format is not None:
            x = x.contiguous(memory_format=self.format)
        run = self.net
        if self._compiled is not None:
            if cond is not None and cond.drop is None:  # one graph for guided (a drop mask) and plain calls
                cond = cond.replace(drop=torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
            mark_batch_dynamic(x, t, cond)
            run = self._compiled
        autocast = (torch.autocast(x.device.type, dtype=self.execution.dtype) if self.execution.dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            out = run(x, t, cond, **kwargs)
        return out.to(dtype).contiguous()


__all__ = ["Accelerated", "COMPILE_MODES", "Execution", "PRECISIONS", "check_compile", "check_precision",
           "mark_batch_dynamic", "memory_format"]

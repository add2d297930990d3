"""Where a command runs: its device and its place among the ranks of a distributed job.

:func:`resolve_device` turns ``device=auto|cpu|cuda|cuda:N`` into a device (each rank
its own GPU); :func:`distributed_context` reads the rank and world size from an
initialised ``torch.distributed`` group, else from torchrun's ``RANK``/``WORLD_SIZE``
(initialising the group, ``nccl`` on CUDA, ``gloo`` otherwise), else a single process;
:class:`DistContext` offers the few collectives sampling and evaluation need.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


class DeviceError(ValueError):
    """A device that is not available (the message names the ``device`` setting)."""


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` -> CUDA (this rank's GPU, from ``LOCAL_RANK``) when available, else CPU;
    otherwise the device named, checked."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device: {name!r} is not a device (auto, cpu, cuda or cuda:<index>)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device: {name} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


@dataclass(frozen=True)
class DistContext:
    """This process's rank among ``world_size``; ``initialized_here`` when :func:`distributed_context`
    created the process group (and :meth:`close` destroys it)."""

    rank: int = 0
    world_size: int = 1
    initialized_here: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def _tensor(self, values: Sequence[float]) -> torch.Tensor:
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64)
        return t.cuda() if dist.get_backend() == "nccl" else t

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = self._tensor(values)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def max(self, value: float) -> float:
        if not self.active:
            return value
        import torch.distributed as dist

        t = self._tensor([value])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (picklable objects)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def current_context() -> DistContext:
    """The rank and world size of an initialised ``torch.distributed`` group, else a single process
    (initialises nothing)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), False)
    return DistContext()


def distributed_context(device: torch.device | str = "cpu") -> DistContext:
    """Rank and world size: from an initialised process group, else from torchrun's
    ``RANK``/``WORLD_SIZE`` (the group is then initialised here, ``nccl`` on CUDA,
    ``gloo`` otherwise), else a single process."""
    import torch.distributed as dist

    ctx = current_context()
    if ctx.active or (dist.is_available() and dist.is_initialized()):
        return ctx
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistContext()
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    return DistContext(dist.get_rank(), dist.get_world_size(), True)


__all__ = ["DeviceError", "DistContext", "current_context", "distributed_context", "resolve_device"]

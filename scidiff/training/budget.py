"""What one training step of a configuration costs, estimated before training starts.

A configuration written for a GPU cluster (e.g. ``experiment=climate denoiser=dit``)
runs on the CPU trainer too, at ~50 s a step and 13 GB for 100 000 steps, without a
word. :func:`estimate_step` runs the denoiser once on PyTorch's *meta* device (shapes
only, no arithmetic, no memory) to count the floating-point operations of a forward
pass (``torch.utils.flop_counter``) and the bytes autograd keeps for the backward
pass; :func:`budget_warning` turns that into one line when the run is a GPU job:

* on a CPU: the step time, from the FLOPs of forward + backward (3x the forward)
  at a fraction of this machine's measured matrix-multiply rate, times the steps left,
  is more than ``max_hours``; or the memory is more than 80 % of the machine's;
* on a GPU: the memory is more than 90 % of the device's.

The figures are estimates, within a factor of about 2 of measured step times on a 2-core
Xeon (the quickstart: ~0.05 s estimated, 0.09 s measured): enough to tell a minutes job
from a months one.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from scidiff.conditioning import Conditioning

# forward + backward ~ 3 forwards; a training step reaches about this fraction of a CPU's
# large-matmul rate (2-core Xeon: 0.15 for the quickstart's small UNet, whose step is
# dominated by overheads, to 0.5 for larger UNets)
BACKWARD_FACTOR = 3.0
CPU_EFFICIENCY = 0.25
# weights, gradients, two AdamW moments and the EMA copy, float32
STATE_BYTES_PER_PARAM = 5 * 4


@dataclass(frozen=True)
class StepEstimate:
    """Estimated cost of one training step at a given batch shape (one device).

    Attributes:
        flops: floating-point operations of forward + backward.
        activation_bytes: what autograd keeps between forward and backward.
        state_bytes: weights, gradients, optimiser moments and EMA.
        num_params: trainable parameters of the denoiser.
    """

    flops: float
    activation_bytes: int
    state_bytes: int
    num_params: int

    @property
    def memory_bytes(self) -> int:
        return self.activation_bytes + self.state_bytes


def estimate_step(denoiser: nn.Module, batch: dict[str, torch.Tensor] | tuple[int, ...]) -> StepEstimate:
    """Count one training step of ``denoiser`` on a batch like ``batch`` (a dict whose ``x``,
    ``params``, ``fields`` and ``embedding`` give the shapes, or the shape of ``x``), on the
    meta device: nothing is computed or allocated."""
    if isinstance(batch, tuple):
        batch = {"x": torch.empty(batch)}
    meta = copy.deepcopy(denoiser).to("meta")
    x = torch.empty(batch["x"].shape, device="meta")
    t = torch.zeros(x.shape[0], dtype=torch.long, device="meta")
    parts = {k: torch.empty(batch[k].shape, device="meta") for k in ("params", "fields", "embedding") if k in batch}
    cond = Conditioning(**parts) if parts else None
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if not isinstance(tensor, nn.Parameter) and not isinstance(tensor._base, nn.Parameter):
            # weights (and views of them, e.g. a transposed matrix) are counted once, in the state
            saved += tensor.numel() * tensor.element_size()
        return tensor

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        meta(x, t, cond)
    num_params = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    return StepEstimate(flops=BACKWARD_FACTOR * counter.get_total_flops(), activation_bytes=saved,
                        state_bytes=STATE_BYTES_PER_PARAM * num_params, num_params=num_params)


def cpu_flops_per_second(size: int = 1024, repeats: int = 3) -> float:
    """This machine's float32 matrix-multiply rate with torch's current threads (~0.1 s)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / max(time.perf_counter() - t0, 1e-9)


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def format_hours(hours: float) -> str:
    if hours < 1 / 40:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.0f} days"


def budget_warning(estimate: StepEstimate, *, accelerator: str, steps_left: int, max_hours: float = 24.0, cpu_rate: float | None = None,
                   device_memory: int | None = None) -> tuple[str, str | None]:
    """``(summary, warning)``: one line of the estimate, and a warning line when the run is a GPU
    job (module docstring), else ``None``. ``cpu_rate`` (FLOP/s) is measured when not given;
    ``device_memory`` is the GPU's (bytes) when ``accelerator`` is one."""
    memory = estimate.memory_bytes
    summary = f"~{estimate.flops / 1e9:.3g} GFLOP and ~{format_bytes(memory)} per step and device"
    if accelerator == "cpu":
        rate = (cpu_rate or cpu_flops_per_second()) * CPU_EFFICIENCY
        seconds = estimate.flops / rate
        hours = seconds * max(steps_left, 0) / 3600
        summary += f", ~{seconds:.2g} s/step on this CPU ({steps_left} steps: ~{format_hours(hours)})"
        ram = physical_memory_bytes()
        problems = []
        if hours > max_hours:
            problems.append(f"~{seconds:.2g} s per step, ~{format_hours(hours)} for {steps_left} steps")
        if ram is not None and memory > 0.8 * ram:
            problems.append(f"~{format_bytes(memory)} of the machine's {format_bytes(ram)}")
        if problems:
            return summary, (f"this configuration is a GPU job: on this CPU it needs {' and '.join(problems)} "
                             "(estimated); train it on a GPU (trainer=gpu), or shrink it (trainer.max_steps, "
                             "data.batch_size, a smaller denoiser)")
        return summary, None
    if device_memory is not None and memory > 0.9 * device_memory:
        return summary, (f"this configuration needs ~{format_bytes(memory)} per device (estimated) of the device's "
                         f"{format_bytes(device_memory)}: reduce data.batch_size, enable activation checkpointing "
                         "(denoiser.checkpoint=true) or use more devices")
    return summary, None


__all__ = ["StepEstimate", "budget_warning", "cpu_flops_per_second", "estimate_step"]

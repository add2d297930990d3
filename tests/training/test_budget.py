"""The cost estimate of a training step (scidiff.training.budget): FLOPs and memory counted on the
meta device against closed forms, and the one-line warning that a configuration is a GPU job."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scidiff.nets import DiT, UNet
from scidiff.training.budget import BACKWARD_FACTOR, StepEstimate, budget_warning, estimate_step
from tests.training.conftest import QUIET, run_train


class OneConv(nn.Module):
    """A denoiser of one convolution (its FLOPs have a closed form)."""

    def __init__(self, dims: int, c_in: int = 3, c_out: int = 5, k: int = 3) -> None:
        super().__init__()
        self.conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](c_in, c_out, k, padding=k // 2, bias=False)

    def forward(self, x, t, cond=None):
        return self.conv(x)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_flops_and_activations_of_a_convolution_match_the_closed_form(dims):
    spatial = (8, 6, 4)[:dims]
    batch, c_in, c_out, k = 4, 3, 5, 3
    net = OneConv(dims, c_in, c_out, k)
    est = estimate_step(net, (batch, c_in, *spatial))
    points = batch * torch.tensor(spatial).prod().item()
    forward = 2 * c_in * c_out * k**dims * points                 # multiply-adds of the convolution
    assert est.flops == BACKWARD_FACTOR * forward
    assert est.activation_bytes == 4 * c_in * points              # the input, kept for the weight gradient
    assert est.num_params == c_in * c_out * k**dims and est.state_bytes == 20 * est.num_params
    assert all(p.device.type == "cpu" for p in net.parameters())  # the model itself is untouched


@pytest.mark.parametrize("make", [
    lambda: UNet(2, dims=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                 head_channels=8),
    lambda: UNet(1, dims=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(),
                 mid_attention=False, num_params=2),
    lambda: DiT(2, dims=2, hidden_size=32, depth=2, num_heads=2, patch_size=2, num_params=2),
])
def test_cost_is_linear_in_the_batch_for_the_denoisers(make):
    net = make()
    shape = (2, 4, 16, 16) if isinstance(net, DiT) else ((2, 2, 32) if net.dims == 1 else (2, 1, 8, 8, 8))
    shape = (2, net.in_channels, *shape[2:]) if hasattr(net, "in_channels") else shape
    params = {"params": torch.empty(2, 2)} if getattr(net, "num_params", 0) else {}
    one = estimate_step(net, {"x": torch.empty(shape), **params})
    two = estimate_step(net, {"x": torch.empty((4, *shape[1:])), **{k: torch.empty(4, 2) for k in params}})
    assert one.flops > 0 and one.activation_bytes > 0
    assert two.flops == pytest.approx(2 * one.flops, rel=0.02)
    assert two.activation_bytes == pytest.approx(2 * one.activation_bytes, rel=0.05)


def test_the_warning_says_when_a_run_is_a_gpu_job():
    est = StepEstimate(flops=4e12, activation_bytes=2**30, state_bytes=2**28, num_params=2**26)
    summary, warning = budget_warning(est, accelerator="cpu", steps_left=100_000, cpu_rate=1e11)
    assert "GFLOP" in summary and "s/step" in summary
    assert warning.startswith("this configuration is a GPU job: on this CPU it needs ~1.6e+02 s per step")  # 4e12 / (0.25 x 1e11)
    assert "days for 100000 steps" in warning and "trainer=gpu" in warning
    assert budget_warning(est, accelerator="cpu", steps_left=10, cpu_rate=1e11)[1] is None   # 17 min: fine
    _, gpu = budget_warning(est, accelerator="cuda", steps_left=10, device_memory=2**30)
    assert "denoiser.checkpoint=true" in gpu
    assert budget_warning(est, accelerator="cuda", steps_left=10, device_memory=2**34)[1] is None


def test_train_says_at_start_that_a_configuration_is_a_gpu_job(tmp_path, data_dir):
    """A quickstart stretched to 10^8 steps: the start line carries the estimate and one warning line
    says it is a GPU job; the run itself is cut by max_time."""
    proc = run_train(["experiment=quickstart", "trainer.max_steps=100000000", "+trainer.max_time=00:00:00:03",
                      "logger=none", *QUIET], tmp_path, data_dir, extra_env={"PYTHONWARNINGS": ""})
    start = proc.stdout.splitlines()[0]
    assert "100000000 steps on cpu x1" in start and "GFLOP" in start and "s/step on this CPU" in start
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: this configuration is a GPU job")]
    assert len(warnings) == 1 and "for 100000000 steps" in warnings[0], proc.stderr

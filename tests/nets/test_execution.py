"""The fast paths of :mod:`scidiff.nets.execution` on CPU: bf16 autocast against float32 (outputs,
losses, gradients), ``torch.compile`` compiled once (graphs counted by a counting backend, and the
inductor backend's numbers), channels-last and the SDPA kernels, in 1-D, 2-D and 3-D."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from scidiff.conditioning import Conditioning
from scidiff.diffusion import GaussianDiffusion
from scidiff.diffusion.schedules import NoiseSchedule
from scidiff.inference.generation import DDIM, DPMSolver, GuidanceSpec, sample_model
from scidiff.nets.execution import Accelerated, Execution, check_compile, check_precision
from tests.nets.conftest import GRIDS, randomize_zeros


def inputs(dims, shape, batch=4, num_params=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, *shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t, Conditioning(params=torch.randn(batch, num_params, generator=g))


def build(make, dims, patch):
    return randomize_zeros(make(2, dims, patch_size=patch, num_params=2))


class CountingBackend:
    """A ``torch.compile`` backend that runs the captured graphs eagerly and counts them: every
    compilation (a first one, a recompilation, each side of a graph break) adds one."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


# ------------------------------------------------------------------------------ settings
def test_settings_are_checked_naming_the_key():
    assert check_precision(32, "k") == "32" and check_precision("bf16-mixed", "k") == "bf16"
    assert check_compile(True, "k") == "default" and check_compile(False, "k") is None
    with pytest.raises(ValueError, match=r"execution\.precision: expected 32 or bf16, got 'fp8'"):
        Execution(precision="fp8")
    with pytest.raises(ValueError, match=r"execution\.compile: expected true, false or a torch.compile mode"):
        Execution(compile="fastest")
    with pytest.raises(ValueError, match=r"execution\.channels_last: expected true or false"):
        Execution(channels_last="yes")
    with pytest.raises(ValueError, match=r"execution: unknown key\(s\) \['dtype'\]"):
        Execution.from_config({"dtype": "bf16"})
    assert Execution.from_config(None).is_default
    assert Execution(precision="bf16").identity() == {"precision": "bf16"}
    assert Execution(compile=True, channels_last=True).identity() == {}  # rounding only
    net = torch.nn.Identity()
    assert Execution().apply(net, 2) is net


# ------------------------------------------------------------------------------ bf16
@pytest.mark.parametrize("dims,shape,patch", GRIDS)
def test_bf16_output_is_float32_and_close(make, dims, shape, patch):
    net = build(make, dims, patch).eval()
    x, t, cond = inputs(dims, shape)
    with torch.no_grad():
        ref = net(x, t, cond)
        out = Accelerated(net, Execution(precision="bf16"), dims)(x, t, cond)
    assert out.dtype == torch.float32
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 3e-2  # bf16 rounds at 2^-8 = 0.4 %; a few layers accumulate it


@pytest.mark.parametrize("dims,shape,patch", GRIDS)
def test_bf16_training_loss_and_gradients_agree_with_float32(make, dims, shape, patch):
    """The loss under bf16 autocast (as ``trainer.precision=bf16-mixed`` runs it) is float32 and
    within 1 % of float32's; the gradients point the same way (cosine > 0.999) within 3 % in norm."""
    net = build(make, dims, patch)
    diffusion = GaussianDiffusion(NoiseSchedule.from_name("linear", 1000))
    x, t, cond = inputs(dims, shape, batch=8)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    losses, grads = [], []
    for enabled in (False, True):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = diffusion.training_loss(net, x, cond, t=t, noise=noise).mean()
        assert loss.dtype == torch.float32
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert abs(losses[1] / losses[0] - 1) < 1e-2
    assert float(F.cosine_similarity(grads[0], grads[1], dim=0)) > 0.999
    assert abs(float(grads[1].norm() / grads[0].norm()) - 1) < 3e-2


def test_bf16_sampling_keeps_the_sampler_state_in_float32(make):
    """Every state a sampler forms from a bf16 denoiser is float32, and the members stay within
    bf16's rounding of the float32 members."""
    dims, shape, patch = GRIDS[1]
    net = build(make, dims, patch).eval()
    diffusion = GaussianDiffusion(NoiseSchedule.from_name("linear", 1000))
    x_T, _, cond = inputs(dims, shape)
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t, c):
            seen.append(x.dtype)
            return self.inner(x, t, c)

    with torch.no_grad():
        ref = sample_model(net, diffusion, x_T, cond, sampler=DDIM(steps=8))
        out = sample_model(Spy(Accelerated(net, Execution(precision="bf16"), dims)), diffusion, x_T, cond,
                           sampler=DDIM(steps=8))
    assert out.dtype == torch.float32 and set(seen) == {torch.float32} and len(seen) == 8
    assert float((out - ref).norm() / ref.norm()) < 3e-2


# ------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("dims,shape,patch", GRIDS)
def test_denoisers_compile_to_one_graph(make, dims, shape, patch):
    """No graph break anywhere in the forward, with parameters, fields and guidance's drop mask."""
    net = make(2, dims, patch_size=patch, num_params=2, field_channels=1).eval()
    x, t, cond = inputs(dims, shape)
    cond = cond.replace(fields=torch.randn(x.shape[0], 1, *shape), drop=torch.tensor([True, False] * 2))
    with torch.no_grad():
        explained = torch._dynamo.explain(net)(x, t, cond)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_once_for_every_sampler_step_and_batch_size(make):
    """After the first call, neither a sampler's steps, nor another sampler, nor guidance's doubled
    batch, nor a new batch size compiles again (recompiling would raise under ``fail_on_recompile``)."""
    dims, shape, patch = GRIDS[1]
    net = make(2, dims, patch_size=patch, num_params=2).eval()
    backend = CountingBackend()
    fast = Accelerated(net, Execution(compile=True, backend=backend), dims)
    diffusion = GaussianDiffusion(NoiseSchedule.from_name("linear", 1000))
    with torch.no_grad():
        x_T, _, cond = inputs(dims, shape, batch=3)
        sample_model(fast, diffusion, x_T, cond, sampler=DDIM(steps=4), guidance=GuidanceSpec(scale=2.0))
        assert backend.graphs == 1
        with torch.compiler.set_stance("fail_on_recompile"):
            for batch in (3, 5, 7):  # 6, 10, 14 rows with guidance; 5 and 7 without
                x_T, _, cond = inputs(dims, shape, batch=batch, seed=batch)
                sample_model(fast, diffusion, x_T, cond, sampler=DDIM(steps=6), guidance=GuidanceSpec(scale=2.0))
                sample_model(fast, diffusion, x_T, cond, sampler=DPMSolver(steps=5))
    assert backend.graphs == 1


def test_inductor_compiled_denoiser_matches_eager():
    """The real backend: the compiled UNet's members equal the eager ones to float32 rounding,
    and a second sampling run compiles nothing."""
    from scidiff.nets import UNet

    torch.manual_seed(0)
    net = randomize_zeros(UNet(1, dims=2, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                               attention_levels=(1,), head_channels=16)).eval()
    diffusion = GaussianDiffusion(NoiseSchedule.from_name("linear", 1000))
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    fast = Accelerated(net, Execution(compile=True), 2)
    with torch.no_grad():
        ref = sample_model(net, diffusion, x_T, None, sampler=DDIM(steps=5))
        out = sample_model(fast, diffusion, x_T, None, sampler=DDIM(steps=5))
        with torch.compiler.set_stance("fail_on_recompile"):
            again = sample_model(fast, diffusion, x_T[:3], None, sampler=DPMSolver(steps=4))
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)  # 5 steps of a random network amplify float32 rounding
    with torch.no_grad():
        torch.testing.assert_close(again, sample_model(net, diffusion, x_T[:3], None, sampler=DPMSolver(steps=4)),
                                   rtol=1e-3, atol=1e-3)
    assert "net." + next(iter(net.state_dict())) in fast.state_dict()  # the compiled module is not registered


# ------------------------------------------------------------------------------ channels-last
@pytest.mark.parametrize("dims,shape,patch", GRIDS[1:])
def test_channels_last_gives_the_same_outputs_and_gradients(make, dims, shape, patch):
    net = build(make, dims, patch)
    x, t, cond = inputs(dims, shape)
    ref = net(x, t, cond)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    fast = Accelerated(net, Execution(channels_last=True), dims)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    convs = [p for p in net.parameters() if p.ndim == dims + 2]
    assert convs and all(p.is_contiguous(memory_format=fmt) for p in convs)
    out = fast(x, t, cond)
    out.square().sum().backward()
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    a = torch.cat([g.flatten() for g in ref_grads])
    b = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert float((b - a).norm() / a.norm()) < 1e-5  # float32 rounding of another summation order


def test_channels_last_refuses_1d_fields(make):
    with pytest.raises(ValueError, match="channels_last: fields of spatial rank 1 have no channels-last layout"):
        Accelerated(make(2, 1, patch_size=4), Execution(channels_last=True), 1)


# ------------------------------------------------------------------------------ attention kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_runs_on_the_flash_kernel(make, dtype):
    """Every attention call of both denoisers is accepted by the flash-attention kernel alone (CPU's
    implementation here; the GPU benchmark checks CUDA's): q, k, v reach SDPA in a layout and head
    width it takes. Restricting SDPA to a kernel that cannot run raises, so the check can fail."""
    dims, shape, patch = GRIDS[1]
    net = make(2, dims, patch_size=patch, num_params=2).eval()
    x, t, cond = inputs(dims, shape)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            net(x, t, cond)
        with pytest.raises(RuntimeError, match="No viable backend"), sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            net(x, t, cond)  # no memory-efficient kernel on CPU

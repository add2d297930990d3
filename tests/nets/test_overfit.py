"""Each tiny denoiser, trained with ``GaussianDiffusion.training_loss`` on one small
batch, must at least halve the loss. The loss is measured on a fixed set of
(t, noise) pairs spread over the whole schedule, so the comparison is free of the
sampling noise of the training loss."""

from __future__ import annotations

import math

import pytest
import torch
from tests.nets.conftest import make_dit, make_unet

from scidiff.conditioning import Conditioning
from scidiff.diffusion import GaussianDiffusion, NoiseSchedule

STEPS = 100


def _batch() -> torch.Tensor:
    """Four 16x16 plane waves, ``[4, 1, 16, 16]``."""
    yy, xx = torch.meshgrid(
        torch.linspace(0, 2 * math.pi, 16),
        torch.linspace(0, 2 * math.pi, 16),
        indexing="ij",
    )
    return torch.stack([torch.sin(k * xx + yy) for k in range(1, 5)])[:, None]


@pytest.mark.parametrize(
    ("name", "lr"),
    [("unet", 3e-3), ("dit", 1e-3)],
)
def test_overfits_one_batch(name, lr):
    torch.manual_seed(0)
    model = (
        make_unet(1, 2)
        if name == "unet"
        else make_dit(1, 2, patch_size=2, hidden_size=64)
    )
    diff = GaussianDiffusion(
        NoiseSchedule.from_name("linear", num_timesteps=1000),
        prediction="eps",
        variance="fixed_small",
    )
    x0 = _batch()
    gen = torch.Generator().manual_seed(1)
    x_eval = x0.repeat(8, 1, 1, 1)
    t_eval = torch.linspace(0, 999, len(x_eval)).long()
    n_eval = torch.randn(x_eval.shape, generator=gen)

    def eval_loss() -> float:
        with torch.no_grad():
            return (
                diff.training_loss(model, x_eval, t=t_eval, noise=n_eval).mean().item()
            )

    before = eval_loss()
    # both models output exactly zero at init, so the eps loss starts at E[eps^2] ~ 1
    assert 0.8 < before < 1.2
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(STEPS):
        loss = diff.training_loss(model, x0).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, f"{name}: loss {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_learns_to_use_params(name):
    """Two uniform fields, +1 and -1, told apart only by a parameter. At high noise x_t
    hardly reveals the sign, so an x0-predicting model must read it from the parameter:
    the x0 loss with the right parameter is far below the loss with the two swapped
    (ideal: 0 against |2 x0|^2 = 4; ignoring the parameter gives about 1 for both).
    Uniform fields, because a convolutional net cannot place a pattern on the grid
    without seeing it in x_t, whatever the parameter says."""
    torch.manual_seed(0)
    kw = {"num_params": 1}
    model = (
        make_unet(1, 2, **kw)
        if name == "unet"
        else make_dit(1, 2, patch_size=2, hidden_size=64, **kw)
    )
    diff = GaussianDiffusion(
        NoiseSchedule.from_name("linear", num_timesteps=1000),
        prediction="x0",
        variance="fixed_small",
    )
    x0 = torch.ones(2, 1, 16, 16) * torch.tensor([1.0, -1.0])[:, None, None, None]
    params = torch.tensor([[1.0], [-1.0]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3 if name == "unet" else 1e-3)
    for _ in range(150):
        loss = diff.training_loss(model, x0, Conditioning(params=params)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    gen = torch.Generator().manual_seed(2)
    x_eval = x0.repeat(16, 1, 1, 1)
    t_eval = torch.linspace(850, 999, len(x_eval)).long()
    n_eval = torch.randn(x_eval.shape, generator=gen)

    def eval_loss(p: torch.Tensor) -> float:
        with torch.no_grad():
            cond = Conditioning(params=p.repeat(16, 1))
            return (
                diff.training_loss(model, x_eval, cond, t=t_eval, noise=n_eval)
                .mean()
                .item()
            )

    right, swapped = eval_loss(params), eval_loss(params.flip(0))
    assert right < 0.1 * swapped, f"{name}: {right:.3f} vs swapped {swapped:.3f}"

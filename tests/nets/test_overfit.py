"""Each tiny denoiser, trained with ``GaussianDiffusion.training_loss`` on one small
batch, must at least halve the loss. The loss is measured on a fixed set of
(t, noise) pairs spread over the whole schedule, so the comparison is free of the
sampling noise of the training loss."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_dit, make_unet

from scidiff.diffusion import GaussianDiffusion, NoiseSchedule

STEPS = 100


def _batch() -> torch.Tensor:
    """Four 16x16 plane waves, ``[4, 1, 16, 16]``."""
    yy, xx = torch.meshgrid(torch.linspace(0, 2 * math.pi, 16), torch.linspace(0, 2 * math.pi, 16), indexing="ij")
    return torch.stack([torch.sin(k * xx + yy) for k in range(1, 5)])[:, None]


@pytest.mark.parametrize(
    ("name", "lr"),
    [("unet", 3e-3), ("dit", 1e-3)],
)
def test_overfits_one_batch(name, lr):
    torch.manual_seed(0)
    model = make_unet(1, 2) if name == "unet" else make_dit(1, 2, patch_size=2, hidden_size=64)
    diff = GaussianDiffusion(
        NoiseSchedule.from_name("linear", num_timesteps=1000), prediction="eps", variance="fixed_small"
    )
    x0 = _batch()
    gen = torch.Generator().manual_seed(1)
    x_eval = x0.repeat(8, 1, 1, 1)
    t_eval = torch.linspace(0, 999, len(x_eval)).long()
    n_eval = torch.randn(x_eval.shape, generator=gen)

    def eval_loss() -> float:
        with torch.no_grad():
            return diff.training_loss(model, x_eval, t=t_eval, noise=n_eval).mean().item()

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

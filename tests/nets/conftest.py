"""Tiny denoiser factories shared by the nets tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scidiff.nets import DiT, UNet

# widths small enough for the whole suite to run in seconds on two CPU cores
UNET_TINY = {
    "model_channels": 16,
    "channel_mult": (1, 2),
    "num_res_blocks": 1,
    "attention_levels": (1,),
    "head_channels": 16,
}
DIT_TINY = {"hidden_size": 48, "depth": 2, "num_heads": 4}

# (dims, spatial shape, DiT patch size): non-square, non-cubic grids
GRIDS = [(1, (40,), 4), (2, (24, 40), (4, 8)), (3, (8, 12, 16), 4)]


def make_unet(in_channels: int = 2, dims: int = 2, **kw) -> UNet:
    return UNet(in_channels, dims=dims, **{**UNET_TINY, **kw})


def make_dit(in_channels: int = 2, dims: int = 2, patch_size=4, **kw) -> DiT:
    return DiT(in_channels, dims=dims, patch_size=patch_size, **{**DIT_TINY, **kw})


def randomize_zeros(model: nn.Module, std: float = 0.1) -> nn.Module:
    """Give every zero-initialised tensor random values, so every path carries signal."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run several times faster on one thread than on two contended ones
    (OpenMP spinning costs more than the work); restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["unet", "dit"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def make(kind):
    """``make(in_channels, dims, patch_size=..., **kw)`` for the model under test."""

    def factory(in_channels: int = 2, dims: int = 2, patch_size=4, **kw):
        torch.manual_seed(0)
        if kind == "unet":
            return make_unet(in_channels, dims, **kw)
        return make_dit(in_channels, dims, patch_size=patch_size, **kw)

    return factory

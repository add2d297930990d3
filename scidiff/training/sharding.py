"""Sharded training (FSDP): which modules are the units each rank gathers and frees in turn.

``configs/trainer/fsdp.yaml`` wraps every block of the denoisers (a UNet's residual and attention
blocks, a DiT's transformer blocks) as one FSDP unit, so at most one block's full weights live on
a rank at a time beyond its shard. The denoisers themselves are units too: the trained denoiser
and its EMA copy then have flat parameters of the same layout, sharded alike, and the EMA update
(``lerp`` parameter by parameter) works on matching shards without gathering anything.
"""

from __future__ import annotations

from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from scidiff.nets.dit import DiT, DiTBlock
from scidiff.nets.layers import ResBlock, SelfAttention
from scidiff.nets.unet import UNet

BLOCKS = (ResBlock, SelfAttention, DiTBlock)
DENOISERS = (UNet, DiT)


def block_policy() -> ModuleWrapPolicy:
    """FSDP's auto-wrap policy: every block of :data:`BLOCKS` and every denoiser of :data:`DENOISERS`."""
    return ModuleWrapPolicy({*BLOCKS, *DENOISERS})


__all__ = ["BLOCKS", "DENOISERS", "block_policy"]

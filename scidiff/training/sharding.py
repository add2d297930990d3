"""Sharded training (FSDP): which modules are the units each rank gathers and frees in turn.

``configs/trainer/fsdp.yaml`` wraps every block of the denoisers (a UNet's residual and attention
blocks, a DiT's transformer blocks) as one FSDP unit, so at most one block's full weights live on
a rank at a time beyond its shard. The denoisers themselves are units too, so that the trained
denoiser and its EMA copy have flat parameters of the same layout, sharded alike, and the EMA
update (``lerp`` parameter by parameter, ``use_orig_params``) pairs matching shards without
gathering anything. FSDP needs CUDA (Lightning and torch refuse it on CPU): this layout has been
checked on CPU only as far as the policy and the configuration go; ``workflows/benchmarks/gpu.sh``
trains and samples a ``trainer=fsdp`` run on a GPU.
"""

from __future__ import annotations

import lightning as L
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from scidiff.nets.dit import DiT, DiTBlock
from scidiff.nets.layers import ResBlock, SelfAttention
from scidiff.nets.unet import UNet

BLOCKS = (ResBlock, SelfAttention, DiTBlock)
DENOISERS = (UNet, DiT)


def block_policy() -> ModuleWrapPolicy:
    """FSDP's auto-wrap policy: every block of :data:`BLOCKS` and every denoiser of :data:`DENOISERS`."""
    return ModuleWrapPolicy({*BLOCKS, *DENOISERS})


def is_sharded(trainer: L.Trainer) -> bool:
    """Whether the model's weights are sharded over the ranks (FSDP, ``trainer=fsdp``): every rank
    then takes part in each forward (figures are drawn on all ranks) and no two ranks hold the same
    weights (no replica checksums)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


__all__ = ["BLOCKS", "DENOISERS", "block_policy", "is_sharded"]

"""Sharded training (FSDP2, ``trainer=fsdp``): the strategy and which modules are sharded.

Every rank holds a shard of each parameter (a ``DTensor``), its gradient, the optimizer state and
the EMA; a block's full weights are gathered for its forward and backward and freed after.
``configs/trainer/fsdp.yaml`` builds Lightning's ``ModelParallelStrategy`` as pure data-parallel
sharding (:func:`fsdp_strategy`), and the :class:`~scidiff.training.DiffusionModule` shards itself
in ``configure_model`` (:func:`shard_denoisers`): every block of the denoisers (a UNet's residual
and attention blocks, a DiT's transformer blocks) is one unit, then the rest of each denoiser.
The trained denoiser and its EMA copy are sharded alike, so the EMA update (``lerp`` parameter by
parameter) pairs matching shards without gathering anything. Checkpoints are gathered into one
full file on rank 0, which loads, samples and resumes like a single-device checkpoint.

FSDP2 runs on CPUs too (gloo), which is how the tests train, checkpoint, resume and sample a
two-rank sharded run (``tests/training/test_ddp.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
from torch import nn

from scidiff.nets.dit import DiTBlock
from scidiff.nets.layers import ResBlock, SelfAttention

BLOCKS = (ResBlock, SelfAttention, DiTBlock)


def fsdp_strategy(devices: int, num_nodes: int = 1, process_group_backend: str | None = None):
    """Lightning's ``ModelParallelStrategy`` as FSDP alone: one data-parallel dimension over all
    ``devices * num_nodes`` ranks (no tensor parallelism), checkpoints gathered into one file."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"trainer.devices: trainer=fsdp needs a number of devices per node, got {devices!r}")
    return ModelParallelStrategy(data_parallel_size=devices * int(num_nodes), tensor_parallel_size=1,
                                 save_distributed_checkpoint=False, process_group_backend=process_group_backend)


def shard_denoisers(nets: Iterable[nn.Module], mesh) -> None:
    """Shard each of ``nets`` over the 1-D device ``mesh`` (in place): every block of :data:`BLOCKS`
    is one FSDP unit, then the network itself (its remaining parameters)."""
    from torch.distributed.fsdp import fully_shard

    for net in nets:
        for module in net.modules():
            if isinstance(module, BLOCKS):
                fully_shard(module, mesh=mesh)
        fully_shard(net, mesh=mesh)


def is_sharded(trainer: L.Trainer) -> bool:
    """Whether the model's weights are sharded over the ranks (``trainer=fsdp``, or Lightning's own
    FSDP strategy): every rank then takes part in each forward (figures are drawn on all ranks) and
    no two ranks hold the same weights (no replica checksums)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))


__all__ = ["BLOCKS", "fsdp_strategy", "is_sharded", "shard_denoisers"]

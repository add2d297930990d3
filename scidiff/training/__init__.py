"""Lightning training of scidiff models: ``DiffusionModule`` (denoisers, in field or latent
space), ``AutoencoderModule`` (the first stage of latent diffusion), ``ContrastiveModule`` (a
contrastive field encoder), EMA, resumable data
order, atomic checkpoints, sample figures and MLflow helpers."""

from scidiff.training.autoencoder import AutoencoderModule

from scidiff.training.contrastive import ContrastiveModule
from scidiff.training.checkpoint import AtomicCheckpointIO, atomic_torch_save, newest_checkpoint, safe_torch_load
from scidiff.training.data import ResumableDataModule, ResumableLoader, ResumableSampler
from scidiff.training.ema import EMA
from scidiff.training.lr import warmup_cosine
from scidiff.training.module import DiffusionModule

__all__ = [
    "EMA",
    "AtomicCheckpointIO",
    "AutoencoderModule",
    "ContrastiveModule",
    "DiffusionModule",
    "ResumableDataModule",
    "ResumableLoader",
    "ResumableSampler",
    "atomic_torch_save",
    "newest_checkpoint",
    "safe_torch_load",
    "warmup_cosine",
]

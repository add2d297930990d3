"""Networks for fields of spatial rank 1, 2 or 3: the denoisers (an ADM UNet and a DiT) and
the autoencoder of latent diffusion with its latent codec, LoRA adapters (``adapters``) and
a ControlNet for the UNet.

The denoisers follow the Denoiser contract ``forward(x [B, C, *S], t [B], cond) -> [B, C_out, *S]``
and share the conditioning embeddings. Torch only: no Lightning, Hydra or IO here.
"""

from scidiff.nets.autoencoder import DiagonalGaussian, FieldAutoencoder
from scidiff.nets.controlnet import ControlNet

from scidiff.nets.dit import DiT
from scidiff.nets.embeddings import (
    ConditionEmbedding,
    FieldConditioning,
    FourierFeatures,
    ParamEmbedding,
    TimestepEmbedding,
    timestep_embedding,
)
from scidiff.nets.contrastive import ConditionEncoder, ContrastiveEncoder, FieldEncoder
from scidiff.nets.latent import LatentCodec
from scidiff.nets.unet import UNet

__all__ = [
    "ConditionEmbedding",
    "ControlNet",
    "DiT",
    "DiagonalGaussian",
    "ConditionEncoder",
    "ContrastiveEncoder",
    "FieldAutoencoder",
    "FieldEncoder",
    "FieldConditioning",
    "FourierFeatures",
    "LatentCodec",
    "ParamEmbedding",
    "TimestepEmbedding",
    "UNet",
    "timestep_embedding",
]

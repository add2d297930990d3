"""How well a latent model's autoencoder reproduces the evaluated fields.

A latent diffusion model cannot generate finer detail than its decoder reproduces, so its
evaluation reports the autoencoder's reconstructions ``D(E(x))`` (posterior mean, the
latent's own normalisation round trip) of the evaluated data, in physical units, next to
the sample metrics:

* ``autoencoder_rmse/<variable>``: root-mean-square error over the observed points, in
  the variable's units;
* ``autoencoder_spectral_error/<variable>``: the spectral error of the reconstructions
  against the data (the metric of :class:`~scidiff.evaluation.spectra.SpectralError`);
  a sample spectral error close to it is the autoencoder's, not the diffusion's;
* for voxel densities, ``autoencoder_atoms/<variable>/peaks_reconstruction`` (and
  ``integrated_``), to compare with the data's atom counts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from scidiff.evaluation.data import grid_spacing
from scidiff.evaluation.molecules import AtomCounts
from scidiff.evaluation.spectra import SpectralError


class ReconstructionMetrics:
    """Sum states over the evaluated samples (every rank's, at :meth:`results`)."""

    def __init__(self, pretrained, settings, device: torch.device, names: list[str], atoms: bool) -> None:
        meta = pretrained.metadata
        c = meta.num_channels
        self.pretrained, self.names = pretrained, names
        self.sq = torch.zeros(c, dtype=torch.float64, device=device)
        self.n = torch.zeros(c, dtype=torch.float64, device=device)
        spacing = grid_spacing(meta)
        self.spectral = SpectralError(c, tuple(meta.spatial_shape), spacing=spacing,
                                      max_wavenumber=settings.spectral_max_wavenumber).to(device)
        self.atoms = (AtomCounts(c, settings.atom_threshold, voxel_volume=float(np.prod(spacing)),
                                 min_distance=settings.atom_min_distance).to(device) if atoms else None)

    def update(self, x_model: Tensor, x_phys: Tensor, mask: Tensor | None) -> None:
        """``x_model``: the data normalised ``[B, C, *S]``; ``x_phys``: in physical units."""
        p = self.pretrained
        recon = p.x_transform.inverse(p.latent.decode(p.latent.encode(x_model.float())).double())
        w = torch.ones_like(x_phys) if mask is None else torch.broadcast_to(mask, x_phys.shape).to(x_phys)
        err = (recon - x_phys).nan_to_num(0.0).square() * w
        dims = [0, *range(2, x_phys.ndim)]
        self.sq += err.sum(dims)
        self.n += w.sum(dims)
        if mask is None:
            self.spectral.update(recon, x_phys)
        else:
            for i in range(x_phys.shape[0]):
                self.spectral.update(recon[i:i + 1], x_phys[i:i + 1], mask[i:i + 1])
        if self.atoms is not None:
            self.atoms.update(recon)

    def results(self, ctx) -> dict[str, float]:
        """Scalars (a collective under DDP: call on every rank)."""
        sums = ctx.sum([*self.sq.tolist(), *self.n.tolist()])
        c = len(self.names)
        out: dict[str, float] = {}
        spectral = self.spectral.compute().reshape(-1).tolist()
        for i, name in enumerate(self.names):
            out[f"autoencoder_rmse/{name}"] = float(np.sqrt(sums[i] / max(sums[c + i], 1.0)))
            out[f"autoencoder_spectral_error/{name}"] = float(spectral[i])
        if self.atoms is not None:
            found = self.atoms.compute()
            for i, name in enumerate(self.names):
                out[f"autoencoder_atoms/{name}/peaks_reconstruction"] = float(found.peaks_mean[i])
                out[f"autoencoder_atoms/{name}/integrated_reconstruction"] = float(found.integrated_mean[i])
        return out


__all__ = ["ReconstructionMetrics"]

"""Classifier-free guidance (Ho & Salimans 2022) and condition dropout for training.

One model learns both the conditional and the unconditional denoiser: during
training :func:`drop_conditions` marks a random fraction of samples as using the
null condition (``Conditioning.drop``); at sampling :class:`ClassifierFreeGuidance`
combines both predictions,

    out = out_uncond + w (out_cond - out_uncond),

w = 0 unconditional, w = 1 conditional, w > 1 guided. eps, x_0, v and EDM's F are
affine in one another with the same coefficients for both halves at fixed (x_t, t),
so guiding any of the four parameterisations gives the same step (without
``rescale``, whose standard deviations are not affine-invariant). The guided model is
itself a denoiser: the samplers call it through ``GaussianDiffusion.model_output``, so
for ``"edm"`` both halves see the same c_in x_t. Both halves are evaluated in one
batched call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.shapes import append_dims


class ClassifierFreeGuidance(nn.Module):
    """A denoiser that guides ``denoiser`` with scale ``scale``; itself a denoiser.

    Args:
        denoiser: a model trained with condition dropout.
        scale: guidance scale w, a float or a tensor ``[B]`` (one per sample).
        rescale: phi of guidance rescaling (Lin et al. 2024, eq. 15-16): the guided
            output's per-sample standard deviation is pulled back to the
            conditional one's, mixed with weight phi in [0, 1]; 0 disables it.

    With ``learned_range`` models (2C output channels) only the first C channels are
    guided; the variance channels are taken from the conditional half.
    """

    def __init__(self, denoiser: nn.Module, scale: float | Tensor = 1.0, rescale: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale must lie in [0, 1], got {rescale}")
        self.denoiser = denoiser
        self.scale = scale
        self.rescale = rescale

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None) -> Tensor:
        if cond is None:
            return self.denoiser(x, t, None)
        scale = self.scale
        if not isinstance(scale, Tensor) and scale == 1.0 and self.rescale == 0.0:
            return self.denoiser(x, t, cond)
        b, c = x.shape[0], x.shape[1]
        null = cond.dropped(torch.ones(b, dtype=torch.bool, device=x.device))
        out = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([cond, null]))
        out_cond, out_uncond = out[:b], out[b:]
        pred_c, pred_u = out_cond[:, :c], out_uncond[:, :c]
        w = append_dims(torch.as_tensor(scale, dtype=x.dtype, device=x.device).expand(b), x.ndim)
        guided = pred_u + w * (pred_c - pred_u)
        if self.rescale > 0:
            dims = tuple(range(1, x.ndim))
            ratio = pred_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
            guided = self.rescale * guided * ratio + (1.0 - self.rescale) * guided
        if out.shape[1] > c:
            guided = torch.cat([guided, out_cond[:, c:]], dim=1)
        return guided


def drop_conditions(cond: Conditioning | None, p: float, generator: torch.Generator | None = None) -> Conditioning | None:
    """Mark each sample as using the null condition with probability ``p`` (training).

    Returns a copy of ``cond`` whose ``drop`` is or-ed with the new draws; ``None``
    stays ``None``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p (condition dropout probability) must lie in [0, 1], got {p}")
    if cond is None or p == 0.0:
        return cond
    b = cond.batch_size
    device = next(t.device for t in (cond.params, cond.fields, cond.embedding, cond.drop) if t is not None)
    u = torch.rand(b, generator=generator, device=generator.device if generator is not None else device)
    return cond.dropped((u < p).to(device))

"""The mathematics of denoising diffusion; imports torch only.

``NoiseSchedule`` (betas and alpha-bar in float64), ``GaussianDiffusion`` (forward
process, posteriors, parameterisations, losses), ``samplers`` (stateless DDPM/DDIM
sampling and DDIM inversion), ``likelihood`` (the variational bounds terms),
``guidance`` (classifier-free guidance) and
``analytic`` (exact denoisers for Gaussian data, the reference of the tests).
"""

from scidiff.diffusion import analytic, guidance, likelihood, samplers
from scidiff.diffusion.process import GaussianDiffusion, PMeanVariance
from scidiff.diffusion.schedules import NoiseSchedule

__all__ = ["GaussianDiffusion", "NoiseSchedule", "PMeanVariance", "analytic", "guidance", "likelihood", "samplers"]

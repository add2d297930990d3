"""The mathematics of denoising diffusion; imports torch only.

``NoiseSchedule`` (betas and alpha-bar in float64), ``GaussianDiffusion`` (forward
process, posteriors, parameterisations, losses), ``samplers`` (stateless DDPM/DDIM
sampling and DDIM inversion), ``likelihood`` (the variational bound with a choice of
reverse variance, incl. the Analytic-DPM optimum; ``likelihood.ode_nll`` the exact
likelihood through the probability-flow ODE, from ``ode_likelihood``),
``guidance`` (classifier-free guidance) and
``analytic`` (exact denoisers for Gaussian data and stationary Gaussian fields, the
reference of the tests).
"""

from scidiff.diffusion import analytic, guidance, likelihood, ode_likelihood, samplers
from scidiff.diffusion.process import GaussianDiffusion, PMeanVariance
from scidiff.diffusion.schedules import NoiseSchedule

__all__ = [
    "GaussianDiffusion",
    "NoiseSchedule",
    "PMeanVariance",
    "analytic",
    "guidance",
    "likelihood",
    "ode_likelihood",
    "samplers",
]

"""The mathematics of denoising diffusion; imports torch only.

``NoiseSchedule`` (betas and alpha-bar in float64), ``GaussianDiffusion`` (forward
process, posteriors, the eps/x0/v/EDM parameterisations, losses and training noise
levels; its ``model_output`` is the one place a denoiser is called, and its
constructor warns with ``ErrorAmplificationWarning`` when the parameterisation
amplifies model errors on the schedule), ``samplers`` (stateless DDPM/DDIM sampling
and DDIM inversion), ``likelihood`` (the variational bound with a choice of
reverse variance, incl. the Analytic-DPM optimum; ``likelihood.ode_nll`` the exact
likelihood through the probability-flow ODE, from ``ode_likelihood``),
``guidance`` (classifier-free guidance) and
``analytic`` (exact denoisers for Gaussian data and stationary Gaussian fields, the
reference of the tests).
"""

from scidiff.diffusion import analytic, guidance, likelihood, ode_likelihood, samplers
from scidiff.diffusion.process import ErrorAmplificationWarning, GaussianDiffusion, PMeanVariance
from scidiff.diffusion.schedules import NoiseSchedule

__all__ = [
    "ErrorAmplificationWarning",
    "GaussianDiffusion",
    "NoiseSchedule",
    "PMeanVariance",
    "analytic",
    "guidance",
    "likelihood",
    "ode_likelihood",
    "samplers",
]

"""The Gaussian diffusion process: forward noising, posteriors, parameterisations, losses.

Notation follows Ho et al. (2020, "DDPM") and Nichol & Dhariwal (2021, "Improved
DDPM"), with 0-based timesteps (docs/theory/conventions.md#time): a_t = alphas[t], ab_t = alphas_cumprod[t],
ab_{t-1} = alphas_cumprod_prev[t] (= 1 at t = 0).

    q(x_t | x_0)          = N( sqrt(ab_t) x_0, (1 - ab_t) I )                     DDPM eq. 4
    q(x_{t-1} | x_t, x_0) = N( mu~_t, beta~_t I )                                  DDPM eq. 6-7
        mu~_t    = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x_0 + sqrt(a_t)(1 - ab_{t-1}) / (1 - ab_t) x_t
        beta~_t  = (1 - ab_{t-1}) / (1 - ab_t) beta_t
    v                     = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0                   (Salimans & Ho 2022)

The denoiser's output is one of eps, x_0, v or EDM's F (``prediction``); with
``variance="learned_range"`` it has 2C channels, the second half interpolating the
log-variance between beta~_t and beta_t (Improved DDPM eq. 15).

**EDM preconditioning** (``prediction="edm"``; Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models", Table 1 and eq. 7-8) written on
the discrete VP chain: x_t / sqrt(ab) = x_0 + sigma_t n is EDM's VE variable with
sigma_t^2 = (1 - ab) / ab, and with sd = ``sigma_data`` and D_t = 1 - ab + ab sd^2,

    c_in   = 1 / sqrt(D_t)                     the network sees c_in x_t
    c_skip = sd^2 sqrt(ab) / D_t               x0^ = c_skip x_t + c_out F
    c_out  = sd sqrt(1 - ab) / sqrt(D_t)
    F*     = (x_0 - c_skip x_t) / c_out = (sqrt(1 - ab) x_0 - sd^2 sqrt(ab) eps) / (sd sqrt(D_t))

(EDM's c_in = 1/sqrt(sigma^2 + sd^2) applied to x_t/sqrt(ab), and its c_skip, c_out
with x_t/sqrt(ab) in place of x). The plain MSE on F is EDM's lambda(sigma) = 1/c_out^2
weighting of ||x0^ - x_0||^2. EDM's c_noise = ln(sigma)/4 is replaced by the integer
timestep t itself: our denoisers embed t, which is monotone in sigma. Every
coefficient is finite at a zero-terminal-SNR last step (ab = 0: c_skip = 0,
c_out = sd, c_in = 1). With sd = 1, c_skip = sqrt(ab), c_out = sqrt(1 - ab) and
F = -v exactly. The input scaling is applied in one place,
:meth:`GaussianDiffusion.model_output`, which every sampler, bound and loss uses.

**Training noise levels** (``timestep_sampling``): uniform t, or EDM's lognormal
ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1, "training") mapped to the
timestep whose ln sigma_t is nearest.

**Error amplification.** The one-step reverse mean is mu = c1_t x0^ + c2_t x_t (DDPM
eq. 11 generalised), so an error delta in the model output moves it by
c1_t |d x0^ / d output| delta: sigma_t for eps, 1 for x_0, sqrt(1 - ab) for v, c_out
for edm. For eps this is beta_t / (sqrt(a_t) sqrt(1 - ab_t)), about 31.6 at the last
step of the cosine schedule (clipped beta = 0.999). :meth:`GaussianDiffusion.error_amplification`
gives the largest factor; above ``AMPLIFICATION_LIMIT`` the constructor warns
(:class:`ErrorAmplificationWarning`).

Nothing clips the predicted x_0 unless asked (``clip_range`` or
``dynamic_threshold``): physical fields are not in [-1, 1].
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.diffusion.gaussian import discretized_gaussian_log_likelihood, gaussian_log_density, normal_kl
from scidiff.diffusion.schedules import NoiseSchedule
from scidiff.shapes import append_dims, check_broadcast, check_field, mean_flat

Prediction = Literal["eps", "x0", "v", "edm"]
Variance = Literal["fixed_small", "fixed_large", "learned_range"]
LossWeighting = Literal["none", "min_snr"]
Decoder = Literal["gaussian", "discretized"]
TimestepSampling = Literal["uniform", "lognormal"]
PREDICTIONS: tuple[str, ...] = get_args(Prediction)
VARIANCES: tuple[str, ...] = get_args(Variance)
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
DECODERS: tuple[str, ...] = get_args(Decoder)
TIMESTEP_SAMPLINGS: tuple[str, ...] = get_args(TimestepSampling)

# Largest one-step gain of a model-output error in the reverse mean accepted without a warning.
AMPLIFICATION_LIMIT = 10.0


class ErrorAmplificationWarning(UserWarning):
    """A parameterisation/schedule pair multiplies a model error at some step by more than
    ``AMPLIFICATION_LIMIT`` in the reverse mean (see :meth:`GaussianDiffusion.error_amplification`)."""


@dataclass(frozen=True)
class PMeanVariance:
    """The reverse step p(x_{t-1} | x_t) implied by a model output.

    All tensors are ``[B, C, *S]``: ``mean``, ``variance`` and ``log_variance`` of
    the Gaussian, and the model's estimates ``pred_x0`` (after any requested
    clipping) and ``pred_eps`` (consistent with ``pred_x0``).
    """

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_x0: Tensor
    pred_eps: Tensor


class GaussianDiffusion:
    """Forward process, posteriors and losses of a DDPM over ``[B, C, *S]`` fields.

    Args:
        schedule: the :class:`NoiseSchedule`.
        prediction: what the denoiser outputs: ``"eps"``, ``"x0"``, ``"v"`` or
            ``"edm"`` (EDM's preconditioned F; the denoiser then sees c_in x_t, see
            the module docstring). Call denoisers through :meth:`model_output`.
        variance: reverse-process variance: ``"fixed_small"`` (beta~_t, the
            posterior variance; its log at t = 0 uses beta~_1 as Improved DDPM
            does, since beta~_0 = 0), ``"fixed_large"`` (beta_t, with beta~_1 at
            t = 0 as Improved DDPM) or ``"learned_range"`` (the denoiser outputs 2C
            channels; Improved DDPM eq. 15).
        loss_weighting: ``"none"`` or ``"min_snr"`` (Hang et al. 2023: the MSE of
            each sample is weighted so that its effective x0-weight is
            min(SNR_t, gamma)).
        min_snr_gamma: gamma of ``"min_snr"``.
        hybrid_lambda: weight lambda of the variational term of the hybrid loss for
            ``learned_range``: L = L_simple + lambda * T * L_t (bits/dim), with the
            mean detached in L_t (Improved DDPM, section 3.1).
        decoder: likelihood of x_0 given x_1 in the t = 0 variational term:
            ``"gaussian"`` (continuous density, for real-valued fields) or
            ``"discretized"`` (DDPM eq. 13, for quantised data; see ``bin_width``).
        bin_width, data_range: the quantisation bin width and the (lower, upper)
            data range of the ``"discretized"`` decoder (8-bit images in [-1, 1]:
            2/255 and (-1, 1)).
        clip_range: optional ``(lo, hi)`` clamp of the predicted x0 when the
            reverse mean is formed (off by default).
        dynamic_threshold: optional percentile p in (0, 1) of Imagen's dynamic
            thresholding of the predicted x0 (off by default).
        sigma_data: sd > 0 of the ``"edm"`` preconditioning, the data's standard
            deviation (1 for data z-scored to unit variance); ignored otherwise.
        timestep_sampling: training timesteps drawn ``"uniform"`` on [0, T) or
            ``"lognormal"`` (EDM: ln sigma ~ N(lognormal_mean, lognormal_std^2), mapped
            to the nearest timestep in ln sigma; see :meth:`sample_timesteps`).
        lognormal_mean, lognormal_std: EDM's P_mean and P_std (-1.2, 1.2).

    Warns:
        ErrorAmplificationWarning: when :meth:`error_amplification` exceeds
            ``AMPLIFICATION_LIMIT`` (e.g. eps on the clipped cosine schedule).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction: Prediction = "eps",
        variance: Variance = "fixed_small",
        *,
        loss_weighting: LossWeighting = "none",
        min_snr_gamma: float = 5.0,
        hybrid_lambda: float = 1e-3,
        decoder: Decoder = "gaussian",
        bin_width: float = 2.0 / 255.0,
        data_range: tuple[float, float] | None = (-1.0, 1.0),
        clip_range: tuple[float, float] | None = None,
        dynamic_threshold: float | None = None,
        sigma_data: float = 1.0,
        timestep_sampling: TimestepSampling = "uniform",
        lognormal_mean: float = -1.2,
        lognormal_std: float = 1.2,
    ) -> None:
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        _check_choice("prediction", prediction, PREDICTIONS)
        _check_choice("variance", variance, VARIANCES)
        _check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        _check_choice("decoder", decoder, DECODERS)
        _check_choice("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)
        if prediction == "eps" and schedule.has_zero_terminal_snr:
            raise ValueError(
                "prediction='eps' cannot be used with a zero-terminal-SNR schedule: at the last step "
                "alpha_bar = 0 and x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) is undefined. "
                "Use prediction='v' (Lin et al. 2024), 'edm' or 'x0'."
            )
        if not (isinstance(sigma_data, (int, float)) and math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}")
        if not math.isfinite(lognormal_mean):
            raise ValueError(f"lognormal_mean must be finite, got {lognormal_mean!r}")
        if not (math.isfinite(lognormal_std) and lognormal_std > 0):
            raise ValueError(f"lognormal_std must be finite and > 0, got {lognormal_std!r}")
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        if clip_range is not None and not clip_range[0] < clip_range[1]:
            raise ValueError(f"clip_range must be (lo, hi) with lo < hi, got {clip_range}")
        if dynamic_threshold is not None and not 0.0 < dynamic_threshold < 1.0:
            raise ValueError(f"dynamic_threshold must be a percentile in (0, 1), got {dynamic_threshold}")
        if bin_width <= 0:
            raise ValueError(f"bin_width must be > 0, got {bin_width}")
        self.schedule = schedule
        self.prediction = prediction
        self.variance = variance
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.hybrid_lambda = float(hybrid_lambda)
        self.decoder = decoder
        self.bin_width = float(bin_width)
        self.data_range = tuple(data_range) if data_range is not None else None
        self.clip_range = tuple(clip_range) if clip_range is not None else None
        self.dynamic_threshold = dynamic_threshold
        self.sigma_data = float(sigma_data)
        self.timestep_sampling = timestep_sampling
        self.lognormal_mean = float(lognormal_mean)
        self.lognormal_std = float(lognormal_std)

        s = schedule
        ab, ab_prev = s.alphas_cumprod, s.alphas_cumprod_prev
        post_var = s.betas * (1.0 - ab_prev) / (1.0 - ab)
        # beta~_0 = 0: its log is replaced by log beta~_1 (Improved DDPM).
        post_var_floor = torch.cat([post_var[1:2], post_var[1:]])
        large_var = torch.cat([post_var[1:2], s.betas[1:]])
        # EDM (Karras et al. 2022, Table 1) on x_t: D = 1 - ab + ab sd^2 (module docstring)
        sd2 = self.sigma_data**2
        edm_d = 1.0 - ab + ab * sd2
        self._tables64 = {
            "betas": s.betas,
            "alphas_cumprod": ab,
            "alphas_cumprod_prev": ab_prev,
            "sqrt_alphas_cumprod": ab.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ab).sqrt(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_var_floor.log(),
            "posterior_mean_coef1": s.betas * ab_prev.sqrt() / (1.0 - ab),
            "posterior_mean_coef2": (1.0 - ab_prev) * s.alphas.sqrt() / (1.0 - ab),
            "fixed_large_log_variance": large_var.log(),
            "log_betas": s.betas.log(),
            # ln sigma_t, sigma_t^2 = (1 - ab) / ab; +inf at a zero-terminal-SNR last step
            "log_sigma": 0.5 * (torch.log1p(-ab) - torch.log(ab)),
            "edm_c_in": edm_d.rsqrt(),
            "edm_c_skip": sd2 * ab.sqrt() / edm_d,
            "edm_c_out": self.sigma_data * (1.0 - ab).sqrt() / edm_d.sqrt(),
            # eps^ = (x_t - sqrt(ab) x0^) / sqrt(1 - ab) with x0^ = c_skip x_t + c_out F, simplified
            # (1 - sqrt(ab) c_skip = (1 - ab) / D) so that no 0/0 arises at small 1 - ab
            "edm_eps_coef_x": (1.0 - ab).sqrt() / edm_d,
            "edm_eps_coef_out": -self.sigma_data * ab.sqrt() / edm_d.sqrt(),
            # F* = (x0 - c_skip x_t) / c_out with x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, simplified
            "edm_target_coef_x0": (1.0 - ab).sqrt() / (self.sigma_data * edm_d.sqrt()),
            "edm_target_coef_eps": -self.sigma_data * ab.sqrt() / edm_d.sqrt(),
        }
        self._table_cache: dict[tuple[torch.device, torch.dtype], dict[str, Tensor]] = {}
        factor, step = self.error_amplification()
        if factor > AMPLIFICATION_LIMIT:
            warnings.warn(
                f"prediction={prediction!r} on this schedule amplifies model errors by up to {factor:.3g} at "
                f"timestep {step}: the reverse mean moves by {factor:.3g} times any error in the model output "
                f"there, and that error is carried into the sample (samplers that skip steps and start at that "
                f"timestep, e.g. DDIM with spacing='trailing', amplify it more). Use prediction='v' or 'edm', "
                f"or a schedule without clipped betas (the cosine and sigmoid schedules clip beta at 0.999 at "
                f"the last step). Limit: AMPLIFICATION_LIMIT = {AMPLIFICATION_LIMIT}.",
                ErrorAmplificationWarning,
                stacklevel=2,
            )

    # ----------------------------------------------------------------- basics
    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def learns_variance(self) -> bool:
        return self.variance == "learned_range"

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion({self.schedule!r}, prediction={self.prediction!r}, "
            f"variance={self.variance!r}, loss_weighting={self.loss_weighting!r}"
            + (f", sigma_data={self.sigma_data!r}" if self.prediction == "edm" else "")
            + (f", timestep_sampling={self.timestep_sampling!r}" if self.timestep_sampling != "uniform" else "")
            + ")"
        )

    def coef(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Table ``name`` at timesteps ``t`` ``[B]``, shaped ``[B, 1, ...]`` to broadcast
        against ``like`` and cast to its dtype and device (tables are float64)."""
        table = self._tables(like.device, like.dtype)[name]
        return append_dims(table[t], like.ndim)

    def _tables(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        key = (device, dtype)
        if key not in self._table_cache:
            self._table_cache[key] = {k: v.to(device=device, dtype=dtype) for k, v in self._tables64.items()}
        return self._table_cache[key]

    def check_timesteps(self, t: Tensor, x: Tensor, name: str = "t") -> Tensor:
        """Validate ``t`` (integer ``[B]`` in ``[0, T)``, B matching ``x``); return it on x's device."""
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be an integer tensor [B], got {type(t).__name__}")
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"{name} must hold integer timesteps, got dtype {t.dtype}")
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"{name} must have shape [B] = [{x.shape[0]}], got {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"{name} out of range: timesteps must lie in [0, {self.num_timesteps - 1}], "
                f"got min {int(t.min())}, max {int(t.max())}"
            )
        return t.to(device=x.device, dtype=torch.long)

    # --------------------------------------------------------- forward process
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) (DDPM eq. 4)."""
        check_field(x0, "x0")
        t = self.check_timesteps(t, x0)
        mean = self.coef("sqrt_alphas_cumprod", t, x0) * x0
        var = 1.0 - self.coef("alphas_cumprod", t, x0)
        return mean, var.expand_as(x0), torch.log(var).expand_as(x0)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, a draw from q(x_t | x_0)."""
        check_field(x0, "x0")
        t = self.check_timesteps(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        _check_same_shape(noise, x0, "noise", "x0")
        return self._q_sample(x0, t, noise)

    def _q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self.coef("sqrt_alphas_cumprod", t, x0) * x0 + self.coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
        _check_same_shape(x_t, x0, "x_t", "x0")
        t = self.check_timesteps(t, x_t)
        mean = self._posterior_mean(x0, x_t, t)
        var = self.coef("posterior_variance", t, x_t).expand_as(x_t)
        log_var = self.coef("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, var, log_var

    def _posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.coef("posterior_mean_coef1", t, x_t) * x0 + self.coef("posterior_mean_coef2", t, x_t) * x_t

    # ------------------------------------------------------ parameterisations
    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)."""
        return (x_t - self.coef("sqrt_one_minus_alphas_cumprod", t, x_t) * eps) / self.coef(
            "sqrt_alphas_cumprod", t, x_t
        )

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t)."""
        return (x_t - self.coef("sqrt_alphas_cumprod", t, x_t) * x0) / self.coef(
            "sqrt_one_minus_alphas_cumprod", t, x_t
        )

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x_0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v."""
        return self.coef("sqrt_alphas_cumprod", t, x_t) * x_t - self.coef("sqrt_one_minus_alphas_cumprod", t, x_t) * v

    def predict_eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps = sqrt(1 - ab_t) x_t + sqrt(ab_t) v."""
        return self.coef("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t + self.coef("sqrt_alphas_cumprod", t, x_t) * v

    def get_v(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0."""
        return self.coef("sqrt_alphas_cumprod", t, x0) * eps - self.coef("sqrt_one_minus_alphas_cumprod", t, x0) * x0

    def predict_x0_from_edm(self, x_t: Tensor, t: Tensor, f: Tensor) -> Tensor:
        """x_0 = c_skip x_t + c_out F (EDM eq. 7 on x_t; module docstring)."""
        return self.coef("edm_c_skip", t, x_t) * x_t + self.coef("edm_c_out", t, x_t) * f

    def predict_eps_from_edm(self, x_t: Tensor, t: Tensor, f: Tensor) -> Tensor:
        """eps = (x_t - sqrt(ab) x_0) / sqrt(1 - ab) with x_0 = c_skip x_t + c_out F, i.e.
        eps = sqrt(1 - ab) / D x_t - sd sqrt(ab) / sqrt(D) F (D = 1 - ab + ab sd^2)."""
        return self.coef("edm_eps_coef_x", t, x_t) * x_t + self.coef("edm_eps_coef_out", t, x_t) * f

    def get_edm_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """F* = (x_0 - c_skip x_t) / c_out for x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps, written as
        (sqrt(1 - ab) x_0 - sd^2 sqrt(ab) eps) / (sd sqrt(D)): finite at ab = 0 (F* = x_0 / sd);
        = -v for sd = 1."""
        return self.coef("edm_target_coef_x0", t, x0) * x0 + self.coef("edm_target_coef_eps", t, x0) * eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The denoiser output for ``prediction`` that corresponds to (x_0, eps): eps, x_0, v or F.

        It is the regression target of the loss, and, since every parameterisation is
        linear in (x_0, eps) at fixed t, also the exact output of a Bayes-optimal
        denoiser given its E[x_0 | x_t] and E[eps | x_t] (which satisfy
        x_t = sqrt(ab) E[x_0 | x_t] + sqrt(1 - ab) E[eps | x_t]); the analytic denoisers
        use it that way.
        """
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        if self.prediction == "v":
            return self.get_v(x0, eps, t)
        if self.prediction == "edm":
            return self.get_edm_target(x0, eps, t)
        raise ValueError(f"prediction: unknown {self.prediction!r}")

    # ------------------------------------------------------- calling the model
    def scale_model_input(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The denoiser's input for x_t (c_in x_t for edm, else x_t), for users writing their own loops."""
        if self.prediction != "edm":
            return x_t
        return self.coef("edm_c_in", t, x_t) * x_t

    def unscale_model_input(self, model_input: Tensor, t: Tensor) -> Tensor:
        """x_t from what the denoiser sees (the inverse of :meth:`scale_model_input`), for
        denoisers that need x_t itself, such as the analytic ones."""
        if self.prediction != "edm":
            return model_input
        return model_input / self.coef("edm_c_in", t, model_input)

    def model_output(self, denoiser, x_t: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """The denoiser's output at (x_t, t): ``denoiser(c_in x_t, t, cond)`` for ``"edm"``,
        ``denoiser(x_t, t, cond)`` otherwise. The one place where a denoiser is called on a
        state of the chain; gradients flow through the input scaling.

        Args:
            denoiser: any callable ``(x, t, cond) -> [B, C or 2C, *S]``.
            x_t: ``[B, C, *S]``.
            t: ``LongTensor[B]`` in ``[0, T)``, on x_t's device.
            cond: passed through.

        The output comes back in ``x_t``'s dtype: under bf16 autocast (``trainer.precision=bf16-mixed``,
        ``execution.precision=bf16``) the network computes in bfloat16, and the loss, the samplers'
        states and the likelihood's terms stay in float32 or float64.
        """
        return denoiser(self.scale_model_input(x_t, t), t, cond).to(x_t.dtype)

    def split_output(self, model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split a denoiser output into (prediction ``[B, C, *S]``, variance values or None).

        With ``learned_range`` the output has 2C channels; the second half (in
        [-1, 1]) interpolates the log-variance.
        """
        c = x_t.shape[1]
        want = 2 * c if self.learns_variance else c
        if model_output.shape[0] != x_t.shape[0] or model_output.shape[2:] != x_t.shape[2:] or model_output.shape[1] != want:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)}, expected "
                f"{(x_t.shape[0], want, *x_t.shape[2:])} for x_t of shape {tuple(x_t.shape)} "
                f"and variance={self.variance!r}"
            )
        if self.learns_variance:
            return model_output[:, :c], model_output[:, c:]
        return model_output, None

    def predictions(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(pred_x0, pred_eps) from a prediction ``[B, C, *S]`` (no variance channels).

        When x0 is clipped or thresholded, eps is recomputed from the clipped x0 so
        that the pair stays consistent with x_t.
        """
        if self.prediction == "eps":
            eps = model_output
            x0 = self.predict_x0_from_eps(x_t, t, eps)
        elif self.prediction == "x0":
            x0 = model_output
            eps = self.predict_eps_from_x0(x_t, t, x0)
        elif self.prediction == "v":
            x0 = self.predict_x0_from_v(x_t, t, model_output)
            eps = self.predict_eps_from_v(x_t, t, model_output)
        elif self.prediction == "edm":
            x0 = self.predict_x0_from_edm(x_t, t, model_output)
            eps = self.predict_eps_from_edm(x_t, t, model_output)
        else:
            raise ValueError(f"prediction: unknown {self.prediction!r}")
        if self.clip_range is not None or self.dynamic_threshold is not None:
            x0 = self.process_x0(x0)
            eps = self.predict_eps_from_x0(x_t, t, x0)
        return x0, eps

    def process_x0(self, x0: Tensor) -> Tensor:
        """Apply the requested clipping / dynamic thresholding (Imagen) to x0."""
        if self.dynamic_threshold is not None:
            flat = x0.detach().abs().flatten(1).float()
            s = torch.quantile(flat, self.dynamic_threshold, dim=1).clamp_min(1.0).to(x0.dtype)
            s = append_dims(s, x0.ndim)
            x0 = torch.maximum(torch.minimum(x0, s), -s) / s
        if self.clip_range is not None:
            x0 = x0.clamp(*self.clip_range)
        return x0

    # --------------------------------------------------------- reverse process
    def p_mean_variance(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> PMeanVariance:
        """The reverse step p(x_{t-1} | x_t) for a denoiser output (DDPM eq. 11,
        Improved DDPM eq. 15 for ``learned_range``).

        Args:
            model_output: ``[B, C, *S]``, or ``[B, 2C, *S]`` with ``learned_range``.
            x_t: ``[B, C, *S]``.
            t: ``LongTensor[B]`` in ``[0, T)``.
        """
        check_field(x_t, "x_t")
        t = self.check_timesteps(t, x_t)
        pred, var_values = self.split_output(model_output, x_t)
        if self.variance == "fixed_small":
            log_var = self.coef("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
            var = self.coef("posterior_variance", t, x_t).expand_as(x_t)
        elif self.variance == "fixed_large":
            log_var = self.coef("fixed_large_log_variance", t, x_t).expand_as(x_t)
            var = torch.exp(log_var)
        elif self.variance == "learned_range":
            min_log = self.coef("posterior_log_variance_clipped", t, x_t)
            max_log = self.coef("log_betas", t, x_t)
            frac = (var_values + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
            var = torch.exp(log_var)
        else:
            raise ValueError(f"variance: unknown {self.variance!r}")
        pred_x0, pred_eps = self.predictions(pred, x_t, t)
        mean = self._posterior_mean(pred_x0, x_t, t)
        return PMeanVariance(mean=mean, variance=var, log_variance=log_var, pred_x0=pred_x0, pred_eps=pred_eps)

    # ------------------------------------------------------ error amplification
    def output_gain(self) -> Tensor:
        """|d x0^ / d model output| per timestep, float64 ``[T]``: sigma_t = sqrt((1 - ab) / ab)
        for eps, 1 for x0, sqrt(1 - ab) for v, c_out for edm."""
        ab = self.schedule.alphas_cumprod
        if self.prediction == "eps":
            return ((1.0 - ab) / ab).sqrt()
        if self.prediction == "x0":
            return torch.ones_like(ab)
        if self.prediction == "v":
            return (1.0 - ab).sqrt()
        if self.prediction == "edm":
            return self._tables64["edm_c_out"]
        raise ValueError(f"prediction: unknown {self.prediction!r}")

    def error_amplification(self) -> tuple[float, int]:
        """The largest per-element gain of a model-output error in the one-step reverse mean,
        and the timestep where it occurs.

        mu_theta(x_t, t) = c1_t x0^ + c2_t x_t (DDPM eq. 11 generalised; c1_t the posterior
        mean's x_0 coefficient), so |d mu / d output| = c1_t |d x0^ / d output|
        (:meth:`output_gain`). For eps this is beta_t / (sqrt(a_t) sqrt(1 - ab_t)): about 0.02
        for DDPM's linear schedule, 31.6 at t = T - 1 of the clipped cosine schedule.
        """
        gain = self._tables64["posterior_mean_coef1"] * self.output_gain()
        step = int(torch.argmax(gain))
        return float(gain[step]), step

    # ----------------------------------------------------------------- losses
    def sample_timesteps(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> Tensor:
        """Training timesteps ``LongTensor[B]`` in ``[0, T)`` on ``device``, drawn from ``generator``.

        ``"uniform"``: uniform on [0, T). ``"lognormal"``: ln sigma ~ N(lognormal_mean,
        lognormal_std^2) (EDM's P_mean, P_std; Karras et al. 2022, Table 1) mapped to the
        timestep whose ln sigma_t (sigma_t^2 = (1 - ab_t) / ab_t) is nearest; draws below
        ln sigma_0 give t = 0, above ln sigma_{T-1} t = T - 1. A zero-terminal-SNR last
        step (sigma = inf) is never drawn. The normals are drawn on the generator's device
        in float32 and matched against the float64 table.
        """
        if self.timestep_sampling == "uniform":
            return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
        if self.timestep_sampling != "lognormal":
            raise ValueError(f"timestep_sampling: unknown {self.timestep_sampling!r}")
        device = torch.device(device)
        draw_on = generator.device if generator is not None else device
        z = torch.randn(batch_size, generator=generator, device=draw_on, dtype=torch.float32)
        work = torch.device("cpu") if device.type == "mps" else device  # no float64 on MPS
        log_sigma = self._tables(work, torch.float64)["log_sigma"]
        target = self.lognormal_mean + self.lognormal_std * z.to(device=work, dtype=torch.float64)
        return _nearest_index(log_sigma, target).to(device)

    def loss_weight(self, t: Tensor, like: Tensor) -> Tensor:
        """Per-sample weight of the MSE, broadcastable to ``like``.

        ``min_snr`` (Hang et al. 2023): the weight that makes the effective x0-weight of
        the loss min(SNR_t, g), SNR_t = ab/(1-ab): min(SNR, g) / w_x0 with w_x0 the
        effective x0-weight of the plain MSE on the prediction (||out - out*||^2 =
        w_x0 ||x0^ - x_0||^2): SNR for eps, 1 for x0, SNR + 1 for v, 1/c_out^2 for edm.
        """
        if self.loss_weighting == "none":
            return torch.ones((), dtype=like.dtype, device=like.device)
        tables = self._tables(t.device, torch.float64)
        ab = tables["alphas_cumprod"][t]
        snr = ab / (1.0 - ab)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction == "eps":
            w = torch.where(snr > 0, clipped / snr.clamp_min(1e-300), torch.ones_like(snr))
        elif self.prediction == "x0":
            w = clipped
        elif self.prediction == "v":
            w = clipped / (snr + 1.0)
        elif self.prediction == "edm":
            w = clipped * tables["edm_c_out"][t] ** 2
        else:
            raise ValueError(f"prediction: unknown {self.prediction!r}")
        return append_dims(w, like.ndim).to(device=like.device, dtype=like.dtype)

    def training_loss(
        self,
        denoiser: nn.Module,
        x0: Tensor,
        cond: Conditioning | None = None,
        mask: Tensor | None = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Per-sample training loss ``[B]`` (DDPM Algorithm 1, generalised).

        The mean squared error between the denoiser's prediction and its target
        (eps, x0, v or EDM's F*), averaged over the valid points of each sample and
        weighted by :meth:`loss_weight`; with ``learned_range``, plus
        ``hybrid_lambda * T`` times the variational term L_t in bits/dim with the
        mean detached (Improved DDPM's L_hybrid).

        Args:
            denoiser: called through :meth:`model_output` (for ``"edm"`` on c_in x_t).
            x0: clean data ``[B, C, *S]`` (normalised).
            cond: passed through to the denoiser.
            mask: optional validity mask (1 = valid) broadcastable to ``x0``; masked
                points contribute nothing.
            t: optional timesteps ``[B]``; drawn by :meth:`sample_timesteps` if omitted.
            noise: optional eps ``[B, C, *S]``; standard normal if omitted.
        """
        check_field(x0, "x0")
        if mask is not None:
            mask = _check_mask(mask, x0)
        t = self.sample_timesteps(x0.shape[0], x0.device) if t is None else self.check_timesteps(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        _check_same_shape(noise, x0, "noise", "x0")
        x_t = self._q_sample(x0, t, noise)
        model_output = self.model_output(denoiser, x_t, t, cond)
        pred, var_values = self.split_output(model_output, x_t)
        err = (self.target(x0, noise, t) - pred) ** 2
        loss = mean_flat(err * self.loss_weight(t, x0), mask)
        if self.learns_variance:
            frozen = torch.cat([pred.detach(), var_values], dim=1)
            vb = self.vb_term(frozen, x0, x_t, t, mask=mask)
            loss = loss + self.hybrid_lambda * self.num_timesteps * vb
        return loss

    def vb_term(
        self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """One term of the variational bound, in bits/dim, per sample ``[B]``.

        For t > 0: KL( q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t) ); for t = 0: the
        decoder's negative log-likelihood -log p(x_0 | x_1) with ``decoder``
        (DDPM eq. 5; Luo 2022 eq. 58).
        """
        _check_same_shape(x_t, x0, "x_t", "x0")
        t = self.check_timesteps(t, x_t)
        true_mean = self._posterior_mean(x0, x_t, t)
        true_log_var = self.coef("posterior_log_variance_clipped", t, x_t)
        p = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_var, p.mean, p.log_variance)
        nll = -self.decoder_log_likelihood(x0, p.mean, p.log_variance)
        per_point = torch.where(append_dims(t == 0, x0.ndim), nll, kl)
        return mean_flat(per_point, mask) / math.log(2.0)

    def decoder_log_likelihood(self, x0: Tensor, mean: Tensor, log_variance: Tensor) -> Tensor:
        """log p(x_0 | x_1) elementwise in nats, for the configured ``decoder``."""
        if self.decoder == "gaussian":
            return gaussian_log_density(x0, mean, log_variance)
        if self.decoder == "discretized":
            lo, hi = self.data_range if self.data_range is not None else (None, None)
            return discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance, self.bin_width, lo, hi)
        raise ValueError(f"decoder: unknown {self.decoder!r}")


def _nearest_index(table: Tensor, values: Tensor) -> Tensor:
    """Index of the entry of the increasing ``table`` nearest to each of ``values`` (ties:
    the lower one); an infinite entry is never nearer than a finite neighbour."""
    if table.numel() == 1:
        return torch.zeros(values.shape, dtype=torch.long, device=values.device)
    idx = torch.searchsorted(table, values).clamp(1, table.numel() - 1)
    lower_nearer = (values - table[idx - 1]) <= (table[idx] - values)
    return torch.where(lower_nearer, idx - 1, idx)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: unknown value {value!r}; expected one of {choices}")


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")


def _check_mask(mask: Tensor, x: Tensor) -> Tensor:
    check_broadcast(mask, x, "mask")
    return mask.to(x.dtype)

"""The variational bound on -log p(x_0) of a DDPM, decomposed into its terms, with the
choice of reverse variance, decoder, dequantisation and area weights made at evaluation time.

Ho et al. (2020) eq. 5 / Luo (2022) eq. 58, with 0-based timesteps:

    -log p(x_0) <= L_prior + sum_{t=1}^{T-1} L_t + L_0
    L_prior = KL( q(x_{T-1} | x_0) || N(0, I) )                         prior term
    L_t     = E_q KL( q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t) )     denoising terms
    L_0     = E_q [ -log p(x_0 | x_1) ]                                reconstruction term

Each denoising term is estimated with one draw of x_t ~ q(x_t | x_0) per sample. The
denoiser is called through :meth:`GaussianDiffusion.model_output` (on c_in x_t for
``prediction="edm"``), so every parameterisation gives the same bound for the same
reverse process.
Everything is per sample and per dimension (a mean over the valid points, weighted
when area ``weights`` are given), in nats; ``bits_per_dim`` divides by ln 2.

**Reverse variance** (``variance=``): p(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I) with
the model's mean and, overriding the diffusion's own choice without retraining,

* ``"fixed_small"``: sigma_t^2 = beta~_t (DDPM), the lower bound of the optimum;
* ``"fixed_large"``: sigma_t^2 = beta_t (DDPM);
* ``"learned_range"``: the model's interpolation (Improved DDPM eq. 15; needs 2C outputs);
* a tensor ``[T]``: e.g. the Analytic-DPM optimum of :func:`estimate_optimal_variance`.

The same choice is the decoder variance of L_0 at t = 0. There beta~_0 = 0, so
``fixed_small`` and ``fixed_large`` both use beta~_1 (Improved DDPM's clipped log
variance; ``GaussianDiffusion``'s tables), while the optimal variance uses its own
value at t = 0, E Var[x_0 | x_{t=0}] per dimension.

**Analytic-DPM** (Bao et al. 2022, Theorem 1 with lambda_t^2 = beta~_t, the DDPM
chain): the reverse variance minimising the bound is

    sigma*_t^2 = beta~_t + ( sqrt(b_t / a_t) - sqrt(b_{t-1} - beta~_t) )^2 (1 - Gamma_t)
               = beta~_t + beta_t^2 / (a_t b_t) (1 - Gamma_t),
    Gamma_t    = E_q ||eps_theta(x_t, t)||^2 / d,

(a_t = 1 - beta_t, b_t = 1 - ab_t); it equals beta~_t + c1_t^2 E Var[x_0 | x_t] / d
with c1_t the posterior mean's x_0 coefficient, and since 0 <= Gamma_t <= 1 it lies
in [beta~_t, beta_t / a_t] (Theorem 2); for data in [lo, hi] also
sigma*_t^2 <= beta~_t + c1_t^2 ((hi - lo) / 2)^2 (Bao et al. eq. 10).

**Decoder and dequantisation.** L_0 uses the diffusion's decoder unless ``decoder=``
says otherwise: ``"gaussian"`` (continuous density, for real fields: the bound is on
the negative log density) or ``"discretized"`` (DDPM eq. 13: the probability of the
bin of width ``bin_width`` around x_0, a scalar or one per channel ``[C]``; the bound
is then on -log P(bin), a probability). ``dequantize=True`` instead adds
u ~ U(-w/2, w/2) to x_0 and uses the continuous decoder: since
P(bin) = w^d E_u p(x_0 + u) >= w^d exp E_u log p(x_0 + u) (Jensen; Theis et al. 2016,
Ho et al. 2019 "Flow++" sec. 3.1), the dequantised bound minus mean log w per
dimension bounds -log P(bin) / d of the discrete data.

**Physical units.** Pass the data transform's log-determinant (physical ->
normalised, summed over the sample's valid points): since
p_phys(x) = p_model(T(x)) |det dT/dx|, the physical NLL is the model's minus it. A
probability of bins (discretised decoder, dequantisation) is unit-free: give the bin
widths in normalised units and no log-determinant.

The exact likelihood through the probability-flow ODE lives in
:mod:`scidiff.diffusion.ode_likelihood` and is re-exported here as :func:`ode_nll`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.diffusion.averaging import LN2, normalised_point_weights, valid_points
from scidiff.diffusion.gaussian import discretized_gaussian_log_likelihood, gaussian_log_density, normal_kl
from scidiff.diffusion.ode_likelihood import ODELikelihood, ode_nll
from scidiff.diffusion.process import DECODERS, VARIANCES, GaussianDiffusion, Variance
from scidiff.shapes import append_dims, check_field, mean_flat

ReverseVariance = Variance  # the diffusion's own vocabulary (process.VARIANCES), one list
REVERSE_VARIANCES: tuple[str, ...] = VARIANCES
VarianceChoice = ReverseVariance | Tensor | None
OptimalVarianceMethod = Literal["analytic", "mse"]
OPTIMAL_VARIANCE_METHODS: tuple[str, ...] = get_args(OptimalVarianceMethod)


@dataclass(frozen=True)
class VariationalBound:
    """Terms of the bound for a batch, all in nats per dimension.

    Attributes:
        terms: ``[B, T]``; column 0 is the reconstruction term L_0, column t >= 1 the
            denoising term L_t.
        prior: ``[B]`` the prior term.
        nats_per_dim: ``[B]`` the total (prior + all terms), minus the transform's
            log-determinant per dimension when one was given, minus the mean log bin
            width when the data were dequantised.
        bits_per_dim: ``[B]`` the same in bits.
        dims: ``[B]`` the number of valid dimensions of each sample.
    """

    terms: Tensor
    prior: Tensor
    nats_per_dim: Tensor
    bits_per_dim: Tensor
    dims: Tensor


@dataclass(frozen=True)
class BoundEstimate:
    """An importance-sampled estimate of the bound with its standard error.

    ``nats_per_dim``, ``bits_per_dim`` and ``standard_error_bits`` are ``[B]``; the
    prior and reconstruction terms are exact, the denoising sum is estimated from
    ``num_terms`` sampled timesteps.

    Attributes:
        prior, reconstruction: ``[B]`` the exact prior term and L_0, nats/dim.
        timesteps: ``[K]`` int64 the sampled timesteps t_k (>= 1, with repeats; the same
            draws for every sample of the batch).
        terms: ``[B, K]`` the denoising terms L_{t_k} at those timesteps, nats/dim
            (normalised data, no log-determinant).
        weighted_terms: ``[B, K]`` L_{t_k} / pi(t_k): their mean over k is the estimate of
            sum_{t>=1} L_t. Per timestep, ``sum_k [t_k = t] weighted_terms[:, k] / K`` is an
            unbiased (Horvitz-Thompson) estimate of L_t, zero where t was not drawn, and
            these per-timestep estimates sum to the estimated denoising sum.
        proposal: ``[T]`` float64 the normalised proposal pi (pi[0] = 0).
    """

    nats_per_dim: Tensor
    bits_per_dim: Tensor
    standard_error_bits: Tensor
    prior: Tensor
    reconstruction: Tensor
    timesteps: Tensor | None = None
    terms: Tensor | None = None
    weighted_terms: Tensor | None = None
    proposal: Tensor | None = None

    def per_timestep(self) -> Tensor:
        """``[B, T]`` the unbiased per-timestep estimates of the terms, nats/dim: column 0
        is the exact L_0, column t >= 1 ``sum_k [t_k = t] weighted_terms[:, k] / K``
        (zero where t was not drawn). Their row sums equal the estimate of
        sum_{t>=0} L_t (the bound without prior, log-determinant or dequantisation shift)."""
        if self.timesteps is None or self.weighted_terms is None or self.proposal is None:
            raise ValueError("this BoundEstimate holds no sampled terms")
        w = self.weighted_terms
        out = torch.zeros(w.shape[0], self.proposal.numel(), dtype=w.dtype, device=w.device)
        out.index_add_(1, self.timesteps.to(w.device), w / w.shape[1])
        out[:, 0] = self.reconstruction.to(w.dtype)
        return out


# --------------------------------------------------------- reverse variance
def _check_variance(diffusion: GaussianDiffusion, variance: VarianceChoice) -> VarianceChoice:
    """Validate a variance choice; a tensor becomes a float64 ``[T]`` table."""
    if variance is None:
        return None
    if isinstance(variance, Tensor):
        table = variance.detach().to(torch.float64).cpu()
        if table.shape != (diffusion.num_timesteps,) or not torch.isfinite(table).all() or (table <= 0).any():
            raise ValueError(
                f"a variance tensor must hold T = {diffusion.num_timesteps} finite positive values, "
                f"got shape {tuple(table.shape)}"
            )
        return table
    if variance not in REVERSE_VARIANCES:
        raise ValueError(f"variance: unknown value {variance!r}; expected one of {REVERSE_VARIANCES} or a tensor [T]")
    if variance == "learned_range" and not diffusion.learns_variance:
        raise ValueError(
            "variance='learned_range' needs a model with 2C outputs (a diffusion with variance='learned_range'), "
            f"this diffusion has variance={diffusion.variance!r}"
        )
    return variance


def reverse_step(
    diffusion: GaussianDiffusion, model_output: Tensor, x_t: Tensor, t: Tensor, variance: VarianceChoice = None
) -> tuple[Tensor, Tensor]:
    """Mean and log-variance ``[B, C, *S]`` of p(x_{t-1} | x_t) with the reverse variance
    ``variance`` (None: the diffusion's own), whatever the variance the model was trained for.

    A model with variance channels can be evaluated with a fixed or tabulated variance
    (its variance channels are ignored); ``"learned_range"`` needs them.
    """
    variance = _check_variance(diffusion, variance)
    if variance is None or (isinstance(variance, str) and variance == diffusion.variance):
        p = diffusion.p_mean_variance(model_output, x_t, t)
        return p.mean, p.log_variance
    t = diffusion.check_timesteps(t, x_t)
    pred, _ = diffusion.split_output(model_output, x_t)
    pred_x0, _ = diffusion.predictions(pred, x_t, t)
    mean, _, _ = diffusion.q_posterior_mean_variance(pred_x0, x_t, t)
    if isinstance(variance, Tensor):
        log_var = append_dims(variance.log().to(device=x_t.device, dtype=x_t.dtype)[t], x_t.ndim)
    elif variance == "fixed_small":
        log_var = diffusion.coef("posterior_log_variance_clipped", t, x_t)
    elif variance == "fixed_large":
        log_var = diffusion.coef("fixed_large_log_variance", t, x_t)
    else:
        raise ValueError(f"variance: unknown value {variance!r}")
    return mean, log_var.expand_as(x_t)


def optimal_variance_from_gamma(
    diffusion: GaussianDiffusion, gamma: Tensor, data_range: tuple[float, float] | None = None
) -> Tensor:
    """Analytic-DPM's optimal reverse variance ``[T]`` (float64) from Gamma_t = E||eps||^2 / d.

    sigma*_t^2 = beta~_t + beta_t^2 / (a_t (1 - ab_t)) (1 - Gamma_t) (Bao et al. 2022,
    Theorem 1 with lambda_t^2 = beta~_t), Gamma clipped to [0, 1] so that the result
    lies in the Theorem-2 bounds [beta~_t, beta_t / a_t]; with ``data_range`` = (lo, hi)
    also below beta~_t + c1_t^2 ((hi - lo) / 2)^2 (their eq. 10). At t = 0, beta~_0 = 0
    and the value is E Var[x_0 | x_{t=0}] / d; it is kept above 1e-20.
    """
    gamma = torch.as_tensor(gamma, dtype=torch.float64).cpu()
    if gamma.shape != (diffusion.num_timesteps,):
        raise ValueError(f"gamma must have shape [T] = [{diffusion.num_timesteps}], got {tuple(gamma.shape)}")
    sigma2 = _optimal_variance(diffusion, 1.0 - gamma.clamp(0.0, 1.0))
    if data_range is not None:
        sch = diffusion.schedule
        lo, hi = data_range
        beta_tilde = sch.betas * (1.0 - sch.alphas_cumprod_prev) / (1.0 - sch.alphas_cumprod)
        c1 = sch.betas * sch.alphas_cumprod_prev.sqrt() / (1.0 - sch.alphas_cumprod)
        sigma2 = torch.minimum(sigma2, beta_tilde + c1**2 * ((hi - lo) / 2.0) ** 2)
    return sigma2.clamp_min(1e-20)


def _optimal_variance(diffusion: GaussianDiffusion, eps_error: Tensor) -> Tensor:
    """beta~_t + beta_t^2 / (a_t (1 - ab_t)) * eps_error_t, eps_error = E Var[eps | x_t] / d."""
    sch = diffusion.schedule
    ab, ab_prev, beta = sch.alphas_cumprod, sch.alphas_cumprod_prev, sch.betas
    beta_tilde = beta * (1.0 - ab_prev) / (1.0 - ab)
    gap = beta**2 / ((1.0 - beta) * (1.0 - ab))
    return (beta_tilde + gap * eps_error.to(torch.float64)).clamp_min(1e-20)


@torch.no_grad()
def estimate_optimal_variance(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    data: Tensor | Iterable,
    cond: Conditioning | None = None,
    mask: Tensor | None = None,
    timesteps: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    weights: Tensor | None = None,
    data_range: tuple[float, float] | None = None,
    method: OptimalVarianceMethod = "analytic",
    timestep_batch: int = 50,
) -> Tensor:
    """Training-free optimal reverse variance sigma*_t^2 ``[T]`` (float64), Analytic-DPM.

    ``method="analytic"`` (Bao et al. 2022a, eq. 8): Gamma_t = E ||eps_theta(x_t, t)||^2 / d
    is estimated by Monte Carlo over the data (one x_t ~ q(x_t | x_0) per sample and
    timestep), for any prediction type (eps is recovered with
    ``GaussianDiffusion.predictions``), and turned into sigma*_t^2 by
    :func:`optimal_variance_from_gamma`.

    ``method="mse"``: 1 - Gamma_t is replaced by the model's denoising error
    E ||eps - eps_theta(x_t, t)||^2 / d, i.e. sigma_t^2 = beta~_t + c1_t^2 E ||x_0 - x0_theta||^2 / d,
    the exact minimiser of the bound for the model's own (possibly imperfect) mean
    (Bao et al. 2022b, "Estimating the Optimal Covariance with Imperfect Mean", eq. 6
    with a scalar covariance). Both agree for the Bayes-optimal denoiser; "mse" has a
    far smaller Monte-Carlo error where 1 - Gamma_t is tiny (e.g. the last steps of the
    cosine schedule, where beta_t / a_t is large) and is not clipped above.

    Pass the result as ``variance=`` to :func:`variational_bound` / :func:`estimate_bound`.

    Args:
        data: normalised samples ``[N, C, *S]``, or an iterable of batches: tensors,
            ``(x, cond)`` pairs or dicts with ``"x"`` and optional ``"mask"``/``"cond"``.
        cond, mask: for a tensor ``data`` (mask: 1 = valid).
        timesteps: optional subset ``[K]`` of timesteps to evaluate; Gamma is then
            interpolated linearly in t (constant beyond the ends: include 0 and T - 1,
            where it changes fastest). All T by default.
        generator: for the noise draws.
        weights: area weights as for :func:`variational_bound` (Gamma is then the
            weighted mean of eps^2, the optimum of the weighted bound).
        data_range: optional (lo, hi) of bounded data for the tighter upper bound
            (``"analytic"`` only).
        method: ``"analytic"`` or ``"mse"`` (see above).
        timestep_batch: timesteps per denoiser call (times the batch size).
    """
    if method not in OPTIMAL_VARIANCE_METHODS:
        raise ValueError(f"method: unknown value {method!r}; expected one of {OPTIMAL_VARIANCE_METHODS}")
    T = diffusion.num_timesteps
    ts_all = torch.arange(T) if timesteps is None else torch.unique(torch.as_tensor(timesteps).long().cpu())
    if ts_all.numel() == 0 or int(ts_all.min()) < 0 or int(ts_all.max()) >= T:
        raise ValueError(f"timesteps must be a non-empty subset of [0, {T - 1}]")
    batches = [(data, cond, mask)] if isinstance(data, Tensor) else (_unpack_batch(b) for b in data)
    total = torch.zeros(ts_all.numel(), dtype=torch.float64)
    count = 0
    for x0, c, m in batches:
        check_field(x0, "x0")
        w = normalised_point_weights(x0, m, weights)
        sums = []
        for chunk in ts_all.split(timestep_batch):
            b, k = x0.shape[0], chunk.numel()
            xs, ts, noise, rep_cond, rep_w = _replicate(x0, chunk, c, w, generator)
            x_t = diffusion.q_sample(xs, ts, noise)
            pred, _ = diffusion.split_output(diffusion.model_output(denoiser, x_t, ts, rep_cond), x_t)
            _, eps = diffusion.predictions(pred, x_t, ts)
            sq = eps**2 if method == "analytic" else (noise - eps) ** 2
            sums.append(mean_flat(sq.to(torch.float64), rep_w).reshape(b, k).sum(dim=0).cpu())
        total += torch.cat(sums)
        count += x0.shape[0]
    if count == 0:
        raise ValueError("data holds no samples")
    mean_sq = total / count
    if ts_all.numel() < T:
        mean_sq = _interp(torch.arange(T, dtype=torch.float64), ts_all.to(torch.float64), mean_sq)
    if method == "analytic":
        return optimal_variance_from_gamma(diffusion, mean_sq, data_range)
    return _optimal_variance(diffusion, mean_sq)


def _unpack_batch(batch) -> tuple[Tensor, Conditioning | None, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, dict):
        if "x" not in batch:
            raise ValueError(f"a batch dict needs an 'x' entry, got keys {sorted(batch)}")
        return batch["x"], batch.get("cond"), batch.get("mask")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1], None
    raise ValueError(f"cannot read a batch of type {type(batch).__name__}: give tensors, (x, cond) or dicts")


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation (numpy.interp) on increasing ``xp``."""
    if xp.numel() == 1:
        return fp.expand_as(x).clone()
    i = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x_lo, x_hi, f_lo, f_hi = xp[i - 1], xp[i], fp[i - 1], fp[i]
    frac = ((x - x_lo) / (x_hi - x_lo)).clamp(0.0, 1.0)
    return f_lo + frac * (f_hi - f_lo)


# ------------------------------------------------------------------ decoder
@dataclass(frozen=True)
class _Decoder:
    kind: str
    bin_width: Tensor  # broadcastable to [B, C, *S]
    lower: Tensor | None
    upper: Tensor | None


def _per_channel(value, x0: Tensor, name: str) -> Tensor:
    """A scalar or ``[C]`` value as a tensor broadcastable to x0 ``[B, C, *S]``."""
    v = torch.as_tensor(value, dtype=x0.dtype, device=x0.device)
    if v.ndim == 0:
        return v
    if v.shape != (x0.shape[1],):
        raise ValueError(
            f"{name} must be a scalar or one value per channel [C] = [{x0.shape[1]}], got {tuple(v.shape)}"
        )
    return v.reshape(1, -1, *([1] * (x0.ndim - 2)))


def _resolve_decoder(diffusion, x0, decoder, bin_width, data_range, dequantize) -> _Decoder:
    if decoder is not None and decoder not in DECODERS:
        raise ValueError(f"decoder: unknown value {decoder!r}; expected one of {DECODERS}")
    if dequantize and decoder == "discretized":
        raise ValueError("dequantize=True evaluates the continuous decoder; it cannot be combined with 'discretized'")
    kind = "gaussian" if dequantize else (decoder or diffusion.decoder)
    width = _per_channel(diffusion.bin_width if bin_width is None else bin_width, x0, "bin_width")
    if not (width > 0).all() or not torch.isfinite(width).all():
        raise ValueError("bin_width must be finite and > 0")
    rng = diffusion.data_range if data_range is None else data_range
    lower = upper = None
    if rng is not None:
        lower, upper = (_per_channel(v, x0, "data_range") for v in rng)
    return _Decoder(kind, width, lower, upper)


def _decoder_nll(x0: Tensor, mean: Tensor, log_var: Tensor, dec: _Decoder) -> Tensor:
    """-log p(x_0 | x_1) elementwise, nats."""
    if dec.kind == "gaussian":
        return -gaussian_log_density(x0, mean, log_var)
    if dec.kind == "discretized":
        return -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var, dec.bin_width, dec.lower, dec.upper)
    raise ValueError(f"decoder: unknown {dec.kind!r}")


# -------------------------------------------------------------------- terms
def prior_term(
    diffusion: GaussianDiffusion, x0: Tensor, mask: Tensor | None = None, *, weights: Tensor | None = None
) -> Tensor:
    """KL( q(x_{T-1} | x_0) || N(0, I) ) per sample ``[B]``, nats per dimension."""
    check_field(x0, "x0")
    t = torch.full((x0.shape[0],), diffusion.num_timesteps - 1, dtype=torch.long, device=x0.device)
    mean, _, log_var = diffusion.q_mean_variance(x0, t)
    kl = normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(log_var))
    return mean_flat(kl, normalised_point_weights(x0, mask, weights))


def _replicate(x0, timesteps, cond, w, generator):
    """All B*K (sample, timestep) pairs: x0, t, eps, cond and weights repeated."""
    b, k = x0.shape[0], timesteps.numel()
    xs = x0.repeat_interleave(k, dim=0)
    ts = timesteps.to(x0.device).repeat(b)
    noise = torch.randn(xs.shape, generator=generator, dtype=xs.dtype,
                        device=generator.device if generator is not None else xs.device).to(xs.device)
    rep_cond = None if cond is None else cond.map(lambda v: v.repeat_interleave(k, dim=0))
    rep_w = None if w is None else w.expand_as(x0).repeat_interleave(k, dim=0)
    return xs, ts, noise, rep_cond, rep_w


def timestep_terms(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x0: Tensor,
    timesteps: Tensor,
    cond: Conditioning | None = None,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    variance: VarianceChoice = None,
    weights: Tensor | None = None,
    decoder: str | None = None,
    bin_width: float | Tensor | None = None,
    data_range: tuple | None = None,
) -> Tensor:
    """The bound's terms at ``timesteps`` ``[K]`` for every sample, ``[B, K]`` nats/dim.

    For t >= 1 the KL of the true posterior (variance beta~_t) from p(x_{t-1} | x_t)
    with reverse variance ``variance``; for t = 0 the decoder's -log p(x_0 | x_1). All
    B*K (sample, timestep) pairs go through the denoiser in one batch. The keywords
    are those of :func:`variational_bound` (without dequantisation).
    """
    check_field(x0, "x0")
    variance = _check_variance(diffusion, variance)
    dec = _resolve_decoder(diffusion, x0, decoder, bin_width, data_range, False)
    w = normalised_point_weights(x0, mask, weights)
    b, k = x0.shape[0], timesteps.numel()
    xs, ts, noise, rep_cond, rep_w = _replicate(x0, timesteps, cond, w, generator)
    x_t = diffusion.q_sample(xs, ts, noise)
    out = diffusion.model_output(denoiser, x_t, ts, rep_cond)
    mean, log_var = reverse_step(diffusion, out, x_t, ts, variance)
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(xs, x_t, ts)
    kl = normal_kl(true_mean, true_log_var, mean, log_var)
    nll = _decoder_nll(xs, mean, log_var, dec)
    per_point = torch.where(append_dims(ts == 0, xs.ndim), nll, kl)
    return mean_flat(per_point, rep_w).reshape(b, k)


def _dequantize(x0, dec: _Decoder, generator) -> Tensor:
    u = torch.rand(x0.shape, generator=generator, dtype=x0.dtype,
                   device=generator.device if generator is not None else x0.device).to(x0.device)
    return x0 + (u - 0.5) * dec.bin_width


@torch.no_grad()
def variational_bound(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x0: Tensor,
    cond: Conditioning | None = None,
    mask: Tensor | None = None,
    *,
    variance: VarianceChoice = None,
    weights: Tensor | None = None,
    decoder: str | None = None,
    bin_width: float | Tensor | None = None,
    data_range: tuple | None = None,
    dequantize: bool = False,
    log_det: Tensor | None = None,
    timestep_batch: int = 50,
    generator: torch.Generator | None = None,
) -> VariationalBound:
    """The full bound (all T terms) for data ``x0`` ``[B, C, *S]`` (normalised).

    Args:
        cond, mask: as for the denoiser and the loss (mask: 1 = valid).
        variance: reverse variance used at evaluation time: None (the diffusion's),
            ``"fixed_small"``, ``"fixed_large"``, ``"learned_range"`` (2C outputs) or
            a tensor ``[T]`` of sigma_t^2, e.g. from :func:`estimate_optimal_variance`.
        weights: area weights ``[*S]`` or broadcastable to x0 (e.g. ``[B, 1, *S]``),
            e.g. cos(latitude): every per-dimension mean becomes a weighted mean, with
            the weights normalised so that their mean over the valid points is 1.
        decoder: ``"gaussian"`` or ``"discretized"`` for L_0 (None: the diffusion's).
        bin_width: the bin width of the discretised decoder / dequantisation, a scalar
            or one per channel ``[C]`` (None: the diffusion's ``bin_width``).
        data_range: (lo, hi) of the discretised decoder's open-ended edge bins,
            scalars or ``[C]`` (None: the diffusion's; (-inf, inf) for none).
        dequantize: add u ~ U(-w/2, w/2) to x0 (drawn from ``generator``), use the
            continuous decoder and subtract the mean log bin width: a bound on
            -log P(bin) / d of discrete data (see the module docstring).
        log_det: optional ``[B]`` log |det dT/dx| of the data transform (nats,
            summed over each sample's valid points) to report physical units; divided
            by the number of valid points (exact for weighted means when the
            transform's log-derivative is the same at every weighted point of a
            channel, e.g. a per-channel affine normalisation).
        timestep_batch: timesteps evaluated per denoiser call (times B samples).
        generator: for the noise draws (and the dequantisation noise).
    """
    check_field(x0, "x0")
    if timestep_batch < 1:
        raise ValueError(f"timestep_batch must be >= 1, got {timestep_batch}")
    variance = _check_variance(diffusion, variance)
    x0, shift = _prepare(diffusion, x0, mask, weights, decoder, bin_width, data_range, dequantize, log_det, generator)
    opts = dict(variance=variance, weights=weights, decoder="gaussian" if dequantize else decoder,
                bin_width=bin_width, data_range=data_range)
    T = diffusion.num_timesteps
    all_t = torch.arange(T, device=x0.device)
    terms = torch.cat(
        [
            timestep_terms(denoiser, diffusion, x0, chunk, cond, mask, generator, **opts)
            for chunk in all_t.split(timestep_batch)
        ],
        dim=1,
    )
    prior = prior_term(diffusion, x0, mask, weights=weights)
    return _finish(terms, prior, terms.sum(dim=1) + prior + shift, x0, mask, log_det)


@torch.no_grad()
def estimate_bound(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x0: Tensor,
    cond: Conditioning | None = None,
    mask: Tensor | None = None,
    *,
    num_terms: int = 16,
    proposal: Tensor | None = None,
    variance: VarianceChoice = None,
    weights: Tensor | None = None,
    decoder: str | None = None,
    bin_width: float | Tensor | None = None,
    data_range: tuple | None = None,
    dequantize: bool = False,
    log_det: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> BoundEstimate:
    """Unbiased importance-sampled estimate of the bound with K = ``num_terms`` << T
    denoising terms; the prior and reconstruction terms are exact.

    The denoising sum S = sum_{t>=1} L_t is estimated by mean_k L_{t_k} / pi(t_k) with
    t_k ~ pi (``proposal`` ``[T]`` weights over t = 1..T-1, index 0 ignored; uniform by
    default), and its standard error by the sample standard deviation / sqrt(K). The
    other keywords are those of :func:`variational_bound`.
    """
    check_field(x0, "x0")
    T = diffusion.num_timesteps
    if num_terms < 2:
        raise ValueError(f"num_terms must be >= 2 for a standard error, got {num_terms}")
    pi = torch.ones(T, dtype=torch.float64) if proposal is None else torch.as_tensor(proposal, dtype=torch.float64).cpu()
    if pi.shape != (T,) or (pi[1:] < 0).any() or not torch.isfinite(pi[1:]).all():
        raise ValueError(
            f"proposal must hold T = {T} weights, finite and non-negative for t >= 1; got shape {tuple(pi.shape)}"
        )
    pi = pi.clone()
    pi[0] = 0.0
    if pi.sum() <= 0:
        raise ValueError("proposal puts no weight on t >= 1")
    pi = pi / pi.sum()
    variance = _check_variance(diffusion, variance)
    x0, shift = _prepare(diffusion, x0, mask, weights, decoder, bin_width, data_range, dequantize, log_det, generator)
    opts = dict(variance=variance, weights=weights, decoder="gaussian" if dequantize else decoder,
                bin_width=bin_width, data_range=data_range)
    ts = torch.multinomial(pi, num_terms, replacement=True, generator=generator)
    t0 = torch.zeros(1, dtype=torch.long)
    recon = timestep_terms(denoiser, diffusion, x0, t0, cond, mask, generator, **opts)[:, 0]
    sampled = timestep_terms(denoiser, diffusion, x0, ts, cond, mask, generator, **opts)
    weighted = sampled / pi[ts].to(sampled)
    denoising = weighted.mean(dim=1)
    se = weighted.std(dim=1) / math.sqrt(num_terms)
    prior = prior_term(diffusion, x0, mask, weights=weights)
    total = prior + recon + denoising + shift
    done = _finish(None, prior, total, x0, mask, log_det)
    return BoundEstimate(
        nats_per_dim=done.nats_per_dim,
        bits_per_dim=done.bits_per_dim,
        standard_error_bits=se / LN2,
        prior=prior,
        reconstruction=recon,
        timesteps=ts,
        terms=sampled,
        weighted_terms=weighted,
        proposal=pi,
    )


def _prepare(diffusion, x0, mask, weights, decoder, bin_width, data_range, dequantize, log_det, generator):
    """Validate the decoder options; dequantise x0 when asked. Returns (x0, shift [B]),
    shift = -(weighted) mean log bin width per dimension (0 without dequantisation)."""
    dec = _resolve_decoder(diffusion, x0, decoder, bin_width, data_range, dequantize)
    if not dequantize:
        return x0, torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    if log_det is not None:
        raise ValueError("dequantize=True bounds a probability of bins, which has no units: pass no log_det")
    log_w = torch.log(dec.bin_width).expand_as(x0)
    return _dequantize(x0, dec, generator), -mean_flat(log_w, normalised_point_weights(x0, mask, weights))


def _finish(terms, prior, total, x0, mask, log_det) -> VariationalBound:
    dims = valid_points(x0, mask)
    if log_det is not None:
        if log_det.shape != (x0.shape[0],):
            raise ValueError(f"log_det must have shape [B] = [{x0.shape[0]}], got {tuple(log_det.shape)}")
        total = total - log_det.to(total) / dims.clamp_min(1)
    return VariationalBound(terms=terms, prior=prior, nats_per_dim=total, bits_per_dim=total / LN2, dims=dims)


__all__ = [
    "OPTIMAL_VARIANCE_METHODS",
    "REVERSE_VARIANCES",
    "BoundEstimate",
    "ODELikelihood",
    "VariationalBound",
    "estimate_bound",
    "estimate_optimal_variance",
    "normalised_point_weights",
    "ode_nll",
    "optimal_variance_from_gamma",
    "prior_term",
    "reverse_step",
    "timestep_terms",
    "variational_bound",
]

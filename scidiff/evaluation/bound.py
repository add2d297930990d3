"""The likelihood side of an evaluation: the variational bound of every data sample, its
variants and the probability-flow ODE NLL, in bits/dim of the data in physical units.

For a latent diffusion model these are bounds on the NLL of its *normalised latent*
``z = (E(x) - mu) / sigma`` in bits per latent dimension, named ``latent_bpd``,
``latent_ode_bpd``, ...: the decoder is deterministic, so the model defines no density
of the data, and a latent bound is not comparable with a field-space model's ``bpd``.

:class:`Likelihoods` computes, one sample at a time with the generator keyed by the
sample's store index (so nothing depends on the batch or the ranks):

* the variational bound (:func:`scidiff.diffusion.likelihood.variational_bound`, all T
  terms, or the importance-sampled :func:`~scidiff.diffusion.likelihood.estimate_bound`
  with its standard error; ``bound.estimator``), with the data transform's
  log-determinant, the mask and the area weights, and its per-timestep terms;
* the same for each extra reverse variance (``bound.variance``; ``optimal`` is the
  Analytic-DPM variance estimated from training samples);
* the ODE NLL (``ode.enabled``);
* with a true log-likelihood in the store (:class:`~scidiff.evaluation.data.TrueLogLikelihood`),
  the true NLL and the gap bound - true of every one of them.

Dataset means are :class:`~scidiff.evaluation.likelihood.BitsPerDim` metrics (sum states,
per-point weighted), the mean terms a :class:`~scidiff.evaluation.likelihood.BoundTerms`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from scidiff.diffusion import likelihood
from scidiff.evaluation.data import TrueLogLikelihood, condition_of, on_device
from scidiff.evaluation.likelihood import BitsPerDim, BoundTerms
from scidiff.evaluation.result import EvaluationError
from scidiff.evaluation.settings import BoundSettings, EvaluationSettings
from scidiff.inference.seeds import generator

LN2 = math.log(2.0)


class Likelihoods:
    """The bound of every data sample (with each extra reverse variance) and the ODE NLL,
    one call per sample with the generator keyed by its store index; dataset totals in
    :class:`BitsPerDim` metrics (sum states), the mean terms in :class:`BoundTerms`."""

    def __init__(self, pretrained, dm, s: EvaluationSettings, device: torch.device, weights: Tensor | None,
                 true_ll: TrueLogLikelihood | None = None) -> None:
        # a latent model's bound is of its normalised latent: no log-determinant, no area weights
        # (the latent grid is not the data's), no true NLL of the data, every name prefixed latent_
        self.latent = getattr(pretrained, "latent", None) is not None
        self.prefix = "latent_" if self.latent else ""
        if self.latent:
            weights, true_ll = None, None
        self.p, self.s, self.weights, self.true = pretrained, s, weights, true_ll
        self.variants = _bound_variants(pretrained, s.bound) if s.bound.enabled else []
        names = (["", "model", *self.variants] if s.bound.enabled else []) + (["ode"] if s.ode.enabled else [])
        # the gaps are named after the variance ("" is the model's own) or "ode"
        self.gap_names = [self._name(n) for n in names if n != "model"]
        if true_ll is not None:
            nll, gap = true_ll.prefix
            names += [nll, *(f"{gap}/{n}" for n in self.gap_names)]
        self.bpd = {n: BitsPerDim().to(device) for n in names}
        self.terms = (BoundTerms(pretrained.diffusion.num_timesteps).to(device) if s.bound.enabled and not self.latent
                      else None)
        self.tables: dict[str, Any] = {v: v for v in self.variants}
        if "optimal" in self.tables:
            self.tables["optimal"] = _optimal_variance(pretrained, dm, s.bound, s, device, weights)
        self.seconds = 0.0
        self.terms_result: np.ndarray | None = None

    def _name(self, variant: str) -> str:
        return variant or self.p.diffusion.variance

    def update(self, x, x_phys, cond, mask, store_idx, add_row) -> None:
        """``x`` normalised data ``[B, C, *S]`` (``x_phys``: in physical units); for a latent
        model the data are encoded here and the bound is the latent's."""
        s = self.s
        if not (s.bound.enabled or s.ode.enabled):
            return
        tic = time.perf_counter()
        if self.latent:
            x = self.p.latent.encode(x.float())
            mask = None
            log_det = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            prefix, rows = self.prefix, add_row

            def add_row(name: str, value: Tensor) -> None:
                rows(prefix + name, value)
        else:
            # [B] nats, physical -> normalised; with area weights each point's term weighs as in the bound
            # (its per-point mean is then the weighted mean of the log-derivatives: exact also where they
            # vary from point to point, with a log warp or per-point anomaly scaling)
            point_w = (None if self.weights is None
                       else likelihood.normalised_point_weights(x, mask, self.weights.to(x.device)))
            log_det = self.p.x_transform.log_abs_det_jacobian(x_phys, mask, point_w)
        dims = (mask.expand_as(x).flatten(1).sum(1) if mask is not None
                else torch.full((x.shape[0],), float(x[0].numel()), device=x.device)).to(torch.float64)
        true_bpd = None
        if self.true is not None:  # -log p(x) / (d ln 2), physical units, d = the valid points
            nll_name, gap_name = self.true.prefix
            true_nats = torch.from_numpy(-self.true.values[np.asarray(store_idx, np.int64)]).to(dims)
            self.bpd[nll_name].update(true_nats, dims)
            true_bpd = true_nats / dims / LN2
            add_row(nll_name, true_bpd)

        def add_gap(name: str, bits: Tensor) -> None:
            if true_bpd is not None:
                gap = bits.to(true_bpd) - true_bpd
                self.bpd[f"{gap_name}/{name}"].update(gap * dims * LN2, dims)
                add_row(f"{gap_name}/{name}", gap)

        def one(i: int):
            return (x[i:i + 1], None if cond is None else cond.map(lambda v: v[i:i + 1]),
                    None if mask is None else mask[i:i + 1], log_det[i:i + 1])

        if s.bound.enabled:
            log_det_bpd = log_det / dims / LN2
            add_row("log_det_bpd", log_det_bpd)
            for variant in ["", *self.variants]:
                out = [_sample_bound(self.p, *one(i), self.weights, self.tables.get(variant), s.bound,
                                     generator(s.seed, 1, int(j))) for i, j in enumerate(store_idx)]
                phys = torch.cat([o[0] for o in out]).double()
                self.bpd[variant].update(phys * dims * LN2, dims)
                suffix = f"/{variant}" if variant else ""
                add_row("bpd" + suffix, phys)
                add_gap(self._name(variant), phys)
                if s.bound.estimator == "importance":
                    add_row("bpd_se" + suffix, torch.cat([o[1] for o in out]))
                if not variant:
                    model_bpd = phys + log_det_bpd
                    self.bpd["model"].update(model_bpd * dims * LN2, dims)
                    add_row("bpd_model", model_bpd)
                    add_row("prior_bpd", torch.cat([o[2] for o in out]) / LN2)
                    add_row("reconstruction_bpd", torch.cat([o[3] for o in out]) / LN2)
                    if self.terms is not None:
                        self.terms.update(torch.cat([o[4] for o in out]) / LN2)
        if s.ode.enabled:
            out = []
            for i, j in enumerate(store_idx):
                xi, ci, mi, li = one(i)
                out.append(likelihood.ode_nll(
                    self.p.denoiser, self.p.diffusion, xi, ci, mi, num_steps=s.ode.num_steps,
                    num_probes=s.ode.num_probes, weights=self.weights, log_det=li, generator=generator(s.seed, 4, int(j)),
                ))
            bits = torch.cat([o.bits_per_dim for o in out]).double()
            self.bpd["ode"].update(bits * dims * LN2, dims)
            add_row("ode_bpd", bits)
            add_gap("ode", bits)
            add_row("ode_bpd_se", torch.cat([o.standard_error_bits for o in out]))
        self.seconds += time.perf_counter() - tic

    def results(self, per_sample: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Scalars (collectives under DDP: call on every rank)."""
        if self.latent:
            rows = {k[len(self.prefix):]: v for k, v in per_sample.items() if k.startswith(self.prefix)}
            return {self.prefix + k: v for k, v in self._results(rows).items()}
        return self._results(per_sample)

    def _results(self, per_sample: Mapping[str, np.ndarray]) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.s.bound.enabled:
            out["bpd"] = float(self.bpd[""].compute())
            out["bpd_se"] = float(self.bpd[""].standard_error())
            out["bpd_model"] = float(self.bpd["model"].compute())
            out["log_det_bpd"] = out["bpd_model"] - out["bpd"]  # log|det dT/dx| per dimension, bits
            out["prior_bpd"] = float(per_sample["prior_bpd"].mean())
            out["reconstruction_bpd"] = float(per_sample["reconstruction_bpd"].mean())
            if self.s.bound.estimator == "importance":  # Monte-Carlo error of the mean for these samples
                se = per_sample["bpd_se"]
                out["bpd_mc_se"] = float(np.sqrt(np.sum(se**2)) / se.size)
            for v in self.variants:
                out[f"bpd/{v}"] = float(self.bpd[v].compute())
                out[f"bpd_se/{v}"] = float(self.bpd[v].standard_error())
                if self.s.bound.estimator == "importance":
                    se = per_sample[f"bpd_se/{v}"]
                    out[f"bpd_mc_se/{v}"] = float(np.sqrt(np.sum(se**2)) / se.size)
            if self.terms is not None:
                self.terms_result = self.terms.compute().cpu().numpy()
            if self.latent:  # bpd_model and log_det_bpd equal bpd and 0: not repeated
                for key in ("bpd_model", "log_det_bpd"):
                    out.pop(key)
        if self.s.ode.enabled:
            out["ode_bpd"] = float(self.bpd["ode"].compute())
            out["ode_bpd_se"] = float(self.bpd["ode"].standard_error())
            se = per_sample["ode_bpd_se"]
            out["ode_bpd_probe_se"] = float(np.sqrt(np.sum(se**2)) / se.size)
        if self.true is not None:  # the gap's SE: over the per-sample differences (paired)
            nll, gap = self.true.prefix
            out[nll] = float(self.bpd[nll].compute())
            out[f"{nll}_se"] = float(self.bpd[nll].standard_error())
            for name in self.gap_names:
                out[f"{gap}/{name}"] = float(self.bpd[f"{gap}/{name}"].compute())
                out[f"{gap}_se/{name}"] = float(self.bpd[f"{gap}/{name}"].standard_error())
        return out


def _bound_variants(pretrained, settings: BoundSettings) -> list[str]:
    """The reverse variances to evaluate besides the model's own (in order, without repeats)."""
    variants = []
    for v in settings.variance:  # names checked by BoundSettings
        if v == "learned_range" and not pretrained.diffusion.learns_variance:
            raise EvaluationError("bound.variance: learned_range needs a model trained with variance=learned_range")
        if v not in variants and v != pretrained.diffusion.variance:
            variants.append(v)
    return variants


def _optimal_variance(pretrained, dm, settings: BoundSettings, eval_settings: EvaluationSettings,
                      device: torch.device, weights: Tensor | None) -> Tensor:
    """Analytic-DPM reverse variance from up to ``optimal_samples`` training samples."""
    if not hasattr(likelihood, "estimate_optimal_variance"):
        raise EvaluationError("bound.variance: 'optimal' needs likelihood.estimate_optimal_variance (not available)")
    train = dm.datasets["train"]
    n = min(len(train), settings.optimal_samples)
    if n == 0:
        raise EvaluationError("bound.variance: 'optimal' is estimated on the training split, which is empty")
    T = pretrained.diffusion.num_timesteps
    k = min(T, max(2, settings.optimal_timesteps))
    timesteps = torch.unique(torch.linspace(0, T - 1, k).round().long())
    batches = []
    for start in range(0, n, eval_settings.batch_size):
        batch = train.read_batch(train.indices[start:min(n, start + eval_settings.batch_size)])
        batches.append({"x": batch["x"].to(device), "mask": on_device(batch.get("mask"), device),
                        "cond": condition_of(batch, device)})
    return likelihood.estimate_optimal_variance(
        pretrained.denoiser, pretrained.diffusion, batches, timesteps=timesteps,
        generator=generator(eval_settings.seed, 3), weights=None if weights is None else weights.to(device),
        timestep_batch=settings.timestep_batch,
    )


def _sample_bound(pretrained, x, cond, mask, log_det, weights, variance, settings: BoundSettings,
                  gen: torch.Generator):
    """The bound of one sample ``x`` ``[1, C, *S]``: (bits/dim physical, se or nan, prior, L_0, terms ``[1, T]``
    nats/dim: exact, or the importance estimator's unbiased per-timestep estimates)."""
    kw = dict(variance=variance, weights=weights, log_det=log_det, generator=gen)
    if settings.estimator == "exact":
        b = likelihood.variational_bound(pretrained.denoiser, pretrained.diffusion, x, cond, mask,
                                         timestep_batch=settings.timestep_batch, **kw)
        return b.bits_per_dim, torch.full_like(b.bits_per_dim, float("nan")), b.prior, b.terms[:, 0], b.terms
    est = likelihood.estimate_bound(pretrained.denoiser, pretrained.diffusion, x, cond, mask,
                                    num_terms=settings.num_terms, **kw)
    return est.bits_per_dim, est.standard_error_bits, est.prior, est.reconstruction, est.per_timestep()


__all__ = ["Likelihoods"]

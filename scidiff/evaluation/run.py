"""The evaluation loop: the variational bound of held-out data and the metrics of samples.

:func:`evaluate` takes a trained model (:class:`~scidiff.inference.checkpoint.Pretrained`)
and one split of its data set, rebuilt from the checkpoint's ``data`` config with the
checkpoint's normalisation statistics and split indices (never recomputed), and computes

* the variational bound of every data sample (exact over all T terms, or the
  importance-sampled estimate with its standard error) in bits/dim **in physical
  units** (the data transform's log-determinant included, masks and area weights
  honoured), with its per-timestep terms, and again for each requested reverse
  variance (``fixed_small``, ``fixed_large``, ``learned_range``, ``optimal``);
* an ensemble of ``members`` samples per data sample (``sampler``, through the one
  generation path of :mod:`scidiff.inference.generation`), conditioned on that
  sample's parameters/fields (or read from a ``scidiff-sample`` store), and its
  metrics against the data: power spectra and spectral error (the mean over
  wavenumber shells of ``|ln(P_samples(k) / P_data(k))|``, dimensionless: 0.1 is about
  10% off on a typical scale), fair CRPS, spread-skill ratio, energy score, rank
  histogram, bias/std maps, Wasserstein-1, and for voxel densities the atom counts;
* for a latent diffusion model, the autoencoder's reconstruction error on the same data
  (:mod:`scidiff.evaluation.reconstruction`), and bounds on the latent's NLL instead of the
  data's (:mod:`scidiff.evaluation.bound`);
* the **noise floor** of every sample metric (``floor/<metric>``): the same metrics for
  ensembles of ``members`` real fields of the store, the nearest neighbours of each
  sample in condition space (:mod:`scidiff.evaluation.floor`), and the **verdict**:
  each metric against its floor, pass or fail (:mod:`scidiff.evaluation.verdict`).

Randomness is keyed by (seed, store index, member): the number for sample ``j`` is the
same whatever the batch size or the number of ranks. Under ``torch.distributed`` each
rank takes every ``world_size``-th sample; the metrics are torchmetrics with sum
reductions, and per-sample values are gathered, so every rank returns the same
:class:`~scidiff.evaluation.result.Evaluation` (only rank 0 should write or log it).

This module is the loop only; each piece it runs lives in the module named for it:

======================  ==============================================================
``settings``            :class:`~scidiff.evaluation.settings.EvaluationSettings` and its sections
``data``                the checkpoint's data module, the split, the grid, the true NLL
``members``             the members: generated, or read from a ``scidiff-sample`` store
``bound``               the bound of every sample, its variants, the ODE NLL, the gaps (a latent model's: of its latent)
``reconstruction``      a latent model's autoencoder on the evaluated data
``suite``               the sample metrics (:class:`~scidiff.evaluation.suite.FieldMetricSuite`)
``floor``, ``verdict``  the noise floor of the sample metrics, and each metric against it
``result``              :class:`~scidiff.evaluation.result.Evaluation`, ``EvaluationError``
``report``, ``plots``   the evaluation file, MLflow, the summary lines; the figures
======================  ==============================================================
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import torch
from torch import Tensor

from scidiff.evaluation.bound import Likelihoods
from scidiff.evaluation.data import (
    area_weights,
    build_datamodule,
    condition_of,
    grid_units,
    on_device,
    split_indices,
    true_log_likelihood,
)
from scidiff.evaluation.floor import FloorEnsemble, prefixed
from scidiff.evaluation.members import EnsembleSource, generate_members
from scidiff.evaluation.reconstruction import ReconstructionMetrics
from scidiff.evaluation.result import Evaluation, EvaluationError
from scidiff.evaluation.settings import EvaluationSettings
from scidiff.evaluation.suite import atoms_enabled, metric_name
from scidiff.evaluation.verdict import judge
from scidiff.inference.runtime import DeviceError, current_context, resolve_device


def evaluate(
    pretrained,
    settings: EvaluationSettings | None = None,
    *,
    data_path: str | os.PathLike | None = None,
    ensemble: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> Evaluation:
    """Evaluate ``pretrained`` on one split of its data set (see the module docstring).

    Args:
        pretrained: from :func:`scidiff.inference.checkpoint.load_pretrained`.
        settings: what to compute (:class:`~scidiff.evaluation.settings.EvaluationSettings`;
            checked when constructed).
        data_path: another location of the data store (same layout).
        ensemble: a ``scidiff-sample`` zarr store whose members replace generation.
        device: ``"auto"`` (the rank's GPU, else CPU), ``"cpu"``, ``"cuda:0"``, ...
        progress: a tqdm bar on rank 0.

    Returns:
        :class:`~scidiff.evaluation.result.Evaluation`, identical on every rank.
    """
    s = settings or EvaluationSettings()
    ctx = current_context()
    rank, world = ctx.rank, ctx.world_size
    try:
        dev = resolve_device(str(device))
    except DeviceError as exc:
        raise EvaluationError(str(exc)) from None
    pretrained.to(dev)
    meta = pretrained.metadata
    dm = build_datamodule(pretrained, data_path)
    source = None if ensemble is None else EnsembleSource(ensemble, meta)  # all its members
    sampling = s.sampling.enabled or source is not None
    members = source.num_members if source is not None else s.sampling.members
    if not s.bound.enabled and not sampling and not s.ode.enabled:
        raise EvaluationError("bound.enabled, ode.enabled and sampling.enabled are all false: nothing to evaluate")
    indices, positions = split_indices(dm, s.split, s.max_samples, source)
    reader = dm.datasets[s.split]  # read_batch takes flat store indices, whatever the split
    mine = np.arange(rank, indices.size, world)
    xt = pretrained.x_transform
    weights = area_weights(meta, s.metrics.area_weights)

    true_ll = None
    if (s.bound.enabled or s.ode.enabled) and not pretrained.is_latent:  # a latent model has no density of x
        true_ll = true_log_likelihood(dm, pretrained, indices, s.metrics.true_loglik_variable)
    if true_ll is not None and weights is not None:
        warnings.warn(f"metrics.true_loglik_variable: {true_ll.variable} is ignored: with area weights the bound is a "
                      "weighted mean per dimension, not comparable with a log-density (metrics.area_weights=none)",
                      stacklevel=2)
        true_ll = None
    if true_ll is not None and true_ll.conditional and rank == 0:
        warnings.warn(f"metrics.true_loglik_variable: {true_ll.describe()}; reported as conditional_nll_bpd and "
                      "gap_conditional/*, not true_nll_bpd", stacklevel=2)
    likelihoods = Likelihoods(pretrained, dm, s, dev, weights, true_ll)
    metrics = s.metrics.build(pretrained, members, dev) if sampling else None
    recon = None
    if pretrained.is_latent:
        recon = ReconstructionMetrics(pretrained, s.metrics, dev, [metric_name(n) for n in meta.channel_names],
                                      atoms=atoms_enabled(meta, s.metrics.atoms))
    floor = _floor(dm, reader, pretrained, indices, members, s, sampling, dev)
    fidelity = _fidelity(pretrained, s, sampling, dev)
    rows: dict[str, list[np.ndarray]] = {}
    panels: list[tuple[Tensor, Tensor]] = []
    t_sample = 0.0
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=mine.size, desc=f"scidiff-evaluate {s.split} (rank 0)", unit="sample", dynamic_ncols=True,
                   disable=None)  # None: no bar when the output is not a terminal (a log file)

    def add_row(name: str, value: Tensor) -> None:
        rows.setdefault(name, []).append(value.detach().to(torch.float64).cpu().numpy())

    with torch.no_grad():
        for start in range(0, mine.size, s.batch_size):
            pos = mine[start:start + s.batch_size]
            store_idx = indices[pos]
            batch = reader.read_batch(store_idx)
            x = batch["x"].to(dev)
            mask = on_device(batch.get("mask"), dev)
            cond = condition_of(batch, dev)
            x_phys = xt.inverse(x.to(torch.float64))
            add_row("index", torch.from_numpy(store_idx))
            likelihoods.update(x, x_phys, cond, mask, store_idx, add_row)
            if recon is not None:
                recon.update(x, x_phys, mask)
            if metrics is not None:
                tic = time.perf_counter()
                if source is not None:
                    params = None if batch.get("params") is None else dm.inverse_params(batch["params"]).double().numpy()
                    source.check_params(positions[pos], params, meta.param_names, store_idx)
                    ens_phys = source.read(positions[pos]).to(dev)
                    ens = xt(ens_phys.flatten(0, 1)).reshape(ens_phys.shape)
                else:
                    ens = generate_members(pretrained, x, cond, store_idx, members=s.sampling.members, seed=s.seed,
                                           sampler=s.sampler, guidance=s.guidance, device=dev).to(torch.float64)
                    ens_phys = xt.inverse(ens.flatten(0, 1)).reshape(ens.shape)
                metrics.update(ens_phys, ens, x_phys, x.to(torch.float64), mask, weights)
                if fidelity is not None:
                    fidelity.update(ens_phys, torch.where(mask > 0, x_phys, torch.nan) if mask is not None else x_phys,
                                    None if batch.get("params") is None else dm.inverse_params(batch["params"]),
                                    None if batch.get("embedding") is None else
                                    pretrained.statistics.embedding_transform().inverse(batch["embedding"].double()))
                if rank == 0 and sum(len(p[0]) for p in panels) < s.num_panels:
                    panels.append((x_phys.cpu(), ens_phys[:, 0].cpu()))
                t_sample += time.perf_counter() - tic
            if floor is not None:  # the same metrics for real fields of the nearest conditions
                f_phys, f_model, f_mask = floor[0].read(store_idx, xt, mask, dev)
                floor[1].update(f_phys, f_model, x_phys, x.to(torch.float64), f_mask, weights)
            if bar is not None:
                bar.update(len(pos))
    if bar is not None:
        bar.close()

    # ---- per-sample rows of every rank, in split order; then the metrics (collectives)
    local = {k: np.concatenate(v) for k, v in rows.items()}
    local["position"] = mine.astype(np.int64)
    parts = ctx.gather(local)
    merged = {k: np.concatenate([p[k] for p in parts if k in p]) for k in parts[0]}
    order = np.argsort(merged.pop("position"), kind="stable")
    per_sample = {k: v[order] for k, v in merged.items()}
    store_order = per_sample.pop("index").astype(np.int64)
    timing = ctx.gather((likelihoods.seconds, t_sample, int(mine.size)))

    scalars: dict[str, float] = {"num_samples": float(indices.size)}
    scalars.update(likelihoods.results(per_sample))
    if s.bound.enabled:
        scalars["bound_seconds_per_1000"] = 1000.0 * max(t[0] / max(t[2], 1) for t in timing)
    if recon is not None:
        scalars.update(recon.results(ctx))
    spectra, rank_hist, maps = (None, None, None), None, {}
    if metrics is not None:
        more, spectra, rank_hist, maps = metrics.results()
        scalars.update(more)
        scalars["sampling_seconds_per_1000"] = 1000.0 * max(t[1] / max(t[2], 1) for t in timing)
    if fidelity is not None:
        scalars.update(fidelity.results(ctx))
    floor_spectra, floor_hist, verdict = None, None, None
    if floor is not None:
        more, (_, _, floor_spectra), floor_hist, _ = floor[1].results()
        scalars.update(prefixed(more))
        verdict = judge(scalars, s.verdict)
    dm.teardown()
    info = {
        "checkpoint": str(pretrained.checkpoint), "sha256": pretrained.sha256, "global_step": pretrained.global_step,
        "weights": pretrained.weights, "data_path": dm.path, "split": s.split,
        "estimator": s.bound.estimator if s.bound.enabled else "none",
        "terms": ("none" if likelihoods.terms is None else "exact" if s.bound.estimator == "exact" else
                  "importance-sampled, unbiased per-timestep estimates (zero where no sample drew t)"),
        "true_nll": "none" if true_ll is None else true_ll.describe(),
        "variances": [pretrained.diffusion.variance, *likelihoods.variants], "num_terms": s.bound.num_terms,
        "members": members if sampling else 0,
        "sampling": "ensemble " + os.fspath(ensemble) if source is not None else (
            s.sampler.describe() if sampling else "none"),
        "area_weights": "cos(latitude)" if weights is not None else "none", "world_size": world,
        "floor": (floor[0].describe() if floor is not None else "none: sampling is off" if not sampling
                  else "none: floor.enabled is false"),
        "seed": s.seed, "device": str(dev),
        "likelihood": ("none" if not (s.bound.enabled or s.ode.enabled) else
                       "latent: bounds on -log2 p(z) per dimension of the normalised latent z = (E(x) - mu) / sigma "
                       "of the autoencoder (not of the data: the decoder is deterministic)" if pretrained.is_latent
                       else "data: bounds on -log2 p(x) per dimension of the data"),
    }
    if pretrained.is_latent:
        info["autoencoder"] = str(pretrained.latent_info.get("checkpoint", ""))
    return Evaluation(
        split=s.split, indices=store_order, scalars=scalars, per_sample=per_sample, terms=likelihoods.terms_result,
        wavenumber=spectra[0], power_data=spectra[1], power_samples=spectra[2], rank_histogram=rank_hist,
        maps=maps, panels_data=torch.cat([p[0] for p in panels])[: s.num_panels].numpy() if panels else None,
        panels_samples=torch.cat([p[1] for p in panels])[: s.num_panels].numpy() if panels else None,
        channel_names=tuple(meta.channel_names), units=tuple(meta.units), spatial_dims=tuple(meta.spatial_dims),
        coords={k: np.asarray(v) for k, v in meta.coords.items()
                if tuple(meta.coord_dims.get(k, ())) and set(meta.coord_dims[k]) <= set(meta.spatial_dims)},
        info=info, power_floor=floor_spectra, rank_histogram_floor=floor_hist,
        floor_indices=None if floor is None else floor[0].indices, verdict=verdict, grid_units=grid_units(meta),
    )


def _fidelity(pretrained, s: EvaluationSettings, sampling: bool, dev):
    """The conditional-fidelity collector (``fidelity.encoder``), or ``None``."""
    if not s.fidelity.enabled:
        return None
    from scidiff.evaluation.fidelity import ConditionFidelity
    from scidiff.inference.checkpoint import CheckpointError, load_contrastive

    meta = pretrained.metadata
    if not sampling:
        raise EvaluationError("fidelity.encoder: the conditional fidelity scores generated members; sampling.enabled "
                              "is false")
    if not meta.param_names and not meta.embedding_names:
        raise EvaluationError(f"fidelity.encoder: the model {pretrained.checkpoint} has no parameters or embedding "
                              "to be faithful to")
    try:
        encoder = load_contrastive(s.fidelity.encoder, tracking_uri=s.fidelity.tracking_uri, device=dev)
        encoder.check_model(meta)
    except CheckpointError as exc:
        raise EvaluationError(str(exc)) from None
    return ConditionFidelity(encoder)


def _floor(dm, reader, pretrained, indices, members, s: EvaluationSettings, sampling: bool, dev):
    """(the floor ensembles, their metrics) or None (no sampling, or floor.enabled false)."""
    if not (sampling and s.floor.enabled):
        return None
    try:
        ensembles = FloorEnsemble(dm, reader, pretrained.metadata, indices, members, s.floor, s.seed)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    return ensembles, s.metrics.build(pretrained, members, dev)


__all__ = ["evaluate"]

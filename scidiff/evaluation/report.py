"""Reporting an :class:`~scidiff.evaluation.result.Evaluation`: the evaluation file, MLflow, one line.

**The evaluation file** is netCDF (one self-describing file that ``xarray.open_dataset``
reads; written with h5netcdf as netCDF-4 when it is installed, else with scipy as
netCDF-3), written atomically (a temporary file in the same directory, then
``os.replace``). It holds the same numbers as MLflow:

* ``metric_value(metric)``: every scalar, ``metric`` naming it as logged under
  ``eval/<split>/`` (``bpd``, ``bpd_se``, ``crps/<var>``, ...);
* per data sample (dim ``sample``, coordinate ``index`` = flat index in the store):
  ``bpd`` (physical units), ``bpd_model`` (normalised units), ``log_det_bpd``,
  ``prior_bpd``, ``reconstruction_bpd``, ``bpd_se`` (importance estimator) and
  ``bpd__<variance>`` for each extra reverse variance;
* with a true log-likelihood in the store (``metrics.true_loglik_variable``):
  ``true_nll_bpd`` per sample and ``gap__<variance>``, ``gap__ode`` (bound - true NLL,
  bits/dim), and the scalars ``true_nll_bpd``, ``true_nll_bpd_se``, ``gap/<variance>``,
  ``gap_se/<variance>`` (``conditional_nll_bpd``/``gap_conditional/...`` when the model
  is not given the parameters the stored density is conditioned on);
* ``bound_terms(timestep)``: mean per-timestep terms in bits/dim (exact, or the
  importance estimator's unbiased per-timestep estimates: ``info`` says which);
* ``power_data``/``power_samples(channel, wavenumber)``, ``rank_histogram(channel, rank)``
  and the maps ``crps_map``, ``bias``, ``std_samples``, ``std_data(channel, *spatial)``;
* the noise floor (:mod:`scidiff.evaluation.floor`): its scalars ``floor/<metric>`` in
  ``metric_value``, ``power_floor(channel, wavenumber)``, ``rank_histogram_floor(channel,
  rank)`` and ``floor_index(sample, member)`` (the store indices of each floor ensemble);
* the verdict (:mod:`scidiff.evaluation.verdict`): ``verdict_value``, ``verdict_floor``,
  ``verdict_passed`` (1/0) along ``verdict_metric`` (``crps/<var>``, ...), and the
  attributes ``verdict`` (``faithful``/``not faithful``), ``verdict_summary`` and
  ``verdict_table`` (JSON: every line with its rule, the settings);
* attributes: ``Conventions`` (``CF-1.10``), checkpoint, its sha256, split, estimator,
  units note, scidiff version, the MLflow run.

Units (CF): every data variable has ``units`` and ``long_name``. Bits for the
likelihoods; ``1`` for dimensionless numbers (ratios, relative frequencies, indices);
the variable's units for the CRPS, bias and std maps and its units squared times the
grid's length units per spatial dim for the power spectra (:func:`power_units`). A
variable stacked along ``channel`` whose channels differ in units cannot have one CF
unit: its ``units`` then lists them (``t2m: K; msl: Pa``) and the coordinate
``channel_units(channel)`` gives each. The tables ``metric_value`` and ``verdict_value``/
``verdict_floor`` mix units: ``units`` says ``see metric_units``, the coordinates
``metric_units(metric)`` and ``verdict_metric_units(verdict_metric)`` give each entry's
(:func:`metric_units`; empty where unknown).

**MLflow**: metrics ``eval/<split>/<name>`` at the checkpoint's global step (the floor as
``eval/<split>/floor/<metric>``), in the checkpoint's training run (or a new run),
figures and the file as artifacts under ``eval/<split>/``; with a verdict, the tags
``verdict`` and ``eval/<split>/verdict`` (``faithful`` or ``not faithful``) and the
artifact ``eval/<split>/verdict.json`` (the per-metric table).

:func:`publish` does all of it for one evaluation (the figures of
:mod:`~scidiff.evaluation.plots`, the file, MLflow), as ``scidiff-evaluate`` does on rank 0.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scidiff.data.atomic import atomic_path
from scidiff.evaluation.result import Evaluation, EvaluationError
from scidiff.inference.tracking import artifact_location

CONVENTIONS = "CF-1.10"

UNITS_NOTE = (
    "bpd: variational bound on -log2 p(x) per dimension of the data in physical units "
    "(the normalisation's log-determinant included); bpd_model: the same for the normalised data; "
    "bound_terms: per-timestep terms of the normalised data. CRPS, ensemble_mean_rmse (RMSE of the ensemble mean "
    "against the real field), bias, std, W1: units of each variable; "
    "energy_score: normalised units; spread_skill, std_ratio, rank_deviation: dimensionless; "
    "domain_mean_std_ratio: std over fields of their area-weighted domain means, samples / data, dimensionless; "
    "spectral_error: mean over wavenumber shells of |ln(P_samples(k)/P_data(k))|, dimensionless "
    "(0.1 = about 10% off on a typical scale); shell_correlation: mean correlation of ln P between wavenumber "
    "shells within the ensembles (0 for Gaussian fields: independent scales), dimensionless, shell_correlation_se: "
    "its standard error were the shells independent. floor/<metric>: the same metric for ensembles of real fields "
    "with the nearest conditions (the noise floor). Latent models: latent_bpd etc. bound the NLL of the "
    "normalised latent, bits per latent dimension (not comparable with bpd); autoencoder_rmse/<variable>: "
    "the autoencoder's reconstruction error in the variable's units, autoencoder_spectral_error: its spectral error. "
    "fidelity/*: with a contrastive encoder, members' cosine similarity with their own condition and how often it is "
    "retrieved among the evaluation's distinct conditions (top1, top5 of candidates); fidelity/real_*: the same for "
    "the real fields; fidelity/*_se: standard errors over the evaluated samples (conditions)."
)


def netcdf_engine() -> str:
    """The engine the evaluation file is written and read with: ``h5netcdf`` when installed, else ``scipy``."""
    try:
        import h5netcdf  # noqa: F401
        import h5py  # noqa: F401

        return "h5netcdf"
    except ImportError:
        return "scipy"


_PER_VARIABLE = ("crps", "ensemble_mean_rmse", "w1", "bias_rms", "autoencoder_rmse")  # metric/<variable> in the variable's units
_DIMENSIONLESS = ("num_samples", "members", "energy_score", "spread_skill", "std_ratio", "domain_mean_std_ratio",
                  "rank_deviation", "fidelity", "spectral_error",
                  "shell_correlation", "shell_correlation_se", "w1_out_of_range", "atoms",
                  "autoencoder_spectral_error", "autoencoder_atoms")


def metric_units(name: str, channel_units: dict[str, str]) -> str:
    """The units of the scalar ``name`` (as logged under ``eval/<split>/``; ``floor/<metric>``
    as ``<metric>``): the variable's for CRPS, W1 and RMS bias, ``bit`` for the likelihoods
    and their gaps, ``s`` for timings, ``1`` for counts and dimensionless scores (the energy
    score is in normalised units); ``""`` when unknown."""
    if name.startswith("floor/"):
        name = name[len("floor/"):]
    head, _, rest = name.partition("/")
    if head in _PER_VARIABLE:
        return channel_units.get(rest, "")
    if head in _DIMENSIONLESS:
        return "1"
    if "bpd" in head or "nll" in head or head.startswith("gap"):
        return "bit"
    if head.endswith("_seconds_per_1000"):
        return "s"
    return ""


def _real_length(unit: str) -> bool:
    """Whether a grid unit of :func:`~scidiff.evaluation.data.grid_units` is a unit (not unit
    steps, ``grid spacing``, nor an unknown ``<dim> units``)."""
    return unit != "grid spacing" and not unit.endswith(" units")


def _power(unit: str, exponent: int) -> str:
    if exponent == 1:
        return unit
    return f"{unit}^{exponent}" if re.fullmatch(r"[A-Za-z_]+", unit) else f"({unit})^{exponent}"


def power_units(field_units: str, grid_units: Sequence[str]) -> str:
    """Units of a power spectral density (:mod:`~scidiff.evaluation.spectra`): field units
    squared times the length unit of each spatial dim (unit grid steps count 1); ``""`` when
    the field's or a dim's unit is unknown.

    >>> power_units("K", ("km", "km"))
    'K^2 km^2'
    >>> power_units("W m-2", ("degrees_north", "degrees_east"))
    '(W m-2)^2 degrees_north degrees_east'
    >>> power_units("1", ("grid spacing", "grid spacing"))
    '1'
    """
    if not field_units or any(u.endswith(" units") for u in grid_units):
        return ""
    parts = [] if field_units == "1" else [_power(field_units, 2)]
    lengths = [u for u in grid_units if _real_length(u)]
    for unit in dict.fromkeys(lengths):
        parts.append(_power(unit, lengths.count(unit)))
    return " ".join(parts) or "1"


def _stacked(units: Sequence[str], channels: Sequence[str]) -> dict[str, str]:
    """The ``units`` attribute of a variable stacked along ``channel`` (``{}`` when unknown)."""
    if any(not u for u in units):
        return {}
    if len(set(units)) <= 1:
        return {"units": units[0]} if units else {}
    return {"units": "; ".join(f"{c}: {u}" for c, u in zip(channels, units))}


_MAP_NAMES = {
    "crps": "CRPS of the members against the data, mean over samples",
    "bias": "bias: mean of the members minus mean of the data",
    "std_samples": "standard deviation of the members over samples and members",
    "std_data": "standard deviation of the data over samples",
    "std_ratio": "std_samples / std_data",
}


def to_dataset(ev: Evaluation, attrs: dict[str, Any] | None = None):
    """The evaluation as an ``xarray.Dataset`` (see the module docstring)."""
    import xarray as xr

    import scidiff

    channels = tuple(ev.channel_names)
    channel_units = dict(zip(channels, ev.units))
    stacked = _stacked(tuple(ev.units), channels)
    data_vars: dict[str, Any] = {}
    names = sorted(ev.scalars)
    data_vars["metric_value"] = (("metric",), np.array([ev.scalars[n] for n in names], np.float64),
                                 {"units": "see metric_units",
                                  "long_name": "evaluation metrics, named as logged under eval/<split>/"})
    for key, values in ev.per_sample.items():
        data_vars[key.replace("/", "__")] = (("sample",), np.asarray(values, np.float64),
                                             {"units": metric_units(key, channel_units) or "bit",
                                              "long_name": f"{key} per data sample"})
    if ev.terms is not None:
        data_vars["bound_terms"] = (("timestep",), ev.terms, {
            "units": "bit", "long_name": "mean bound term per dimension (normalised data); t = 0 is L_0"})
    if ev.wavenumber is not None:
        grid = tuple(ev.grid_units) or tuple(f"{d} units" for d in ev.spatial_dims)  # unknown: no units
        power = _stacked(tuple(power_units(u, grid) for u in ev.units), channels)
        data_vars["power_data"] = (("channel", "wavenumber"), ev.power_data,
                                   {**power, "long_name": "mean radial power spectral density of data"})
        data_vars["power_samples"] = (("channel", "wavenumber"), ev.power_samples,
                                      {**power, "long_name": "mean radial power spectral density of samples"})
        if ev.power_floor is not None:
            data_vars["power_floor"] = (("channel", "wavenumber"), ev.power_floor, {
                **power, "long_name": "mean radial power spectral density of the floor ensembles (real fields)"})
    if ev.rank_histogram is not None:
        data_vars["rank_histogram"] = (("channel", "rank"), ev.rank_histogram,
                                       {"units": "1",
                                        "long_name": "relative frequency of the data's rank among the members"})
        if ev.rank_histogram_floor is not None:
            data_vars["rank_histogram_floor"] = (("channel", "rank"), ev.rank_histogram_floor, {
                "units": "1",
                "long_name": "relative frequency of the data's rank among the floor ensemble's real fields"})
    if ev.floor_indices is not None:
        data_vars["floor_index"] = (("sample", "member"), np.asarray(ev.floor_indices, np.int64),
                                    {"units": "1", "long_name": "flat store indices of each sample's floor ensemble"})
    verdict_attrs: dict[str, Any] = {}
    if ev.verdict is not None:
        v = ev.verdict
        data_vars["verdict_value"] = (("verdict_metric",), np.array([m.value for m in v.metrics], np.float64),
                                      {"units": "see verdict_metric_units",
                                       "long_name": "the model's value of each judged metric"})
        data_vars["verdict_floor"] = (("verdict_metric",), np.array([m.floor for m in v.metrics], np.float64),
                                      {"units": "see verdict_metric_units",
                                       "long_name": "the metric's noise floor (real fields)"})
        data_vars["verdict_passed"] = (("verdict_metric",), np.array([int(m.passed) for m in v.metrics], np.int8),
                                       {"units": "1", "long_name": "1: within the floor by the metric's rule"})
        verdict_attrs = {"verdict": v.label, "verdict_summary": v.summary(), "verdict_table": json.dumps(v.to_dict())}
    spatial = tuple(ev.spatial_dims)
    for key, arr in ev.maps.items():
        map_attrs = {"units": "1"} if key == "std_ratio" else dict(stacked)
        map_attrs["long_name"] = _MAP_NAMES.get(key, key)
        data_vars[f"{key}_map" if key == "crps" else key] = (("channel", *spatial), arr, map_attrs)
    coords: dict[str, Any] = {"metric": ("metric", np.array(names, dtype=object), {"long_name": "metric name"}),
                              "metric_units": ("metric", np.array([metric_units(n, channel_units) for n in names],
                                                                  dtype=object),
                                               {"long_name": "units of each metric (empty: unknown)"}),
                              "channel": ("channel", np.array(channels, dtype=object), {"long_name": "variable"}),
                              "channel_units": ("channel", np.array(ev.units, dtype=object),
                                                {"long_name": "units of each variable"}),
                              "index": ("sample", np.asarray(ev.indices, np.int64),
                                        {"units": "1", "long_name": "flat index of the data sample in the store"})}
    if ev.terms is not None:
        coords["timestep"] = ("timestep", np.arange(ev.terms.size, dtype=np.int64),
                              {"units": "1", "long_name": "diffusion timestep (0: least noisy)"})
    if ev.wavenumber is not None:
        grid = tuple(ev.grid_units) or tuple(f"{d} units" for d in spatial)
        if all(u == "grid spacing" for u in grid):
            k_units = "1"
        elif len(set(grid)) == 1 and _real_length(grid[0]):
            k_units = f"{grid[0]}-1" if re.fullmatch(r"[A-Za-z_]+", grid[0]) else f"({grid[0]})-1"
        else:
            k_units = "cycles per grid unit"
        coords["wavenumber"] = ("wavenumber", ev.wavenumber,
                                {"units": k_units, "long_name": "wavenumber (cycles per unit length of the grid)"})
    if ev.rank_histogram is not None:
        coords["rank"] = ("rank", np.arange(ev.rank_histogram.shape[1], dtype=np.int64),
                          {"units": "1", "long_name": "rank of the data among the members"})
    if ev.verdict is not None:
        keys = [m.key for m in ev.verdict.metrics]
        coords["verdict_metric"] = ("verdict_metric", np.array(keys, dtype=object))
        coords["verdict_metric_units"] = ("verdict_metric",
                                          np.array([metric_units(k, channel_units) for k in keys], dtype=object),
                                          {"long_name": "units of each judged metric (empty: unknown)"})
    if ev.maps:
        grid = tuple(ev.grid_units)
        for name, values in ev.coords.items():
            if np.ndim(values) == 1 and name in spatial:
                unit = grid[spatial.index(name)] if len(grid) == len(spatial) else ""
                if unit == "grid spacing":  # positions in grid steps
                    unit = "1"
                coords[name] = (name, values, {"units": unit} if unit and _real_length(unit) else {})
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs.update({
        "Conventions": CONVENTIONS,
        "title": f"scidiff evaluation ({ev.split} split)",
        "scidiff_version": scidiff.__version__,
        "units_note": UNITS_NOTE,
        "channel_units": json.dumps(list(ev.units)),
        "info": json.dumps(ev.info, default=str),
        **verdict_attrs,
        **{k: ("" if v is None else v) for k, v in (attrs or {}).items()},
    })
    return ds


def write_evaluation_file(ev: Evaluation, path: str | os.PathLike, attrs: dict[str, Any] | None = None) -> Path:
    """Write the evaluation netCDF atomically (temporary file, then rename); returns the path."""
    path = Path(path)
    ds = to_dataset(ev, attrs)
    engine = netcdf_engine()
    if engine == "scipy":  # netCDF-3 has no variable-length strings
        for name in ("metric", "metric_units", "channel", "channel_units", "verdict_metric", "verdict_metric_units"):
            if name in ds.coords:
                ds = ds.assign_coords({name: ds[name].astype(str)})
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine=engine)
    return path


def read_evaluation_metrics(path: str | os.PathLike) -> dict[str, float]:
    """``{name: value}`` of the scalars in an evaluation file (names as under ``eval/<split>/``)."""
    import xarray as xr

    with xr.open_dataset(path, engine=netcdf_engine()) as ds:
        return {str(k): float(v) for k, v in zip(ds["metric"].values, ds["metric_value"].values)}


# ------------------------------------------------------------------------------ MLflow
def metric_key(split: str, name: str) -> str:
    return f"eval/{split}/{name}"


def resolve_tracking_uri(explicit: str | None, pretrained) -> str:
    """The store to log to: the config's ``logger.tracking_uri``, else the store of the
    checkpoint's training run, found as every command finds it
    (:func:`scidiff.inference.tracking.checkpoint_tracking_uri`)."""
    from scidiff.inference.tracking import checkpoint_tracking_uri

    return checkpoint_tracking_uri(pretrained, explicit)


def _check_store(tracking_uri: str) -> None:
    """A SQLite store that does not exist would be created empty: refuse (the run is elsewhere)."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not Path(tracking_uri[len(prefix):]).exists():
        raise EvaluationError(
            f"logger.tracking_uri: the MLflow store {tracking_uri} does not exist (give the training's store, "
            "or logger.new_run=true to start one)"
        )


def log_to_mlflow(
    ev: Evaluation,
    *,
    tracking_uri: str,
    run_id: str | None,
    new_run: bool,
    experiment_name: str,
    step: int,
    artifacts: Sequence[str | os.PathLike],
    params: dict[str, Any] | None = None,
) -> str:
    """Log the scalars and the artifacts; returns the run id.

    With ``run_id`` and not ``new_run`` the metrics go to that (training) run, which
    must exist in the store; otherwise a new run ``eval/<split>`` is created in
    ``experiment_name`` (tagged with the training run it evaluates) and finished.
    """
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if run_id is not None and not new_run:
        _check_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    created = False
    if run_id is not None and not new_run:
        try:
            client.get_run(run_id)
        except MlflowException:
            raise EvaluationError(
                f"logger.tracking_uri: MLflow run {run_id} of the checkpoint is not in the store {tracking_uri} "
                "(set logger.tracking_uri to the training's store, or logger.new_run=true)"
            ) from None
    else:
        exp = client.get_experiment_by_name(experiment_name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(
            experiment_name, artifact_location=artifact_location(tracking_uri))
        tags = {"scidiff.kind": "evaluation", "mlflow.runName": f"eval/{ev.split}"}
        if run_id is not None:
            tags["scidiff.evaluated_run"] = run_id
        run_id = client.create_run(exp_id, tags=tags).info.run_id
        created = True
    import contextlib
    import time

    from scidiff.inference.tracking import terminating

    # a run created here ends FINISHED, or FAILED if the logging fails part-way
    with terminating(client, run_id, tracking_uri) if created else contextlib.nullcontext():
        now = int(time.time() * 1000)
        metrics = [Metric(metric_key(ev.split, k), float(v), now, int(step)) for k, v in sorted(ev.scalars.items())
                   if np.isfinite(v)]
        for i in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[i:i + 500])
        if created and params:
            client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in sorted(params.items())])
        for path in artifacts:
            client.log_artifact(run_id, str(path), f"eval/{ev.split}")
        if ev.verdict is not None:
            client.set_tag(run_id, "verdict", ev.verdict.label)
            client.set_tag(run_id, f"eval/{ev.split}/verdict", ev.verdict.label)
            client.log_dict(run_id, ev.verdict.to_dict(), f"eval/{ev.split}/verdict.json")
    return run_id


@dataclass(frozen=True)
class Publication:
    """Where :func:`publish` put an evaluation: the file, the figures, the MLflow run (None: not logged)."""

    file: Path
    figures: list[Path]
    run_id: str | None
    tracking_uri: str | None


def publish(ev: Evaluation, pretrained, out: Path, *, log: bool = True, tracking_uri: str | None = None,
            new_run: bool = False, experiment_name: str | None = None,
            params: dict[str, Any] | None = None) -> Publication:
    """Write everything of ``ev`` (call on rank 0): the figures and the evaluation file to
    ``out``, and with ``log`` the scalars, the figures and the file to MLflow.

    The store is :func:`resolve_tracking_uri` of ``tracking_uri``; the run is the
    checkpoint's training run, or with ``new_run`` (or a checkpoint without one) a new run
    in ``experiment_name`` (None: the training run's experiment, else ``scidiff-eval``)
    that records ``params``. The file names the run it is logged to; a new run's id is
    known only once it exists, so the run is created first and the file logged last.
    """
    from scidiff.evaluation.plots import evaluation_figures

    figures = evaluation_figures(ev, out)
    uri = resolve_tracking_uri(tracking_uri, pretrained) if log else None
    run_id = pretrained.mlflow_run_id if uri is not None and not new_run else None
    attrs = {"checkpoint": str(pretrained.checkpoint), "checkpoint_sha256": pretrained.sha256,
             "split": ev.split, "mlflow_tracking_uri": uri or "", "global_step": pretrained.global_step}
    file = out / "evaluation.nc"
    if uri is not None:
        experiment = experiment_name or _experiment_of(uri, pretrained.mlflow_run_id) or "scidiff-eval"
        run_id = log_to_mlflow(ev, tracking_uri=uri, run_id=pretrained.mlflow_run_id,
                               new_run=new_run or pretrained.mlflow_run_id is None, experiment_name=experiment,
                               step=pretrained.global_step, artifacts=figures, params=params)
        attrs["mlflow_run_id"] = run_id
    write_evaluation_file(ev, file, attrs)
    if uri is not None:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).log_artifact(run_id, str(file), f"eval/{ev.split}")
    return Publication(file.resolve(), figures, run_id, uri)


def _experiment_of(uri: str, run_id: str | None) -> str | None:
    """The experiment of the run ``run_id`` in the store ``uri`` (None: no such run)."""
    if run_id is None:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        return client.get_experiment(client.get_run(run_id).info.experiment_id).name
    except MlflowException:
        return None


def verdict_lines(ev: Evaluation) -> list[str]:
    """The verdict as a few aligned lines (a header, one line per metric, the overall
    ``verdict: ...`` line), or one line saying why there is none."""
    if ev.verdict is None:
        why = ev.info.get("floor", "none")
        return [f"verdict: none (no floor: {why.split(': ', 1)[-1] if why.startswith('none') else why})"]
    v = ev.verdict
    head = (f"noise floor: {ev.info.get('floor', '')}" if ev.info.get("floor") else "noise floor: real fields")
    return [head, *("  " + line for line in v.table()), f"verdict: {v.summary()}"]


COMPARED = ("spectral_error", "crps", "spread_skill")  # per channel, beside their floors, in a comparison


Row = tuple[dict[str, str], "str | None", dict[str, float]]  # (what names the evaluation, its verdict, its scalars)


def _label(names: dict[str, str]) -> str:
    first, *rest = names.items()
    return " ".join([first[1], *(f"{k}={v}" for k, v in rest)])


def comparison_lines(rows: Sequence[Row]) -> list[str]:
    """Aligned lines comparing several evaluations (the runs of a sweep): one per ``(names,
    verdict, scalars)`` (``names``: e.g. ``{"run": "0", "seed": "1"}``) with the verdict, the bound
    in bits/dim and each channel's :data:`COMPARED` metrics, the floor of real fields beside each."""
    keys = [k for k in dict.fromkeys(k for _, _, s in rows for k in s)
            if k.split("/", 1)[0] in COMPARED and "/" in k]
    keys.sort(key=lambda k: (COMPARED.index(k.split("/", 1)[0]), k))
    with_bpd = any("bpd" in s for _, _, s in rows)
    head = ["run", "verdict", *(["bpd"] if with_bpd else []), *(f"{k} (floor)" for k in keys)]
    table = []
    for names, verdict, s in rows:
        cells = [_label(names), verdict or "none", *([f"{s['bpd']:.4f}" if "bpd" in s else "-"] if with_bpd else [])]
        for k in keys:
            floor = f" ({s['floor/' + k]:.4g})" if "floor/" + k in s else ""
            cells.append(f"{s[k]:.4g}{floor}" if k in s else "-")
        table.append(cells)
    widths = [max(len(str(r[i])) for r in [head, *table]) for i in range(len(head))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *table]]


def write_comparison(path: str | os.PathLike, rows: Sequence[Row]) -> Path:
    """Every scalar of several evaluations as one CSV table, written atomically: a row per
    ``(names, verdict, scalars)``, a column per name (``run``, the swept keys), the verdict and
    a column per scalar (empty where an evaluation has none)."""
    import csv

    columns = list(dict.fromkeys(k for names, _, _ in rows for k in names))
    scalars = sorted(dict.fromkeys(k for _, _, s in rows for k in s))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*columns, "verdict", *scalars])
        for names, verdict, s in rows:
            writer.writerow([*(names.get(c, "") for c in columns), verdict or "",
                             *(repr(float(s[n])) if n in s else "" for n in scalars)])
    return Path(path)


def summary_line(ev: Evaluation, file: Path | None, run_id: str | None, tracking_uri: str | None) -> str:
    """One line: the key numbers and where the file and the MLflow run are."""
    s = ev.scalars
    parts = [f"scidiff-evaluate {ev.split} ({int(s['num_samples'])} samples)"]
    if "bpd" in s:
        se = s.get("bpd_se", float("nan"))
        parts.append(f"bound {s['bpd']:.4f} ± {se:.4f} bits/dim (physical units; {s['bpd_model']:.4f} normalised)")
        extra = [f"{k.split('/', 1)[1]} {v:.4f}" for k, v in s.items() if k.startswith("bpd/")]
        if extra:
            parts.append("variances: " + ", ".join(extra))
    if "ode_bpd" in s:
        parts.append(f"ODE NLL {s['ode_bpd']:.4f} ± {s['ode_bpd_se']:.4f} bits/dim")
    if "latent_bpd" in s:
        parts.append(f"latent bound {s['latent_bpd']:.4f} ± {s.get('latent_bpd_se', float('nan')):.4f} bits per "
                     "latent dimension (a bound on the latent's NLL, not the data's)")
    if "latent_ode_bpd" in s:
        parts.append(f"latent ODE NLL {s['latent_ode_bpd']:.4f} ± {s['latent_ode_bpd_se']:.4f} bits per latent dimension")
    rmse = [f"{k.split('/', 1)[1]} {v:.4g}" for k, v in s.items() if k.startswith("autoencoder_rmse/")]
    if rmse:
        parts.append("autoencoder reconstruction RMSE " + ", ".join(rmse))
    for nll, gap, label in (("true_nll_bpd", "gap", "true NLL"),
                            ("conditional_nll_bpd", "gap_conditional", "conditional NLL (not the marginal)")):
        if nll in s:
            gaps = [f"{k.split('/', 1)[1]} {v:.4f} ± {s.get(gap + '_se/' + k.split('/', 1)[1], float('nan')):.4f}"
                    for k, v in s.items() if k.startswith(gap + "/")]
            parts.append(f"{label} {s[nll]:.4f} bits/dim" + (f", gap (bound - true): {', '.join(gaps)}" if gaps else ""))
    for key, label in (("crps", "CRPS"), ("spectral_error", "spectral error (mean |ln P_samples/P_data| over shells)"),
                       ("spread_skill", "spread-skill")):
        vals = [f"{k.split('/', 1)[1]} {v:.4g}" + (f" (floor {s['floor/' + k]:.4g})" if "floor/" + k in s else "")
                for k, v in s.items() if k.startswith(key + "/")]
        if vals:
            parts.append(f"{label} " + ", ".join(vals))
    if "fidelity/top1" in s:
        def pm(key: str) -> str:  # value +- its standard error over the samples
            return f"{s[key]:.3f}" + (f" ± {s[key + '_se']:.3f}" if math.isfinite(s.get(key + "_se", math.nan)) else "")

        parts.append(f"fidelity top-1 {pm('fidelity/top1')} (real fields {pm('fidelity/real_top1')}, chance "
                     f"{1 / s['fidelity/candidates']:.3f}), similarity {pm('fidelity/similarity')} (real "
                     f"{pm('fidelity/real_similarity')})")
    if ev.verdict is not None:
        parts.append("verdict " + ev.verdict.summary())
    if file is not None:
        parts.append(f"file {file}")
    if run_id is not None:
        from scidiff.inference.tracking import store_description

        store, ui = store_description(tracking_uri)
        parts.append(f"MLflow run {run_id} in {store} | view: {ui}")
    return " | ".join(parts)


__all__ = [
    "CONVENTIONS",
    "UNITS_NOTE",
    "Publication",
    "comparison_lines",
    "log_to_mlflow",
    "metric_key",
    "metric_units",
    "netcdf_engine",
    "power_units",
    "publish",
    "read_evaluation_metrics",
    "resolve_tracking_uri",
    "summary_line",
    "to_dataset",
    "verdict_lines",
    "write_comparison",
    "write_evaluation_file",
]

"""Record a sampling run in MLflow: on the checkpoint's training run, or a new run.

``run``:
  * ``auto``       -- the checkpoint's run when its tracking store is reachable
    (a SQLite file that exists, or a server), else nothing;
  * ``checkpoint`` -- the checkpoint's run; unreachable is reported, not fatal;
  * ``new``        -- a new run in ``experiment_name`` (tagged with the training run);
  * ``none``       -- no logging.

On the training run the sampling is recorded as tags ``sample.<id>.*`` (``id`` is
the first 8 hex digits of the store's identity hash; params of a finished run
cannot be logged twice with other values) and metrics ``sample/*``; the training
run's status is left as it is. A new run ends ``FINISHED``, or ``FAILED`` (``KILLED``
on an interrupt) when logging into it fails
(:func:`scidiff.inference.tracking.terminating`).

The store is the checkpoint's (:func:`scidiff.inference.tracking.checkpoint_tracking_uri`,
the caller's ``tracking_uri``), wherever the command runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from scidiff.inference.tracking import artifact_location, default_tracking_uri, reachable, terminating

MlflowMode = Literal["auto", "checkpoint", "new", "none"]
MLFLOW_MODES: tuple[str, ...] = get_args(MlflowMode)


def log_sampling(
    *,
    mode: MlflowMode,
    tracking_uri: str | None,
    experiment_name: str,
    training_run_id: str | None,
    identity_sha256: str,
    store_path: str,
    config: Mapping[str, Any],
    metrics: Mapping[str, float],
) -> str | None:
    """Log to MLflow as ``mode`` says; returns a one-line description, or ``None`` when nothing was logged."""
    if mode not in MLFLOW_MODES:
        raise ValueError(f"mlflow.run: unknown mode {mode!r}; expected one of {MLFLOW_MODES}")
    if mode == "none":
        return None
    uri = tracking_uri or default_tracking_uri()
    if not reachable(uri):
        if mode == "auto":
            return None
        return f"MLflow store {uri} not reachable: nothing logged"
    from mlflow.tracking import MlflowClient

    from scidiff.sampling.store import canonical_json
    from scidiff.inference.tracking import flatten

    client = MlflowClient(tracking_uri=uri)
    tag = f"sample.{identity_sha256[:8]}"
    if mode in ("auto", "checkpoint"):
        if not training_run_id:
            return None if mode == "auto" else "the checkpoint has no MLflow run id: nothing logged"
        run_id = training_run_id
        client.set_tag(run_id, f"{tag}.store", store_path)
        client.set_tag(run_id, f"{tag}.config", canonical_json(config)[:4900])
        for name, value in metrics.items():
            client.log_metric(run_id, f"sample/{name}", float(value))
        return f"logged to MLflow run {run_id} (tags {tag}.*)"
    exp = client.get_experiment_by_name(experiment_name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(
        experiment_name, artifact_location=artifact_location(uri))
    tags = {"store": store_path, "identity_sha256": identity_sha256}
    if training_run_id:
        tags["training_run_id"] = training_run_id
    run = client.create_run(exp_id, tags=tags, run_name=f"sample/{Path(store_path).name}")
    run_id = run.info.run_id
    with terminating(client, run_id, uri):  # FINISHED, or FAILED if logging into it fails
        for key, value in flatten(dict(config)).items():
            client.log_param(run_id, key, str(value)[:500])
        for name, value in metrics.items():
            client.log_metric(run_id, f"sample/{name}", float(value))
    return f"logged to new MLflow run {run_id} in experiment {experiment_name}"


__all__ = ["MLFLOW_MODES", "log_sampling"]

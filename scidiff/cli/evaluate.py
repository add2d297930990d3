"""``scidiff-evaluate``: the bound and the sample metrics of a trained model on a data split.

    scidiff-evaluate checkpoint=outputs/quickstart/<run_name> split=val
    scidiff-evaluate checkpoint=runs:/<run_id> bound.estimator=importance bound.num_terms=32
    scidiff-evaluate checkpoint=<run dir> ensemble=ensembles/grf.zarr
    torchrun --nproc-per-node 4 -m scidiff.cli.evaluate checkpoint=<run dir>

The config (``configs/evaluate.yaml`` plus ``key=value`` overrides) is composed with
Hydra's compose API (no change of directory, no run directory) and checked first:
an unknown key, a wrong type or a missing checkpoint prints one line naming it and
exits with status 2. Metrics go to MLflow under ``eval/<split>/...`` (the training
run by default), figures and the evaluation file (netCDF) to ``out`` and to the run's
artifacts.

Every sample metric is reported next to its **noise floor** (``floor/<metric>``: the
same metric for ensembles of real fields of the store with the nearest conditions;
``floor:`` in the config) and judged against it (``verdict:``): before the last line a
few aligned lines give each metric's model value, floor, pass/FAIL and rule, then
``verdict: faithful (n/n metrics within their floor)`` or ``verdict: NOT faithful:
<failing metrics>``. The run gets the MLflow tag ``verdict`` (``faithful``/``not
faithful``) and the artifact ``eval/<split>/verdict.json``. The last line gives the
key numbers and where everything is.

Exit status: 0 done; 1 an unexpected failure (traceback in ``<out>/error.log``); 2 a
bad config or input (one line naming the key); 3 with ``verdict.fail_on_unfaithful=true``
when a metric is not within its floor, after everything (file, figures, MLflow) is
written.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

from scidiff.cli.compose import compose_config

CONFIG_NAME = "evaluate"
UNFAITHFUL_STATUS = 3  # verdict.fail_on_unfaithful=true and a metric outside its floor


@dataclasses.dataclass
class LoggerConfig:
    enabled: bool = True
    tracking_uri: str | None = None
    new_run: bool = False
    experiment_name: str | None = None


@dataclasses.dataclass
class EvaluateConfig:
    """Top-level keys of ``configs/evaluate.yaml``; the sections are checked against
    :mod:`scidiff.evaluation.run`'s settings dataclasses."""

    checkpoint: str
    split: Literal["train", "val", "test"] = "test"
    max_samples: int | None = None
    batch_size: int = 16
    data_path: str | None = None
    ensemble: str | None = None
    out: str | None = None
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    num_panels: int = 4
    bound: dict | None = None
    ode: dict | None = None
    sampling: dict | None = None
    sampler: dict | None = None
    guidance: dict | None = None
    metrics: dict | None = None
    floor: dict | None = None
    verdict: dict | None = None
    logger: dict | None = None


def compose(argv: list[str]):
    """The composed config (errors as one-line ``ConfigError``)."""
    return compose_config(CONFIG_NAME, argv)


def check_config(cfg) -> dict[str, Any]:
    """Plain-python config after checking every key and type; raises ``ConfigError``."""
    from omegaconf import OmegaConf

    from scidiff.cli.config_check import check_dataclass
    from scidiff.cli.errors import ConfigError
    from scidiff.evaluation.floor import FloorSettings
    from scidiff.evaluation.floor import check_settings as check_floor
    from scidiff.evaluation.run import BoundSettings, MetricSettings, ODESettings, SamplingSettings
    from scidiff.evaluation.verdict import VerdictSettings
    from scidiff.evaluation.verdict import check_settings as check_verdict
    from scidiff.inference.generation import as_guidance, as_sampler
    from scidiff.inference.tracking import is_run_id

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint: required (a .ckpt file, a run directory or an MLflow run id): checkpoint=<path>")
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # interpolation errors
        from scidiff.cli.errors import from_hydra

        raise from_hydra(exc) from None
    plain.pop("hydra", None)
    check_dataclass(plain, EvaluateConfig, "")
    for key, schema in (("bound", BoundSettings), ("ode", ODESettings), ("sampling", SamplingSettings),
                        ("metrics", MetricSettings), ("floor", FloorSettings), ("verdict", VerdictSettings),
                        ("logger", LoggerConfig)):
        section = plain.get(key) or {}
        plain[key] = section
        check_dataclass(section, schema, f"{key}.")
    variance = plain["bound"].get("variance", [])
    if not isinstance(variance, list) or not all(isinstance(v, str) for v in variance):
        raise ConfigError(f"bound.variance: expected a list of names, got {variance!r}")
    positive = {"batch_size": plain["batch_size"], "num_panels": plain["num_panels"],
                "bound.num_terms": plain["bound"].get("num_terms", 16),
                "bound.timestep_batch": plain["bound"].get("timestep_batch", 50),
                "ode.num_steps": plain["ode"].get("num_steps", 100)}
    if plain["max_samples"] is not None:
        positive["max_samples"] = plain["max_samples"]
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if plain["bound"].get("num_terms", 16) < 2:
        raise ConfigError("bound.num_terms: must be >= 2 (for a standard error)")
    if plain["sampling"].get("members", 4) < 2:
        raise ConfigError(f"sampling.members: must be >= 2 (CRPS, spread-skill), got {plain['sampling']['members']}")
    if plain["ode"].get("num_probes", 4) < 2:
        raise ConfigError("ode.num_probes: must be >= 2 (for a standard error)")
    try:
        check_floor(FloorSettings(**plain["floor"]))
        check_verdict(VerdictSettings(**plain["verdict"]))
        plain["sampler"] = as_sampler(plain.get("sampler") or {})
        plain["guidance"] = as_guidance(plain.get("guidance"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for key in ("data_path", "ensemble"):
        if plain[key] is not None and not Path(plain[key]).exists():
            raise ConfigError(f"{key}: {plain[key]} does not exist")
    ckpt = str(plain["checkpoint"])
    if not ckpt.startswith("runs:/") and not is_run_id(ckpt) and not Path(ckpt).exists():
        raise ConfigError(f"checkpoint: {ckpt} does not exist (give a .ckpt file, a run directory or an MLflow run id)")
    return plain


def settings_from(plain: dict[str, Any]):
    from scidiff.evaluation.floor import FloorSettings
    from scidiff.evaluation.run import (
        BoundSettings,
        EvaluationSettings,
        MetricSettings,
        ODESettings,
        SamplingSettings,
    )
    from scidiff.evaluation.verdict import VerdictSettings

    bound = dict(plain["bound"])
    bound["variance"] = tuple(bound.get("variance", ()))
    return EvaluationSettings(
        split=plain["split"], max_samples=plain["max_samples"], batch_size=plain["batch_size"], seed=plain["seed"],
        num_panels=plain["num_panels"], bound=BoundSettings(**bound), ode=ODESettings(**plain["ode"]),
        sampling=SamplingSettings(**plain["sampling"]), sampler=plain["sampler"], guidance=plain["guidance"], metrics=MetricSettings(**plain["metrics"]),
        floor=FloorSettings(**plain.get("floor", {})), verdict=VerdictSettings(**plain.get("verdict", {})),
    )


def output_dir(plain: dict[str, Any], pretrained) -> Path:
    """``out``, else ``<run dir>/eval/<split>`` beside ``<run dir>/checkpoints/``, else
    ``eval/<run id or sha>/<split>`` in the working directory (MLflow-downloaded checkpoints)."""
    if plain["out"] is not None:
        return Path(plain["out"])
    ckpt = Path(pretrained.checkpoint)
    if ckpt.parent.name == "checkpoints" and not str(plain["checkpoint"]).startswith("runs:/") \
            and Path(plain["checkpoint"]).exists():
        return ckpt.parent.parent / "eval" / plain["split"]
    return Path("eval") / (pretrained.mlflow_run_id or pretrained.sha256[:12]) / plain["split"]


def _init_distributed() -> None:
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)


def run(plain: dict[str, Any]) -> dict[str, Any]:
    """Evaluate, write, log; returns a summary (rank 0 prints the verdict and the last line);
    ``summary["verdict"]``: ``faithful``, ``not faithful`` or None (no floor)."""
    import torch

    from scidiff.cli.errors import ConfigError
    from scidiff.evaluation.plots import evaluation_figures
    from scidiff.evaluation.report import (
        log_to_mlflow,
        resolve_tracking_uri,
        summary_line,
        verdict_lines,
        write_evaluation_file,
    )
    from scidiff.evaluation.run import EvaluationError, evaluate
    from scidiff.inference.checkpoint import CheckpointError, load_pretrained
    from scidiff.inference.runtime import current_context

    logger = plain["logger"]
    try:
        pretrained = load_pretrained(plain["checkpoint"], tracking_uri=logger.get("tracking_uri"))
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    _init_distributed()
    rank = current_context().rank
    try:
        ev = evaluate(pretrained, settings_from(plain), data_path=plain["data_path"], ensemble=plain["ensemble"],
                      device=plain["device"], progress=plain["progress"] and rank == 0)
    except EvaluationError as exc:
        raise ConfigError(str(exc)) from None
    summary: dict[str, Any] = {"scalars": ev.scalars, "verdict": None if ev.verdict is None else ev.verdict.label}
    if rank == 0:
        out = output_dir(plain, pretrained)
        figures = evaluation_figures(ev, out)
        uri = resolve_tracking_uri(logger.get("tracking_uri"), pretrained) if logger.get("enabled", True) else None
        run_id = pretrained.mlflow_run_id if uri is not None and not logger.get("new_run") else None
        attrs = {"checkpoint": str(pretrained.checkpoint), "checkpoint_sha256": pretrained.sha256,
                 "split": ev.split, "mlflow_tracking_uri": uri or "", "global_step": pretrained.global_step}
        # The file names the run it is logged to; a new run's id is known only after creation,
        # so the run is created first and the file logged last.
        file = out / "evaluation.nc"
        if uri is not None:
            experiment = logger.get("experiment_name") or _experiment_of(uri, pretrained.mlflow_run_id) or "scidiff-eval"
            try:
                run_id = log_to_mlflow(ev, tracking_uri=uri, run_id=pretrained.mlflow_run_id,
                                       new_run=bool(logger.get("new_run")) or pretrained.mlflow_run_id is None,
                                       experiment_name=experiment, step=pretrained.global_step, artifacts=figures,
                                       params=_params(plain, pretrained))
            except EvaluationError as exc:
                raise ConfigError(str(exc)) from None
            attrs["mlflow_run_id"] = run_id
        write_evaluation_file(ev, file, attrs)
        if uri is not None:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=uri).log_artifact(run_id, str(file), f"eval/{ev.split}")
        summary.update(file=str(file.resolve()), figures=[str(p) for p in figures], mlflow_run_id=run_id,
                       tracking_uri=uri)
        print("\n".join(verdict_lines(ev)), flush=True)
        print(summary_line(ev, file.resolve(), run_id, uri), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return summary


def _experiment_of(uri: str, run_id: str | None) -> str | None:
    if run_id is None:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        return client.get_experiment(client.get_run(run_id).info.experiment_id).name
    except MlflowException:
        return None


def _params(plain: dict[str, Any], pretrained) -> dict[str, Any]:
    from scidiff.inference.generation import GuidanceSpec, Sampler
    from scidiff.inference.tracking import flatten

    out = flatten({k: (v.identity() if isinstance(v, (Sampler, GuidanceSpec)) else v)
                   for k, v in plain.items() if k != "logger"})
    out.update({"checkpoint_sha256": pretrained.sha256, "global_step": pretrained.global_step})
    return out


def _status(plain: dict[str, Any]) -> int | None:
    summary = run(plain)
    if plain["verdict"].get("fail_on_unfaithful", False) and summary.get("verdict") == "not faithful":
        return UNFAITHFUL_STATUS  # everything is written: the status only tells a pipeline to stop
    return None


def _log_dir(plain: dict[str, Any]) -> Path:
    import tempfile

    return Path(plain["out"]) if plain["out"] else Path(tempfile.gettempdir()) / "scidiff-evaluate"


def main(argv: list[str] | None = None) -> None:
    from scidiff.cli.runner import Command, run_command

    run_command(Command(CONFIG_NAME, __doc__, lambda cfg: check_config(cfg), _status, log_dir=_log_dir), argv)


if __name__ == "__main__":
    main()

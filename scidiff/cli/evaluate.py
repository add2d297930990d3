"""``scidiff-evaluate``: the bound and the sample metrics of a trained model on a data split.

    scidiff-evaluate checkpoint=outputs/quickstart/<run_name> split=val
    scidiff-evaluate checkpoint=runs:/<run_id> bound.estimator=importance bound.num_terms=32
    scidiff-evaluate checkpoint=models:/grf-quickstart/1 split=test
    scidiff-evaluate checkpoint=<run dir> ensemble=ensembles/grf.zarr
    scidiff-evaluate checkpoint=outputs/multirun/<run_name>    # every run of a sweep, compared
    torchrun --nproc-per-node 4 -m scidiff.cli.evaluate checkpoint=<run dir>

The config (``configs/evaluate.yaml`` plus ``key=value`` overrides) is composed with
Hydra's compose API (no change of directory, no run directory) and checked first:
an unknown key, a wrong type, a bad value or a missing checkpoint prints one line
naming it and exits with status 2. The settings are those of
``scidiff.evaluation.EvaluationSettings`` (``metrics:`` names its suite with
``_target_``); the evaluation is ``scidiff.evaluation.evaluate``, its outputs
``scidiff.evaluation.report.publish``: metrics to MLflow under ``eval/<split>/...``
(the training run by default), figures and the evaluation file (netCDF) to ``out``
and to the run's artifacts.

Every sample metric is reported next to its **noise floor** (``floor/<metric>``: the
same metric for ensembles of real fields of the store with the nearest conditions;
``floor:`` in the config) and judged against it (``verdict:``): before the last line a
few aligned lines give each metric's model value, floor, pass/FAIL and rule, then
``verdict: faithful (n/n metrics within their floor)`` or ``verdict: NOT faithful:
<failing metrics>``. The run gets the MLflow tag ``verdict`` (``faithful``/``not
faithful``) and the artifact ``eval/<split>/verdict.json``. The last line gives the
key numbers and where everything is.

A sweep's directory (``scidiff-train -m``: ``multirun.yaml`` and the runs ``0``, ``1``, ...)
evaluates each run in turn, with the same settings, each into its own ``<run>/eval/<split>``
and its own MLflow run; then a table compares the runs (their swept values, verdicts, bounds
and metrics beside the floors) and ``<sweep>/evaluation_<split>.csv`` holds every scalar of
every run. Every run's output is checked before the first is evaluated.

Exit status: 0 done; 1 an unexpected failure (traceback in ``<out>/error.log``); 2 a
bad config or input (one line naming the key); 3 with ``verdict.fail_on_unfaithful=true``
when a metric is not within its floor, after everything (file, figures, MLflow) is
written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

CONFIG_NAME = "evaluate"
UNFAITHFUL_STATUS = 3  # verdict.fail_on_unfaithful=true and a metric outside its floor


@dataclasses.dataclass(frozen=True)
class LoggerConfig:
    """``logger:``: MLflow (the checkpoint's store and training run by default)."""

    enabled: bool = True
    tracking_uri: str | None = None
    new_run: bool = False
    experiment_name: str | None = None


@dataclasses.dataclass(frozen=True)
class CommandOptions:
    """The top-level keys of ``configs/evaluate.yaml`` that are not
    :class:`~scidiff.evaluation.settings.EvaluationSettings`: what to evaluate, on which
    data and device, and where the results go."""

    checkpoint: str
    adapter: str | None = None
    control_scale: float | None = None
    execution: dict | None = None
    data_path: str | None = None
    ensemble: str | None = None
    out: str | None = None
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True
    logger: dict | None = None


def check_config(cfg) -> dict[str, Any]:
    """The plain config, checked: every key and type against the schema (the settings
    dataclasses themselves, :class:`CommandOptions`, :class:`LoggerConfig`), then every
    value by constructing the settings (``plain["settings"]``); raises ``ConfigError``."""
    from omegaconf import OmegaConf

    from scidiff.cli.config_check import check_dataclass, check_execution
    from scidiff.cli.errors import ConfigError, from_hydra
    from scidiff.evaluation.settings import SECTIONS, EvaluationSettings
    from scidiff.evaluation.suite import suite_class
    from scidiff.inference.tracking import is_mlflow_reference

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint: required (a .ckpt file, a run directory, an MLflow run id, runs:/<run_id> or "
                          "models:/<name>/<version>): checkpoint=<path>")
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # interpolation errors
        raise from_hydra(exc) from None
    plain.pop("hydra", None)
    settings_keys = [f.name for f in dataclasses.fields(EvaluationSettings)]
    command_keys = [f.name for f in dataclasses.fields(CommandOptions)]
    for key in plain:
        if key not in settings_keys and key not in command_keys:
            raise ConfigError(f"{key}: unknown key (accepted: {', '.join(command_keys + settings_keys)})")
    check_dataclass({k: v for k, v in plain.items() if k in command_keys}, CommandOptions, "")
    check_execution(plain)
    for f in dataclasses.fields(CommandOptions)[1:]:  # a key removed with ~key: its default
        plain.setdefault(f.name, f.default)
    check_dataclass({k: v for k, v in plain.items() if k in settings_keys}, EvaluationSettings, "")
    try:
        metrics = plain.get("metrics") or {}
        schemas = {**SECTIONS, "logger": LoggerConfig,
                   "metrics": suite_class(metrics.get("_target_") if isinstance(metrics, dict) else None)}
        for key, schema in schemas.items():
            section = plain.get(key) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"{key}: expected a mapping of {schema.__name__} settings, got {section!r}")
            check_dataclass({k: v for k, v in section.items() if k != "_target_"}, schema, f"{key}.")
        plain["settings"] = EvaluationSettings.from_config(plain)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for key in ("data_path", "ensemble"):
        if plain[key] is not None and not Path(plain[key]).exists():
            raise ConfigError(f"{key}: {plain[key]} does not exist")
    ckpt = str(plain["checkpoint"])
    if not is_mlflow_reference(ckpt) and not Path(ckpt).exists():
        raise ConfigError(f"checkpoint: {ckpt} does not exist (give a .ckpt file, a run directory, an MLflow run id, "
                          "runs:/<run_id> or models:/<name>/<version>)")
    plain["sweep_runs"] = sweep_runs(Path(ckpt)) if not is_mlflow_reference(ckpt) else None
    if plain["sweep_runs"] is not None and plain["out"] is not None:
        raise ConfigError(f"out: {ckpt} is a sweep, whose runs are each evaluated into their own <run>/eval/<split>; "
                          "leave out unset")
    return plain


def sweep_runs(path: Path) -> list[Path] | None:
    """:func:`scidiff.inference.checkpoint.sweep_runs`; a sweep without a trained run is a ``ConfigError``."""
    from scidiff.cli.errors import ConfigError
    from scidiff.inference.checkpoint import sweep_runs as runs_of

    runs = runs_of(path)
    if runs == []:
        raise ConfigError(f"checkpoint: the sweep {path} holds no trained run (<job number>/checkpoints/)")
    return runs


def swept_values(runs: list[Path]) -> list[dict[str, str]]:
    """What tells the runs of a sweep apart: the overrides (``.hydra/overrides.yaml``) whose value
    differs between them, e.g. ``{"seed": "1", "diffusion": "edm"}``, per run."""
    import yaml

    given = []
    for run in runs:
        file = run / ".hydra" / "overrides.yaml"
        given.append(dict(o.split("=", 1) for o in (yaml.safe_load(file.read_text()) if file.is_file() else [])
                          if "=" in o))
    keys = [k for k in dict.fromkeys(k for g in given for k in g) if len({g.get(k) for g in given}) > 1]
    return [{k: g[k] for k in keys if k in g} for g in given]


def output_dir(plain: dict[str, Any], pretrained) -> Path:
    """``out``, else ``<run dir>/eval/<split>`` beside ``<run dir>/checkpoints/``, else
    ``eval/<run id or sha>/<split>`` in the working directory (MLflow-downloaded checkpoints)."""
    from scidiff.inference.tracking import is_mlflow_reference

    if plain["out"] is not None:
        return Path(plain["out"])
    split = plain["settings"].split + variant_suffix(pretrained)
    ckpt = Path(pretrained.checkpoint)
    if ckpt.parent.name == "checkpoints" and not is_mlflow_reference(str(plain["checkpoint"])) \
            and Path(plain["checkpoint"]).exists():
        return ckpt.parent.parent / "eval" / split
    return Path("eval") / (pretrained.mlflow_run_id or pretrained.sha256[:12]) / split


def variant_suffix(pretrained) -> str:
    """``""`` for the checkpoint as trained; for it with an adapter merged, another ControlNet
    scale or bf16 arithmetic, a suffix naming that variant (``-adapter-<sha>``, ``-control0.5``,
    ``-bf16``), so its evaluation never takes the place of the checkpoint's own."""
    ident = pretrained.model_identity
    suffix = f"-adapter-{ident['adapter_sha256'][:8]}" if "adapter_sha256" in ident else ""
    if ident.get("control_scale", 1.0) != 1.0:
        suffix += f"-control{ident['control_scale']:g}"
    if "precision" in ident:
        suffix += f"-{ident['precision']}"
    return suffix


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse, before computing, an ``out`` that already holds an evaluation (unless ``overwrite``)
    or that cannot be written (the nearest existing directory is not writable)."""
    import os

    from scidiff.cli.errors import ConfigError

    if (out / "evaluation.nc").exists() and not overwrite:
        raise ConfigError(f"out: {out} already holds an evaluation (evaluation.nc); pass overwrite=true to replace "
                          f"it, or choose another out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} exists and is not a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"out: cannot write under {parent} (permission denied); choose another out")


def run(plain: dict[str, Any]) -> dict[str, Any]:
    """Evaluate, write, log; returns a summary (rank 0 prints the verdict and the last line);
    ``summary["verdict"]``: ``faithful``, ``not faithful`` or None (no floor)."""
    from scidiff.evaluation.report import publish, summary_line, verdict_lines
    from scidiff.evaluation.run import evaluate
    from scidiff.inference.checkpoint import load_pretrained
    from scidiff.inference.runtime import distributed_context, resolve_device

    logger = LoggerConfig(**(plain["logger"] or {}))
    pretrained = load_pretrained(plain["checkpoint"], tracking_uri=logger.tracking_uri, adapter=plain["adapter"],
                                 control_scale=plain["control_scale"], execution=plain["execution"])
    check_output(output_dir(plain, pretrained), bool(plain["overwrite"]))  # before hours of computing
    device = resolve_device(plain["device"])
    ctx = distributed_context(device)
    try:
        ev = evaluate(pretrained, plain["settings"], data_path=plain["data_path"], ensemble=plain["ensemble"],
                      device=device, progress=plain["progress"] and ctx.rank == 0)
        summary: dict[str, Any] = {"scalars": ev.scalars, "verdict": None if ev.verdict is None else ev.verdict.label}
        if ctx.rank == 0:
            # a variant of the checkpoint (adapter, ControlNet scale, bf16) gets its own run, never the training run's metrics
            done = publish(ev, pretrained, output_dir(plain, pretrained), log=logger.enabled,
                           tracking_uri=logger.tracking_uri, new_run=logger.new_run or bool(variant_suffix(pretrained)),
                           experiment_name=logger.experiment_name, params=_params(plain, pretrained))
            summary.update(file=str(done.file), figures=[str(p) for p in done.figures], mlflow_run_id=done.run_id,
                           tracking_uri=done.tracking_uri)
            print("\n".join(verdict_lines(ev)), flush=True)
            print(summary_line(ev, done.file, done.run_id, done.tracking_uri), flush=True)
        ctx.barrier()
    finally:
        ctx.close()
    return summary


def _params(plain: dict[str, Any], pretrained) -> dict[str, Any]:
    """The config as MLflow params of a new run (the sampler and guidance as they are recorded)."""
    from scidiff.inference.tracking import flatten

    settings = plain["settings"]
    config = {k: v for k, v in plain.items() if k not in ("logger", "settings", "sweep_runs")}
    config.update(sampler=settings.sampler.identity(), guidance=settings.guidance.identity())
    out = flatten(config)
    out.update({"checkpoint_sha256": pretrained.sha256, "global_step": pretrained.global_step,
                **pretrained.model_identity})
    return out


def run_sweep(plain: dict[str, Any]) -> list[dict[str, Any]]:
    """Evaluate every run of a sweep (``plain["sweep_runs"]``) as :func:`run` evaluates one, after
    checking that none of their outputs holds an evaluation; then print the comparison and write
    ``<sweep>/evaluation_<split>.csv`` (rank 0). Returns the runs' summaries."""
    import os

    from scidiff.evaluation.report import comparison_lines, write_comparison
    from scidiff.inference.checkpoint import load_pretrained

    runs = plain["sweep_runs"]
    logger = LoggerConfig(**(plain["logger"] or {}))
    for run_dir in runs:  # before hours of computing: no run's evaluation would be refused at its turn
        pretrained = load_pretrained(str(run_dir), tracking_uri=logger.tracking_uri, adapter=plain["adapter"],
                                     control_scale=plain["control_scale"], execution=plain["execution"])
        check_output(output_dir({**plain, "checkpoint": str(run_dir)}, pretrained), bool(plain["overwrite"]))
    summaries = []
    for i, run_dir in enumerate(runs):
        print(f"scidiff-evaluate: run {i + 1} of {len(runs)} of the sweep: {run_dir}", flush=True)
        summaries.append(run({**plain, "checkpoint": str(run_dir), "sweep_runs": None}))
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's rank (each run's group is closed by now)
        rows = [({"run": run_dir.name, **values}, s["verdict"], s["scalars"])
                for run_dir, values, s in zip(runs, swept_values(runs), summaries)]
        table = write_comparison(runs[0].parent / f"evaluation_{plain['settings'].split}.csv", rows)
        print("\n".join(["", *comparison_lines(rows), f"table of every scalar: {table}"]), flush=True)
    return summaries


def _status(plain: dict[str, Any]) -> int | None:
    summaries = run_sweep(plain) if plain["sweep_runs"] else [run(plain)]
    if plain["settings"].verdict.fail_on_unfaithful and any(s.get("verdict") == "not faithful" for s in summaries):
        return UNFAITHFUL_STATUS  # everything is written: the status only tells a pipeline to stop
    return None


def _log_dir(plain: dict[str, Any]) -> Path:
    import tempfile

    return Path(plain["out"]) if plain["out"] else Path(tempfile.gettempdir()) / "scidiff-evaluate"


def main(argv: list[str] | None = None) -> None:
    from scidiff.cli.runner import Command, run_command
    from scidiff.evaluation.result import EvaluationError
    from scidiff.inference.checkpoint import CheckpointError
    from scidiff.inference.runtime import DeviceError

    run_command(Command(CONFIG_NAME, __doc__, check_config, _status, log_dir=_log_dir,
                        input_errors=(EvaluationError, CheckpointError, DeviceError)), argv)


if __name__ == "__main__":
    main()

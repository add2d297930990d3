"""``scidiff-sample``: generate an ensemble from a trained checkpoint into a zarr store.

    scidiff-sample checkpoint=outputs/quickstart/<run> members=8 \\
        'params.grid={spectral_index: [1.5, 2.5], amplitude: [1.0]}' out=ensemble.zarr
    scidiff-sample checkpoint=<mlflow run id> params.csv=sets.csv sampler=ddpm
    scidiff-sample checkpoint=models:/grf-quickstart/1 params.csv=sets.csv    # a registered model version
    scidiff-sample checkpoint=outputs/climate_downscale/<run> conditions.path=coarse_tas.zarr members=8
    torchrun --nproc_per_node 4 -m scidiff.cli.sample checkpoint=... out=big.zarr

The config (``configs/sample.yaml``) is composed with Hydra's compose API, so
nothing is written but ``out`` and the working directory is not changed. It is
checked first: an unknown key or a wrong type is one line naming the key, exit
status 2; so are bad inputs (a parameter missing or unknown, a checkpoint that is
not a scidiff one, a condition store lacking a variable or on another grid, an
``out`` holding another run's store). Running the same
command again resumes an interrupted store. The end prints one line: where the
store is, members written and skipped, members/s.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from scidiff.cli.compose import CONFIG_DIR, to_plain
from scidiff.cli.compose import compose_config as compose

USAGE = __doc__


@dataclasses.dataclass
class SampleConfig:
    """Top-level keys of ``configs/sample.yaml``."""

    checkpoint: str
    tracking_uri: str | None
    adapter: str | None
    control_scale: float | None
    execution: dict | None
    params: dict | None
    members: int
    batch_size: int
    batch_invariant: bool
    micro_batch: int
    seed: int
    sampler: dict            # a _target_ node of configs/sampler/
    guidance: dict
    observations: dict | None
    conditions: dict | None
    out: str
    overwrite: bool
    device: str
    progress: bool
    mlflow: dict | None


@dataclasses.dataclass
class ParamsConfig:
    grid: dict | None = None
    list: Any = None
    csv: str | None = None


@dataclasses.dataclass
class ObservationsConfig:
    path: str
    method: Literal["repaint", "dps"] = "repaint"
    mask: str | None = "mask"
    num_steps: int | None = None     # repaint: sampling steps (None: all T); dps: steps
    jump_length: int | None = None   # repaint
    resample: int | None = None      # repaint
    step_size: float | None = None   # dps


@dataclasses.dataclass
class ConditionsConfig:
    path: str
    isel: dict | None = None         # {dim: index | [indices]}: samples of the input to use
    embedding: str | None = None     # the variable holding the embedding (default: the training's name)


@dataclasses.dataclass
class MlflowConfig:
    run: Literal["auto", "checkpoint", "new", "none"] = "auto"
    tracking_uri: str | None = None
    experiment_name: str = "scidiff-sample"


def compose_config(argv: list[str]):
    """The composed config (Hydra compose API), errors as one-line ``ConfigError``."""
    return compose("sample", argv)


def check_config(cfg) -> dict[str, Any]:
    """Plain-python config after checking every key and type (``ConfigError`` names the key)."""
    from scidiff.cli.config_check import check_dataclass, check_execution
    from scidiff.cli.errors import ConfigError
    from scidiff.inference.generation import as_guidance, as_sampler

    plain = to_plain(cfg)
    if isinstance(plain.get("checkpoint"), (int, float)) and not isinstance(plain["checkpoint"], bool):
        plain["checkpoint"] = str(plain["checkpoint"])
    if plain.get("checkpoint") in (None, "???"):
        raise ConfigError("checkpoint: required (checkpoint=<.ckpt file | run directory | runs:/<id> | run id | "
                          "models:/<name>/<version>>)")
    check_dataclass(plain, SampleConfig, "")
    check_execution(plain)
    try:  # the sampler and guidance check their own values
        plain["sampler"] = as_sampler(plain["sampler"])
        plain["guidance"] = as_guidance(plain["guidance"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if plain.get("params") is not None:
        check_dataclass(plain["params"], ParamsConfig, "params.")
    if plain.get("observations") is not None:
        if plain["observations"].get("path") in (None, "???"):
            raise ConfigError("observations.path: required (a zarr or netCDF store of the observed values)")
        check_dataclass(plain["observations"], ObservationsConfig, "observations.")
    if plain.get("conditions") is not None:
        if not isinstance(plain["conditions"], dict):
            raise ConfigError(f"conditions: expected a mapping {{path: <zarr or netCDF store>, isel: ...}}, "
                              f"got {plain['conditions']!r}")
        if plain["conditions"].get("path") in (None, "???"):
            if any(v is not None for k, v in plain["conditions"].items() if k != "path"):
                raise ConfigError("conditions.path: required (a zarr or netCDF store of the condition fields)")
            plain["conditions"] = None  # the default {path: null, isel: null}: no conditions
        else:
            check_dataclass(plain["conditions"], ConditionsConfig, "conditions.")
            if "://" not in str(plain["conditions"]["path"]) and not Path(plain["conditions"]["path"]).exists():
                raise ConfigError(f"conditions.path: {plain['conditions']['path']} does not exist")
    if plain.get("mlflow") is not None:
        check_dataclass(plain["mlflow"], MlflowConfig, "mlflow.")
    return plain


def run(plain: dict[str, Any]) -> None:
    from scidiff.sampling.workflow import sample_ensemble

    sample_ensemble(plain, log=lambda line: print(line, flush=True))


def main(argv: list[str] | None = None) -> None:
    from scidiff.cli.runner import Command, run_command
    from scidiff.inference.checkpoint import CheckpointError
    from scidiff.sampling.conditions import ConditionError
    from scidiff.sampling.grid import ParameterError
    from scidiff.sampling.observations import ObservationError
    from scidiff.sampling.store import StoreError
    from scidiff.sampling.workflow import SampleError

    run_command(Command("sample", USAGE, check_config, run,
                        input_errors=(ParameterError, StoreError, SampleError, ObservationError, ConditionError,
                                      CheckpointError)), argv)


if __name__ == "__main__":
    main()

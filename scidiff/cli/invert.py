"""``scidiff-invert``: DDIM inversion of given fields to their latent noise, and back.

    scidiff-invert checkpoint=outputs/quickstart/<run> input=fields.zarr out=latent.zarr
    scidiff-invert checkpoint=<mlflow run id> input=obs.nc sampler.steps=100 sampler.spacing=trailing

Each field x_0 of ``input`` (physical units) is normalised with the checkpoint's
statistics, mapped to the x_T that deterministic DDIM turns back into it (EMA
weights, ``refine_steps`` fixed-point iterations per step), and regenerated from that
x_T with the same DDIM (``sampler.steps``, ``sampler.spacing``; eta 0). The workflow
is :mod:`scidiff.sampling.invert`.
The reconstruction error measures how faithful the latent is: a latent that
regenerates its field is what editing needs (invert, change the parameters,
regenerate).

Input store: one variable per channel of the checkpoint, named as the channel
(``metadata.channel_names``: ``field``, ``tas``, ...), dims ``(sample, *spatial)``
(no ``sample`` dim: one field), in physical units, NaN = missing (filled with 0 in
model units as in training and left out of the error). A conditional model also
needs each parameter (a data variable or coordinate along ``sample``, or a scalar
for all) and each conditioning-field variable (read and normalised as
``scidiff-sample``'s ``conditions``: :mod:`scidiff.sampling.conditions`);
coarsened-target fields (``<channel>@coarse4x4``) are recomputed from the input itself.

Output store ``out`` (zarr, opens with ``xarray.open_zarr``):

* ``latent`` ``(sample, channel, *spatial)`` float32: x_T in model units (about
  N(0, 1)); ``channel`` holds the channel names. Feed it to ``ddim_sample`` with the
  same ``steps``/``spacing`` to regenerate, or with other parameters to edit.
* ``<channel>`` ``(sample, *spatial)``: the reconstruction, physical units.
* ``<channel>_error`` ``(sample, *spatial)``: reconstruction - input, physical units
  (NaN where the input is missing).
* ``<channel>_rmse`` ``(sample,)``: each field's RMSE, physical units.
* coordinates: ``sample`` and the spatial coordinates of the input (else of the
  training data), the parameters along ``sample`` (physical units).
* attributes: ``rmse_<channel>`` (RMSE over all fields and points, physical units),
  ``relative_error_<channel>`` (that RMSE divided by the input's standard deviation
  over all fields and points), the checkpoint path and sha256, steps, spacing,
  guidance, the resolved config (JSON) and the scidiff version.

The config is checked first (unknown key, wrong type, missing file: one line naming
it, exit status 2). The end prints one line with the errors and the store.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from scidiff.cli.compose import CONFIG_DIR, to_plain
from scidiff.cli.compose import compose_config as compose

USAGE = __doc__


@dataclasses.dataclass
class InvertConfig:
    """Top-level keys of ``configs/invert.yaml``."""

    checkpoint: str
    tracking_uri: str | None
    adapter: str | None
    control_scale: float | None
    execution: dict | None
    input: str
    sampler: dict            # a _target_ node of configs/sampler/ (DDIM, eta 0)
    refine_steps: int
    guidance: dict
    batch_size: int
    out: str
    overwrite: bool
    device: str
    progress: bool


# ------------------------------------------------------------------ config
def compose_config(argv: list[str]):
    """The composed config (Hydra compose API), errors as one-line ``ConfigError``."""
    return compose("invert", argv)


def check_config(cfg) -> dict[str, Any]:
    """Plain-python config after checking every key, type and file (``ConfigError`` names it)."""
    from scidiff.cli.config_check import check_dataclass, check_execution
    from scidiff.cli.errors import ConfigError
    from scidiff.inference.generation import DDIM, as_guidance, as_sampler

    plain = to_plain(cfg)
    for key, example in (("checkpoint", "<.ckpt file | run directory | runs:/<id> | run id | models:/<name>/<v>>"),
                         ("input", "<zarr or netCDF store of fields>")):
        if isinstance(plain.get(key), (int, float)) and not isinstance(plain[key], bool):
            plain[key] = str(plain[key])
        if plain.get(key) in (None, "???"):
            raise ConfigError(f"{key}: required ({key}={example})")
    check_dataclass(plain, InvertConfig, "")
    check_execution(plain)
    try:  # the sampler and guidance check their own values
        plain["sampler"] = as_sampler(plain["sampler"])
        plain["guidance"] = as_guidance(plain["guidance"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(plain["sampler"], DDIM) or plain["sampler"].eta != 0:
        raise ConfigError(f"sampler: scidiff-invert inverts deterministic DDIM (sampler=ddim, sampler.eta=0), got "
                          f"{plain['sampler'].describe()}")
    if plain["batch_size"] < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {plain['batch_size']}")
    if plain["refine_steps"] < 0:
        raise ConfigError(f"refine_steps: expected an integer >= 0, got {plain['refine_steps']}")
    if not Path(plain["input"]).exists() and "://" not in plain["input"]:
        raise ConfigError(f"input: {plain['input']} does not exist")
    out = Path(plain["out"])
    if out.exists() and not plain["overwrite"]:
        raise ConfigError(f"out: {out} already exists (overwrite=true to replace it)")
    if out.resolve() == Path(plain["input"]).resolve():
        raise ConfigError(f"out: {out} is the input store")
    return plain


def run(plain: dict[str, Any]) -> None:
    from scidiff.sampling.invert import invert

    print(invert(plain)["line"], flush=True)


def main(argv: list[str] | None = None) -> None:
    from scidiff.cli.runner import Command, run_command
    from scidiff.inference.checkpoint import CheckpointError
    from scidiff.inference.runtime import DeviceError
    from scidiff.sampling.invert import InputError

    run_command(Command("invert", USAGE, lambda cfg: check_config(cfg), run,
                        input_errors=(InputError, CheckpointError, DeviceError)), argv)


if __name__ == "__main__":
    main()

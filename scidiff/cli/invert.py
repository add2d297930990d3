"""``scidiff-invert``: DDIM inversion of given fields to their latent noise, and back.

    scidiff-invert checkpoint=outputs/quickstart/<run> input=fields.zarr out=latent.zarr
    scidiff-invert checkpoint=<mlflow run id> input=obs.nc steps=100 spacing=trailing

Each field x_0 of ``input`` (physical units) is normalised with the checkpoint's
statistics, mapped to the x_T that deterministic DDIM turns back into it
(:func:`scidiff.diffusion.samplers.ddim_invert`, EMA weights, ``refine_steps``
fixed-point iterations per step), and regenerated from that x_T with
:func:`~scidiff.diffusion.samplers.ddim_sample` (eta = 0, same steps and spacing).
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
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from scidiff.cli.compose import CONFIG_DIR, to_plain
from scidiff.cli.compose import compose_config as compose

USAGE = __doc__


@dataclasses.dataclass
class InvertConfig:
    """Top-level keys of ``configs/invert.yaml``."""

    checkpoint: str
    tracking_uri: str | None
    input: str
    steps: int
    spacing: Literal["leading", "trailing", "linspace"]
    refine_steps: int
    guidance: dict
    batch_size: int
    out: str
    overwrite: bool
    device: str
    progress: bool


@dataclasses.dataclass
class GuidanceConfig:
    scale: float = 1.0
    rescale: float = 0.0


class InputError(ValueError):
    """An input store that does not fit the checkpoint; the message names the file and variable."""


# ------------------------------------------------------------------ config
def compose_config(argv: list[str]):
    """The composed config (Hydra compose API), errors as one-line ``ConfigError``."""
    return compose("invert", argv)


def check_config(cfg) -> dict[str, Any]:
    """Plain-python config after checking every key, type and file (``ConfigError`` names it)."""
    from scidiff.cli.config_check import check_dataclass
    from scidiff.cli.errors import ConfigError

    plain = to_plain(cfg)
    for key, example in (("checkpoint", "<.ckpt file | run directory | runs:/<id> | run id>"),
                         ("input", "<zarr or netCDF store of fields>")):
        if isinstance(plain.get(key), (int, float)) and not isinstance(plain[key], bool):
            plain[key] = str(plain[key])
        if plain.get(key) in (None, "???"):
            raise ConfigError(f"{key}: required ({key}={example})")
    check_dataclass(plain, InvertConfig, "")
    check_dataclass(plain["guidance"], GuidanceConfig, "guidance.")
    for key in ("steps", "batch_size"):
        if plain[key] < 1:
            raise ConfigError(f"{key}: expected a positive integer, got {plain[key]}")
    if plain["refine_steps"] < 0:
        raise ConfigError(f"refine_steps: expected an integer >= 0, got {plain['refine_steps']}")
    if not 0.0 <= plain["guidance"]["rescale"] <= 1.0:
        raise ConfigError(f"guidance.rescale: expected a value in [0, 1], got {plain['guidance']['rescale']}")
    if not Path(plain["input"]).exists() and "://" not in plain["input"]:
        raise ConfigError(f"input: {plain['input']} does not exist")
    out = Path(plain["out"])
    if out.exists() and not plain["overwrite"]:
        raise ConfigError(f"out: {out} already exists (overwrite=true to replace it)")
    if out.resolve() == Path(plain["input"]).resolve():
        raise ConfigError(f"out: {out} is the input store")
    return plain


# ------------------------------------------------------------------ inputs
@dataclasses.dataclass
class Inputs:
    """Fields to invert, in physical units, with what the model is conditioned on."""

    x: Any  # torch [N, C, *S] float32, NaN = missing
    params: Any  # torch [N, P] float32 or None
    fields: Any  # torch [N, Cf, *S] float32: the condition fields in model units, or None
    sample_coord: Any  # numpy [N]
    spatial_coords: dict[str, Any]  # name -> xarray Variable on spatial dims


def read_inputs(path: str, pretrained) -> Inputs:
    """Read ``path`` for ``pretrained``'s channels, parameters and condition fields
    (through :class:`scidiff.sampling.conditions.StoreReader`, as ``scidiff-sample`` does)."""
    import numpy as np
    import torch
    import xarray as xr

    from scidiff.data.dataset import open_store
    from scidiff.sampling.conditions import ConditionError, StoreReader, condition_fields, read_condition_inputs

    meta = pretrained.metadata
    spatial = tuple(meta.spatial_dims)
    try:
        ds = open_store(path)
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"input: {exc}") from None
    try:
        missing = [c for c in meta.channel_names if c not in ds.variables]
        if missing:
            raise InputError(f"input: {path} lacks the variable(s) {missing} the model generates "
                             f"(it has {sorted(ds.data_vars)})")
        reader = StoreReader(ds, path, "input", meta, ("sample",))
        n = reader.num_samples
        x = np.concatenate([reader.field(c, what="a channel the model generates", static_ok=False)
                            for c in meta.channel_names], axis=1)
        x = torch.from_numpy(np.ascontiguousarray(x))
        params = None
        if meta.param_names:
            absent = [p for p in meta.param_names if p not in ds.variables]
            if absent:
                raise InputError(f"input: {path} lacks the parameter(s) {absent} the model is conditioned on "
                                 f"(give them as variables or coordinates along sample)")
            cols = [reader.scalars(p, what="parameter") for p in meta.param_names]
            params = torch.from_numpy(np.stack(cols, axis=1).astype(np.float32))
        fields = None
        if meta.field_names:
            variables, _ = read_condition_inputs(reader, pretrained, target=False)
            with torch.no_grad():  # coarsened channels: block means of the input itself
                fields = condition_fields(pretrained, variables, x)
        sample_coord = np.asarray(ds["sample"].values) if "sample" in ds.coords else np.arange(n)
        spatial_coords = {str(k): xr.Variable(c.dims, np.asarray(c.values), attrs=dict(c.attrs))
                          for k, c in ds.coords.items() if c.dims and set(c.dims) <= set(spatial)}
    except ConditionError as exc:
        raise InputError(str(exc)) from None
    finally:
        ds.close()
    return Inputs(x=x, params=params, fields=fields, sample_coord=sample_coord, spatial_coords=spatial_coords)


def model_inputs(pretrained, inputs: Inputs):
    """(x in model units with missing points 0, valid mask, Conditioning or None)."""
    import torch

    from scidiff.conditioning import Conditioning

    valid = torch.isfinite(inputs.x)
    y = pretrained.to_model(inputs.x)
    y = torch.where(valid, y, torch.zeros((), dtype=y.dtype))
    params = pretrained.params_to_model(inputs.params) if inputs.params is not None else None
    fields = inputs.fields
    cond = None if params is None and fields is None else Conditioning(params=params, fields=fields)
    return y, valid, cond


# --------------------------------------------------------------- inversion
def invert_and_reconstruct(pretrained, y, cond, *, steps: int, spacing: str, refine_steps: int, scale: float,
                           rescale: float, batch_size: int, device, progress: bool = False):
    """(latent x_T, reconstruction), both ``[N, C, *S]`` in model units, on the CPU."""
    import torch

    from scidiff.diffusion import samplers
    from scidiff.diffusion.guidance import ClassifierFreeGuidance

    denoiser = pretrained.denoiser.to(device)
    if cond is not None and (scale != 1.0 or rescale != 0.0):
        denoiser = ClassifierFreeGuidance(denoiser, scale=scale, rescale=rescale)
    diffusion = pretrained.diffusion
    latents, recons = [], []
    starts = range(0, y.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="scidiff-invert", unit="batch")
    for i in starts:
        x0 = y[i:i + batch_size].to(device)
        c = None if cond is None else cond.map(lambda t, i=i: t[i:i + batch_size]).to(device)
        with torch.no_grad():
            x_T = samplers.ddim_invert(denoiser, diffusion, x0, steps, spacing, c, refine_steps=refine_steps)
            back = samplers.ddim_sample(denoiser, diffusion, x_T, steps, 0.0, spacing, c)
        latents.append(x_T.cpu())
        recons.append(back.cpu())
    return torch.cat(latents), torch.cat(recons)


def reconstruction_errors(x, recon, names) -> dict[str, dict[str, float]]:
    """Per channel: ``rmse`` over all fields and valid points (physical units) and
    ``relative`` = rmse / std of the input over the same points. ``x`` (NaN = missing)
    and ``recon`` are physical ``[N, C, *S]`` arrays."""
    import numpy as np

    out = {}
    for i, name in enumerate(names):
        a = np.asarray(x[:, i], np.float64)
        b = np.asarray(recon[:, i], np.float64)
        ok = np.isfinite(a)
        rmse = float(np.sqrt(np.mean((b[ok] - a[ok]) ** 2)))
        std = float(np.std(a[ok]))
        out[name] = {"rmse": rmse, "relative": rmse / std if std > 0 else math.inf}
    return out


# ------------------------------------------------------------------- store
def write_store(out: Path, *, pretrained, inputs: Inputs, latent, recon_phys, errors, attrs: Mapping[str, Any],
                overwrite: bool) -> None:
    """Write the output store atomically (a hidden sibling renamed into place)."""
    import numpy as np
    import xarray as xr

    meta = pretrained.metadata
    spatial = tuple(meta.spatial_dims)
    n = latent.shape[0]
    x = inputs.x.numpy()
    coords: dict[str, Any] = {"sample": ("sample", inputs.sample_coord), "channel": ("channel",
                                                                                    list(meta.channel_names))}
    if inputs.spatial_coords:
        coords.update({k: v for k, v in inputs.spatial_coords.items()})
    else:
        for name, values in meta.coords.items():
            coords[name] = xr.Variable(meta.coord_dims[name], np.asarray(values),
                                       attrs=dict(meta.coord_attrs.get(name, {})))
    if inputs.params is not None:
        for j, p in enumerate(meta.param_names):
            coords[p] = xr.Variable(("sample",), inputs.params[:, j].numpy().astype(np.float64),
                                    attrs={"units": meta.param_units[j]})
    data = {"latent": xr.Variable(("sample", "channel", *spatial), latent.numpy().astype(np.float32),
                                  attrs={"units": "1", "long_name": "DDIM latent noise x_T (model units)"})}
    for i, name in enumerate(meta.channel_names):
        units = meta.units[i]
        r = recon_phys[:, i]
        err = np.where(np.isfinite(x[:, i]), r - x[:, i], np.nan).astype(np.float32)
        data[name] = xr.Variable(("sample", *spatial), r, attrs={
            "units": units, "long_name": f"reconstruction of {meta.long_names[i] or name}"})
        data[f"{name}_error"] = xr.Variable(("sample", *spatial), err, attrs={
            "units": units, "long_name": f"{name} reconstruction - input"})
        per = np.sqrt(np.nanmean(err.astype(np.float64).reshape(n, -1) ** 2, axis=1))
        data[f"{name}_rmse"] = xr.Variable(("sample",), per, attrs={
            "units": units, "long_name": f"RMSE of the {name} reconstruction per field"})
    ds = xr.Dataset(data, coords=coords, attrs=dict(attrs))
    for name, e in errors.items():
        ds.attrs[f"rmse_{name}"] = e["rmse"]
        ds.attrs[f"relative_error_{name}"] = e["relative"]
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.to_zarr(tmp, mode="w", consolidated=True, zarr_format=2)
    if out.exists():
        if not overwrite:
            shutil.rmtree(tmp)
            raise InputError(f"out: {out} appeared while inverting (overwrite=true to replace it)")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


# --------------------------------------------------------------------- run
def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def invert(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run one inversion from a checked config; returns a summary (errors, store, time)."""
    import numpy as np

    import scidiff
    from scidiff.training.pretrained import load_pretrained

    t0 = time.perf_counter()
    device = resolve_device(cfg["device"])
    pretrained = load_pretrained(cfg["checkpoint"], tracking_uri=cfg["tracking_uri"], device=device)
    inputs = read_inputs(cfg["input"], pretrained)
    y, _, cond = model_inputs(pretrained, inputs)
    g = cfg["guidance"]
    if cond is None and (g["scale"] != 1.0 or g["rescale"] != 0.0):
        print("warning: guidance is ignored: the checkpoint's model is unconditional", file=sys.stderr, flush=True)
    latent, recon = invert_and_reconstruct(
        pretrained, y, cond, steps=cfg["steps"], spacing=cfg["spacing"], refine_steps=cfg["refine_steps"],
        scale=float(g["scale"]), rescale=float(g["rescale"]), batch_size=cfg["batch_size"], device=device,
        progress=cfg["progress"])
    recon_phys = pretrained.to_physical(recon).numpy().astype(np.float32)
    names = pretrained.metadata.channel_names
    errors = reconstruction_errors(inputs.x.numpy(), recon_phys, names)
    attrs = {
        "title": "scidiff-invert: DDIM latents and reconstructions",
        "scidiff_version": scidiff.__version__,
        "input": str(Path(cfg["input"]).resolve()) if "://" not in cfg["input"] else cfg["input"],
        "checkpoint": str(pretrained.checkpoint),
        "checkpoint_sha256": pretrained.sha256,
        "checkpoint_weights": pretrained.weights,
        "steps": int(cfg["steps"]),
        "spacing": cfg["spacing"],
        "refine_steps": int(cfg["refine_steps"]),
        "guidance_scale": float(g["scale"]),
        "guidance_rescale": float(g["rescale"]),
        "latent_dims": "sample channel " + " ".join(pretrained.metadata.spatial_dims),
        "config": json.dumps(dict(cfg), sort_keys=True),
    }
    out = Path(cfg["out"])
    write_store(out, pretrained=pretrained, inputs=inputs, latent=latent, recon_phys=recon_phys, errors=errors,
                attrs=attrs, overwrite=cfg["overwrite"])
    wall = time.perf_counter() - t0
    units = dict(zip(names, pretrained.metadata.units))
    parts = [f"RMSE {n} {e['rmse']:.4g}{(' ' + units[n]) if units[n] else ''} (relative {e['relative']:.3g})"
             for n, e in errors.items()]
    line = (f"scidiff-invert: {latent.shape[0]} fields inverted with {cfg['steps']} DDIM steps ({cfg['spacing']}) "
            f"in {wall:.1f} s | {' | '.join(parts)} | latents in {out}")
    return {"line": line, "errors": errors, "out": str(out), "wall_time_s": wall}


def main(argv: list[str] | None = None) -> None:
    from scidiff.cli.errors import ConfigError, report_and_exit

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("--help", "-h") for a in argv):
        print(USAGE)
        print(f"config: {CONFIG_DIR / 'invert.yaml'}")
        return
    if any(a.startswith("--cfg") for a in argv):
        from omegaconf import OmegaConf

        try:
            print(OmegaConf.to_yaml(compose_config(argv)))
        except ConfigError as exc:
            report_and_exit(exc, status=2)
        return
    try:
        cfg = check_config(compose_config(argv))
    except ConfigError as exc:
        report_and_exit(exc, status=2)

    from scidiff.training.pretrained import CheckpointError

    try:
        summary = invert(cfg)
    except (InputError, CheckpointError) as exc:
        report_and_exit(ConfigError(str(exc)), status=2)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one line; SCIDIFF_TRACEBACK=1 shows the traceback
        if os.environ.get("SCIDIFF_TRACEBACK"):
            raise
        report_and_exit(type(exc)(f"{exc} (set SCIDIFF_TRACEBACK=1 for the traceback)"), None, status=1)
    print(summary["line"], flush=True)


if __name__ == "__main__":
    main()

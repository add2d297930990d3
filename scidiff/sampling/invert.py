"""Inversion of given fields to their latent noise x_T, and back: what ``scidiff-invert`` runs.

Each field x_0 of ``input`` (physical units) is normalised with the checkpoint's
statistics, mapped to the x_T that deterministic DDIM turns back into it
(:func:`scidiff.inference.generation.invert_model`: EMA weights, ``refine_steps``
fixed-point iterations per step), and regenerated from that x_T through the same
generation path (:func:`~scidiff.inference.generation.sample_model`, DDIM with eta 0,
the same steps and spacing). The reconstruction error measures how faithful the latent
is: a latent that regenerates its field is what editing needs (invert, change the
parameters, regenerate). The input and output stores are described in
``docs/guide/sampling.md`` and in :mod:`scidiff.cli.invert`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

import scidiff
from scidiff.conditioning import Conditioning
from scidiff.data.atomic import atomic_path
from scidiff.data.dataset import open_store
from scidiff.inference.checkpoint import load_pretrained
from scidiff.inference.generation import DDIM, GuidanceSpec, as_guidance, as_sampler, invert_model, sample_model
from scidiff.inference.runtime import resolve_device
from scidiff.sampling.conditions import (
    ConditionError,
    StoreReader,
    condition_fields,
    read_condition_inputs,
    read_embedding,
)


class InputError(ValueError):
    """An input store that does not fit the checkpoint; the message names the file and variable."""


# ------------------------------------------------------------------ inputs
@dataclass
class Inputs:
    """Fields to invert, in physical units, with what the model is conditioned on."""

    x: Any  # torch [N, C, *S] float32, NaN = missing
    params: Any  # torch [N, P] float32 or None
    fields: Any  # torch [N, Cf, *S] float32: the condition fields in model units, or None
    sample_coord: Any  # numpy [N]
    spatial_coords: dict[str, Any]  # name -> xarray Variable on spatial dims
    embedding: Any = None  # torch [N, E] float32: the embedding in model units, or None


def read_inputs(path: str, pretrained) -> Inputs:
    """Read ``path`` for ``pretrained``'s channels, parameters and condition fields
    (through :class:`scidiff.sampling.conditions.StoreReader`, as ``scidiff-sample`` does)."""
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
        for i, name in enumerate(meta.channel_names):  # NaN marks a missing point; inf is not a value
            n_inf = int(torch.isinf(x[:, i]).sum())
            if n_inf:
                raise InputError(f"input: {path} variable {name!r} holds +-inf at {n_inf} points (NaN marks a "
                                 f"missing point; inf is not a field value)")
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
        embedding = read_embedding(reader, pretrained)
        sample_coord = np.asarray(ds["sample"].values) if "sample" in ds.coords else np.arange(n)
        spatial_coords = {str(k): xr.Variable(c.dims, np.asarray(c.values), attrs=dict(c.attrs))
                          for k, c in ds.coords.items() if c.dims and set(c.dims) <= set(spatial)}
    except ConditionError as exc:
        raise InputError(str(exc)) from None
    finally:
        ds.close()
    return Inputs(x=x, params=params, fields=fields, sample_coord=sample_coord, spatial_coords=spatial_coords,
                  embedding=embedding)


def model_inputs(pretrained, inputs: Inputs):
    """(x in model units with missing points 0, valid mask of the fields, Conditioning or None).
    A latent model's model units are the latent of the fields (missing points 0 before encoding)."""
    valid = torch.isfinite(inputs.x)
    y = pretrained.x_transform(inputs.x)
    y = torch.where(valid, y, torch.zeros((), dtype=y.dtype))
    if pretrained.latent is not None:
        with torch.no_grad():
            y = pretrained.latent.encode(y.to(torch.float32))
    params = pretrained.params_to_model(inputs.params) if inputs.params is not None else None
    fields, embedding = inputs.fields, inputs.embedding
    cond = None if params is None and fields is None and embedding is None else Conditioning(
        params=params, fields=fields, embedding=embedding)
    return y, valid, cond


# --------------------------------------------------------------- inversion
def invert_and_reconstruct(pretrained, y: torch.Tensor, cond: Conditioning | None, *, sampler: DDIM,
                           guidance: GuidanceSpec, refine_steps: int, batch_size: int, device,
                           progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent x_T, reconstruction), both ``[N, C, *S]`` in model units, on the CPU."""
    pretrained.to(device)
    latents, recons = [], []
    starts = range(0, y.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="scidiff-invert", unit="batch", disable=None)  # None: not on a log file
    for i in starts:
        x0 = y[i:i + batch_size].to(device)
        c = None if cond is None else cond.map(lambda t, i=i: t[i:i + batch_size]).to(device)
        x_T = invert_model(pretrained.denoiser, pretrained.diffusion, x0, c, sampler=sampler, guidance=guidance,
                           refine_steps=refine_steps)
        back = sample_model(pretrained.denoiser, pretrained.diffusion, x_T, c, sampler=sampler, guidance=guidance)
        latents.append(x_T.cpu())
        recons.append(back.cpu())
    return torch.cat(latents), torch.cat(recons)


def reconstruction_errors(x, recon, names) -> dict[str, dict[str, float]]:
    """Per channel: ``rmse`` over all fields and valid points (physical units) and
    ``relative`` = rmse / std of the input over the same points. ``x`` (NaN = missing)
    and ``recon`` are physical ``[N, C, *S]`` arrays."""
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
    if pretrained.latent is not None:  # x_T lives on the autoencoder's latent grid, not the field's
        latent_dims = ("sample", "latent_channel", *(f"latent_{d}" for d in spatial))
        long_name = "DDIM noise x_T of the normalised autoencoder latent (model units, latent grid)"
    else:
        latent_dims, long_name = ("sample", "channel", *spatial), "DDIM latent noise x_T (model units)"
    data = {"latent": xr.Variable(latent_dims, latent.numpy().astype(np.float32),
                                  attrs={"units": "1", "long_name": long_name})}
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
    try:
        with atomic_path(out, replace=overwrite) as tmp:
            ds.to_zarr(tmp, mode="w", consolidated=True, zarr_format=2)
    except FileExistsError:
        raise InputError(f"out: {out} appeared while inverting (overwrite=true to replace it)") from None


# --------------------------------------------------------------------- run
def invert(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run one inversion from a checked config; returns a summary (errors, store, time)."""
    t0 = time.perf_counter()
    sampler, guidance = as_sampler(cfg["sampler"]), as_guidance(cfg["guidance"])
    device = resolve_device(str(cfg["device"]))
    pretrained = load_pretrained(cfg["checkpoint"], tracking_uri=cfg["tracking_uri"], device=device,
                                 adapter=cfg.get("adapter"), control_scale=cfg.get("control_scale"),
                                 execution=cfg.get("execution"))
    inputs = read_inputs(cfg["input"], pretrained)
    y, _, cond = model_inputs(pretrained, inputs)
    if cond is None and guidance.active:
        print("warning: guidance is ignored: the checkpoint's model is unconditional", file=sys.stderr, flush=True)
    latent, recon = invert_and_reconstruct(
        pretrained, y, cond, sampler=sampler, guidance=guidance, refine_steps=cfg["refine_steps"],
        batch_size=cfg["batch_size"], device=device, progress=cfg["progress"])
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
        **pretrained.model_identity,
        "steps": sampler.steps,
        "spacing": sampler.spacing,
        "refine_steps": int(cfg["refine_steps"]),
        "guidance_scale": float(guidance.scale),
        "guidance_rescale": float(guidance.rescale),
        "latent_dims": " ".join(
            ("sample", "latent_channel", *(f"latent_{d}" for d in pretrained.metadata.spatial_dims))
            if pretrained.is_latent else ("sample", "channel", *pretrained.metadata.spatial_dims)),
        "config": json.dumps({**dict(cfg), "sampler": sampler.identity(), "guidance": guidance.identity()},
                             sort_keys=True),
    }
    out = Path(cfg["out"])
    write_store(out, pretrained=pretrained, inputs=inputs, latent=latent, recon_phys=recon_phys, errors=errors,
                attrs=attrs, overwrite=cfg["overwrite"])
    wall = time.perf_counter() - t0
    units = dict(zip(names, pretrained.metadata.units))
    parts = [f"RMSE {n} {e['rmse']:.4g}{(' ' + units[n]) if units[n] else ''} (relative {e['relative']:.3g})"
             for n, e in errors.items()]
    line = (f"scidiff-invert: {latent.shape[0]} fields inverted with {sampler.steps} DDIM steps ({sampler.spacing}) "
            f"in {wall:.1f} s | {' | '.join(parts)} | latents in {out}")
    return {"line": line, "errors": errors, "out": str(out), "wall_time_s": wall}


__all__ = ["InputError", "Inputs", "invert", "invert_and_reconstruct", "model_inputs", "read_inputs",
           "reconstruction_errors", "write_store"]

"""From a sample config to an ensemble store: :func:`sample_ensemble` (what ``scidiff-sample`` runs).

Steps: pick the device and the ranks; load the checkpoint (EMA weights); read and
check the parameter sets; derive every member's seed; decide what to do with
``out`` (create it, resume it, refuse, or replace it with ``overwrite``); generate
this rank's missing members; log to MLflow (rank 0); return a summary.

Resume identity. The store's ``identity`` attribute holds what determines the
members' values: the checkpoint's hash and weights, the parameter sets (values,
not where they came from), members, seed, sampler, guidance, batch invariance,
the observations and, with condition fields, the condition input (its path and
the sha256 of the arrays read from it, so an edited file is a new run). A run
whose identity hashes the same continues the store; another refuses unless
``overwrite=true``. ``batch_size``, ``device``, ``out``, the number of ranks and the
logging options may change between runs (``micro_batch`` may not: it is part of what
determines the members).

Condition fields (``conditions``, for a checkpoint trained with ``data.fields``).
The condition input has ``Nc`` samples (its sample dims flattened; 1 when it holds
static maps only) and the store one ``sample`` per sample ``j`` below, carrying the
input's coordinates along its sample dims (``time``, ...; renamed
``condition_<name>`` when the name is taken) and ``condition_index`` (the input's
row). Parameters, for a checkpoint that also takes them:

* ``params`` not given: read from the input (a variable or coordinate along its
  sample dims, or a scalar): ``N = Nc``, sample ``j`` = input row ``j``;
* ``params.grid|list|csv`` given and the input holds none of the parameters: every
  parameter set for every input row, ``N = Nc * P``, sample ``j = i * P + p``
  (input row ``i``, parameter set ``p``; parameters vary fastest);
* both (the input holds a parameter and ``params`` gives values): ambiguous, refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import scidiff
from scidiff.inference.checkpoint import load_pretrained
from scidiff.inference.generation import (
    GuidanceSpec,
    Sampler,
    as_guidance,
    as_observation_method,
    as_sampler,
)
from scidiff.inference.runtime import DeviceError, DistContext, distributed_context, resolve_device
from scidiff.inference.seeds import member_seeds
from scidiff.sampling.ensemble import FieldConditions, run_ensemble
from scidiff.sampling.grid import ParameterError, ParameterSets, check_parameter_sets, parameter_sets
from scidiff.sampling.store import (
    EnsembleStore,
    StoreError,
    canonical_json,
    create_store,
    identity_sha256,
    is_ensemble_store,
    remove_store,
)


class SampleError(ValueError):
    """A sample config that cannot run (the message names the key)."""


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def plan_store(out: Path, identity: Mapping[str, Any], overwrite: bool) -> str:
    """What to do with ``out``: ``"create"``, ``"resume"`` or ``"replace"``; raises
    :class:`StoreError` when it holds something else and ``overwrite`` is false."""
    if not out.exists():
        return "create"
    if not is_ensemble_store(out):
        if out.is_dir() and not any(out.iterdir()):
            return "replace"
        raise StoreError(f"out: {out} exists and is not a scidiff ensemble store; refusing to write there "
                         f"(choose another out, or remove it yourself)")
    store = EnsembleStore.open(out)
    if store.identity_sha256 == identity_sha256(identity):
        return "replace" if overwrite else "resume"
    if overwrite:
        return "replace"
    diff = ", ".join(_differences(store.identity, identity))
    raise StoreError(f"out: {out} holds another run's ensemble (differs in: {diff}); "
                     f"pass overwrite=true to replace it, or choose another out")


def _identity(cfg: Mapping[str, Any], pretrained, sets, sampler: Sampler, guidance: GuidanceSpec | None,
              observations: Mapping[str, Any] | None, conditions=None) -> dict[str, Any]:
    obs = None
    if observations is not None:
        obs = {k: (str(Path(v).resolve()) if k == "path" else v) for k, v in observations.items()}
    extra = {}
    if conditions is not None:  # absent otherwise, so stores of runs without conditions keep their hash
        extra["conditions"] = {"path": conditions.path, "sha256": conditions.sha256}
    return {**extra, **pretrained.model_identity,
        "checkpoint_sha256": pretrained.sha256,
        "weights": pretrained.weights,
        "param_names": list(sets.names),
        "params": sets.values.tolist(),
        "members": int(cfg["members"]),
        "seed": int(cfg["seed"]),
        "sampler": sampler.identity(),
        "guidance": None if guidance is None else guidance.identity(),
        "batch_invariant": bool(cfg.get("batch_invariant", True)),
        **({"micro_batch": int(cfg.get("micro_batch", 16))} if cfg.get("batch_invariant", True) else {}),
        "observations": obs,
    }


def sample_ensemble(cfg: Mapping[str, Any], *, log: Callable[[str], None] = print,
                    on_batch: Callable | None = None, dist_ctx: DistContext | None = None) -> dict[str, Any]:
    """Run a sample config (the keys of ``configs/sample.yaml``, plain python); returns a summary dict.

    Raises:
        SampleError / ParameterError / StoreError / CheckpointError / ObservationError:
            one-line messages naming the key or the file.
    """
    try:
        device = resolve_device(str(cfg.get("device", "auto")))
    except DeviceError as exc:
        raise SampleError(str(exc)) from None
    ctx = dist_ctx or distributed_context(device)
    try:
        return _sample(cfg, device, ctx, log, on_batch)
    finally:
        if dist_ctx is None:
            ctx.close()


def _sample(cfg, device, ctx: DistContext, log, on_batch) -> dict[str, Any]:
    from scidiff.sampling.observations import load_observations
    from scidiff.sampling.tracking import log_sampling

    members = int(cfg["members"])
    if members < 1:
        raise SampleError(f"members: expected a positive integer, got {members}")
    batch_size = int(cfg.get("batch_size", 8))
    if batch_size < 1:
        raise SampleError(f"batch_size: expected a positive integer, got {batch_size}")
    if int(cfg.get("micro_batch", 16)) < 1:
        raise SampleError(f"micro_batch: expected a positive integer, got {cfg.get('micro_batch')}")
    if int(cfg["seed"]) < 0:
        raise SampleError(f"seed: expected a non-negative integer, got {cfg['seed']}")
    try:
        sampler = as_sampler(cfg.get("sampler") or {})
        guidance = as_guidance(cfg.get("guidance"))
    except ValueError as exc:
        raise SampleError(str(exc)) from None

    pretrained = load_pretrained(cfg["checkpoint"], tracking_uri=cfg.get("tracking_uri"), device=device,
                                 adapter=cfg.get("adapter"), control_scale=cfg.get("control_scale"),
                                 execution=cfg.get("execution"))
    try:
        sampler.check(pretrained.diffusion)
    except ValueError as exc:
        raise SampleError(str(exc)) from None
    conditions = _load_conditions(cfg.get("conditions"), pretrained)
    requested = parameter_sets(cfg.get("params"))
    fields = None
    if conditions is None:
        sets = check_parameter_sets(requested, pretrained.param_names, pretrained.param_ranges())
    else:
        sets, index = combine_conditions(conditions, requested, pretrained)
        fields = FieldConditions(conditions.fields, index, embedding=conditions.embedding)
    conditional = len(pretrained.param_names) > 0 or conditions is not None
    if not conditional and (guidance.scale != 1.0 or guidance.rescale != 0.0):
        raise SampleError("guidance.scale: the checkpoint is unconditional; guidance needs a conditional model "
                          "(leave guidance.scale=1.0, guidance.rescale=0.0)")
    dropout = float((pretrained.config.get("module") or {}).get("cond_dropout") or 0.0)
    if conditional and guidance.scale != 1.0 and dropout == 0.0:
        import warnings

        warnings.warn(f"guidance.scale={guidance.scale}: the checkpoint was trained without condition dropout "
                      f"(module.cond_dropout=0), so its null condition is untrained and guidance mixes in "
                      f"an untrained prediction", stacklevel=2)

    obs_cfg = cfg.get("observations")
    observations = None
    if obs_cfg is not None:
        obs_cfg = dict(obs_cfg)
        try:
            method = as_observation_method({k: v for k, v in obs_cfg.items() if k not in ("path", "mask")})
        except ValueError as exc:
            raise SampleError(str(exc)) from None
        observations = load_observations(obs_cfg["path"], pretrained, len(sets), method=method,
                                         mask=obs_cfg.get("mask", "mask"))

    seeds = member_seeds(int(cfg["seed"]), len(sets), members)
    identity = _identity(cfg, pretrained, sets, sampler, guidance if conditional else None, obs_cfg, conditions)
    out = Path(str(cfg["out"])).expanduser()
    action = plan_store(out, identity, bool(cfg.get("overwrite", False)))  # every rank checks, read-only
    if ctx.rank == 0:
        if action == "replace":
            remove_store(out)
        if action in ("create", "replace"):
            attrs = {
                "title": "scidiff ensemble",
                "identity": identity,
                "sample_config": canonical_json(_json_config(cfg, pretrained)),
                "checkpoint": str(pretrained.checkpoint),
                "checkpoint_sha256": pretrained.sha256,
                **pretrained.model_identity,
                "checkpoint_global_step": pretrained.global_step,
                "weights": pretrained.weights,
                "scidiff_version": scidiff.__version__,
                "training_mlflow_run_id": pretrained.mlflow_run_id or "",
            }
            create_store(out, metadata=pretrained.metadata, sets=sets, seeds=seeds, attrs=attrs,
                         sample_coords=None if fields is None else _sample_coords(conditions, fields.index,
                                                                                  pretrained, sets))
    ctx.barrier()
    store = EnsembleStore.open(out)

    result = run_ensemble(
        pretrained, store, sets, seeds, sampler=sampler, guidance=guidance, observations=observations,
        fields=fields, batch_size=batch_size, batch_invariant=bool(cfg.get("batch_invariant", True)),
        micro_batch=int(cfg.get("micro_batch", 16)), device=device,
        dist_ctx=ctx, progress=bool(cfg.get("progress", True)), on_batch=on_batch,
    )
    summary: dict[str, Any] = {
        "out": str(out.resolve()),
        "action": action,
        "num_samples": len(sets),
        "members": members,
        "written": result.written,
        "skipped": result.skipped,
        "seconds": round(result.seconds, 3),
        "members_per_s": result.members_per_s,
        "world_size": result.world_size,
        "device": str(device),
        "identity_sha256": store.identity_sha256,
    }
    if ctx.rank == 0:
        ml = dict(cfg.get("mlflow") or {})
        note = None
        try:
            note = log_sampling(
                mode=ml.get("run", "auto"),
                tracking_uri=pretrained.tracking_uri(ml.get("tracking_uri") or cfg.get("tracking_uri")),
                experiment_name=ml.get("experiment_name", "scidiff-sample"),
                training_run_id=pretrained.mlflow_run_id,
                identity_sha256=store.identity_sha256,
                store_path=summary["out"],
                config=_json_config(cfg, pretrained),
                metrics={"members_per_s": result.members_per_s if result.written else 0.0,
                         "members_written": result.written, "members_skipped": result.skipped,
                         "seconds": result.seconds},
            )
        except Exception as exc:  # MLflow trouble must not lose a finished ensemble
            note = f"MLflow logging failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        summary["mlflow"] = note
        rate = f"{result.members_per_s:.2f} members/s" if result.written else "nothing to generate"
        what = (f"{len(sets)} parameter sets" if conditions is None else
                 f"{len(sets)} samples ({len(conditions)} condition inputs x {len(sets) // len(conditions)} "
                 f"parameter sets)")
        line = (f"scidiff-sample: {summary['out']} | {what} x {members} members | "
                f"written {result.written}, skipped {result.skipped} | {rate} "
                f"({result.world_size} rank{'s' if result.world_size > 1 else ''}, {device}"
                f"{'' if pretrained.execution.is_default else ', ' + pretrained.execution.describe()})")
        if note:
            line += f" | {note}"
        log(line)
    return summary


def _needed_variables(pretrained) -> list[str]:
    """The store variables a field- or embedding-conditioned checkpoint needs as conditions."""
    from scidiff.sampling.conditions import coarsen_factors, embedding_variable

    meta = pretrained.metadata
    names = [c.name for c in pretrained.statistics.fields]
    if any(coarsen_factors(n) for n in meta.field_names):
        names += [v for v in dict.fromkeys(meta.channel_variables)]
    vector = embedding_variable(pretrained)
    if vector is not None:
        names.append(f"{vector} (the embedding, {meta.embedding_dim} components)")
    return names


def _load_conditions(spec: Mapping[str, Any] | None, pretrained):
    """The ``conditions`` node read for ``pretrained`` (``None`` when neither needs them)."""
    from scidiff.sampling.conditions import load_conditions

    meta = pretrained.metadata
    fields = list(meta.field_names)
    if spec is not None and spec.get("embedding") is not None and not meta.embedding_names:
        raise SampleError(f"conditions.embedding: the checkpoint {pretrained.checkpoint} takes no embedding "
                          f"(its conditions: {[*meta.param_names, *fields] or 'none'}); leave conditions.embedding=null")
    if spec is not None and all(v is None for v in dict(spec).values()):
        spec = None  # the config's default {path: null, isel: null, embedding: null}
    if spec is None:
        if fields or meta.embedding_names:
            what = (f"the fields {fields}" if fields else "") + (" and " if fields and meta.embedding_names else "") + (
                f"an embedding of {meta.embedding_dim} components" if meta.embedding_names else "")
            raise SampleError(f"conditions.path: the checkpoint {pretrained.checkpoint} is conditioned on {what}; "
                              f"give conditions.path=<zarr or netCDF store with the variables "
                              f"{_needed_variables(pretrained)} in physical units>")
        return None
    spec = dict(spec)
    if spec.get("path") in (None, "???"):
        raise SampleError("conditions.path: required (a zarr or netCDF store of the condition fields or embedding)")
    return load_conditions(str(spec["path"]), pretrained, isel=spec.get("isel"), embedding=spec.get("embedding"))


def combine_conditions(conditions, requested: ParameterSets | None, pretrained) -> tuple[ParameterSets, np.ndarray]:
    """The ``N`` samples of a run with condition fields: ``(parameter sets [N], input row [N])``
    by the rule of the module docstring."""
    names = tuple(pretrained.param_names)
    nc = len(conditions)
    from_input = [p for p in names if p in conditions.params]
    if not names:
        check_parameter_sets(requested, names, {})  # raises when params name any parameter
        return ParameterSets(names=(), values=np.zeros((nc, 0))), np.arange(nc)
    if requested is not None and from_input:
        raise ParameterError(f"params: {from_input} are given both by params and as variables of "
                             f"conditions.path {conditions.path}; remove one (from the input: one set per input "
                             f"sample; from params: every set for every input sample)")
    if requested is None:
        missing = [p for p in names if p not in conditions.params]
        if missing:
            raise ParameterError(f"params: the checkpoint is conditioned on {list(names)}; conditions.path "
                                 f"{conditions.path} lacks {missing} (give all of them there, or none there and "
                                 f"all in params.grid, params.list or params.csv)")
        values = np.stack([np.asarray(conditions.params[p], np.float64) for p in names], axis=1)
        sets = check_parameter_sets(ParameterSets(names=names, values=values), names, pretrained.param_ranges(),
                                    key="conditions.path")
        return sets, np.arange(nc)
    sets = check_parameter_sets(requested, names, pretrained.param_ranges())
    p = len(sets)
    return (ParameterSets(names=names, values=np.tile(sets.values, (nc, 1))),
            np.repeat(np.arange(nc), p))


def _sample_coords(conditions, index: np.ndarray, pretrained, sets: ParameterSets) -> dict[str, Any]:
    """The condition input's sample coordinates along the store's ``sample``, and ``condition_index``."""
    from scidiff.sampling.store import RESERVED

    meta = pretrained.metadata
    taken = {*RESERVED, *sets.names, *meta.coords, *meta.channel_names, "condition_index"}
    out: dict[str, Any] = {"condition_index": (index, {"long_name": f"sample (flattened "
                                                       f"{', '.join(conditions.sample_dims) or 'none'}) of the "
                                                       f"condition input {conditions.path}"})}
    for name, (values, attrs) in conditions.coords.items():
        key = f"condition_{name}" if name in taken else name
        out[key] = (np.asarray(values)[index], dict(attrs))
    return out


def _json_config(cfg: Mapping[str, Any], pretrained) -> dict[str, Any]:
    out = {k: v for k, v in cfg.items() if not isinstance(v, (Sampler, GuidanceSpec))}
    for key in ("sampler", "guidance"):
        if isinstance(cfg.get(key), (Sampler, GuidanceSpec)):
            out[key] = cfg[key].identity()
    out["checkpoint_resolved"] = str(pretrained.checkpoint)
    return out


__all__ = ["ParameterError", "SampleError", "StoreError", "plan_store", "sample_ensemble"]

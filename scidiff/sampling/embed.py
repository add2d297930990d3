"""``scidiff-embed``: a contrastive encoder's embeddings of a store's samples, written into a copy
of the store, for conditioning a diffusion model on them (``data.embedding``).

The encoder (``scidiff-train stage=contrastive``) reads the input store as its own training
data config did (its variables, parameters, embedding, sample dims; the store given by
``input``), and encodes every sample: ``of=fields`` its field (as unCLIP conditions a decoder
on an image's CLIP embedding: generate fields like a given one), ``of=conditions`` its
condition. The output store holds every variable of the input and the embedding
``<name>(*sample dims, <name>_component)``, with the encoder's path and sha256 in its
attributes. It is written to a temporary sibling and renamed when complete, and an existing
``out`` is refused unless ``overwrite=true``. Storing the vectors, rather than computing them
inside the diffusion run, keeps what the model was trained on in the data: sampling reads the
same vectors from a condition store, and a retrained encoder cannot silently change them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scidiff.data.atomic import atomic_path
from scidiff.data.dataset import open_store
from scidiff.inference.checkpoint import load_contrastive
from scidiff.inference.runtime import resolve_device


class EmbedError(ValueError):
    """An input that does not fit the encoder; the message names the key and the file."""


def embed_store(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run one ``scidiff-embed`` config (``configs/embed.yaml``, checked); returns a summary."""
    import hydra.utils as hu

    t0 = time.perf_counter()
    device = resolve_device(str(cfg["device"]))
    encoder = load_contrastive(cfg["encoder"], tracking_uri=cfg.get("tracking_uri"), device=device, key="encoder")
    data = {k: v for k, v in dict(encoder.config["data"]).items() if k not in ("split", "statistics_path")}
    try:
        dm = hu.instantiate(data, path=str(cfg["input"]), num_workers=0, statistics_path=None)
    except Exception as exc:  # noqa: BLE001 - hydra wraps the data module's ValueError naming the variable
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise EmbedError(f"input: {cfg['input']} does not hold what the encoder reads ({cause})") from None
    ds = dm._base
    n = int(np.prod(ds.sample_shape))
    of, batch = str(cfg["of"]), int(cfg["batch_size"])
    out_rows = []
    for start in range(0, n, batch):
        phys = ds.read_physical(np.arange(start, min(n, start + batch)))
        if of == "fields":
            z = encoder.embed_fields(torch.from_numpy(np.asarray(phys.x, np.float64)))
        else:
            z = encoder.embed_conditions(None if phys.params is None else torch.from_numpy(phys.params),
                                         None if phys.embedding is None else torch.from_numpy(phys.embedding))
        out_rows.append(z.numpy().astype(np.float32))
    values = np.concatenate(out_rows).reshape(*ds.sample_shape, -1)
    name = str(cfg["name"])
    source = open_store(str(cfg["input"]))
    try:
        if name in source.variables:
            raise EmbedError(f"name: the input {cfg['input']} already has a variable {name!r}; choose another name")
        out_ds = source.copy()
        out_ds[name] = ((*ds.sample_dims, f"{name}_component"), values, {
            "units": "1", "long_name": f"contrastive embedding of the sample's {of} (unit vector)",
            "encoder": str(encoder.checkpoint), "encoder_sha256": encoder.sha256, "embedded": of})
        for v in out_ds.variables.values():
            v.encoding = {}
        out = Path(str(cfg["out"]))
        try:
            with atomic_path(out, replace=bool(cfg["overwrite"])) as tmp:
                out_ds.to_zarr(tmp, mode="w", consolidated=True, zarr_format=2)
        except FileExistsError:
            raise EmbedError(f"out: {out} appeared while embedding (overwrite=true to replace it)") from None
    finally:
        source.close()
    seconds = time.perf_counter() - t0
    line = (f"scidiff-embed: {n} samples' {of} embedded ({values.shape[-1]} components) in {seconds:.1f} s with "
            f"{encoder.checkpoint} | {out} holds the input's variables and {name}; condition a model on it with "
            f"'data.embedding={{name: {name}, transform: none}}'")
    return {"out": str(out), "samples": n, "dim": int(values.shape[-1]), "seconds": seconds, "line": line}


__all__ = ["EmbedError", "embed_store"]

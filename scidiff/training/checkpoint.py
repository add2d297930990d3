"""Atomic, code-free checkpoints and finding the newest one in a run directory.

Writes go to a hidden temporary file in the same directory
(:func:`scidiff.data.atomic.atomic_path`), are flushed to disk and then renamed over
the target with ``os.replace`` (atomic on POSIX), so a process killed while saving
leaves the previous checkpoint intact; the file gets the umask's permissions. Reads use
``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain python
containers only, never objects whose unpickling would run code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from scidiff.data.atomic import atomic_path
from scidiff.inference.checkpoint import CheckpointError, safe_torch_load

CHECKPOINT_SUFFIX = ".ckpt"
ADAPTER_FILE = "adapter.safetensors"


def save_adapter(path: str | os.PathLike, model: torch.nn.Module, finetune: dict[str, Any], weights: str) -> Path:
    """Write a LoRA fine-tuning's adapter (:func:`scidiff.nets.adapters.adapter_state` of ``model``)
    as safetensors, atomically, with the base checkpoint's sha256 and the LoRA settings in its
    metadata (what :func:`scidiff.inference.checkpoint.read_adapter` checks)."""
    import json

    from safetensors.torch import save_file

    from scidiff.nets.adapters import LoraSpec, adapter_state

    spec = LoraSpec(**finetune["lora"])
    meta = {"base_sha256": finetune["base"]["sha256"], "base_checkpoint": finetune["base"]["checkpoint"],
            "lora": json.dumps(spec.to_dict()), "weights": weights, "format": "scidiff-lora-adapter"}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(adapter_state(model, spec), str(tmp), metadata=meta)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO with atomic writes and ``weights_only`` reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("scidiff checkpoints are loaded with weights_only=True only")
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return safe_torch_load(path, map_location=map_location or "cpu")


def read_resumable(path: str | os.PathLike, key: str = "resume") -> dict[str, Any]:
    """A training checkpoint that training can continue from, read (memory-mapped) and checked.

    Raises:
        CheckpointError: naming ``key`` and the file: missing, unreadable (truncated,
            zeroed, not a torch file, or holding objects other than tensors and plain
            containers) or not a full training state (weights only, or not Lightning's).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{key}: checkpoint file {path} does not exist (use resume=auto or a .ckpt path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - zip, pickle and weights_only errors: the first line says which
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise CheckpointError(f"{key}: {path} is not a readable checkpoint: truncated, or not one written by "
                              f"scidiff-train ({first[:100]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{key}: {path} is not a Lightning checkpoint (no state_dict)")
    missing = [k for k in ("loops", "optimizer_states") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{key}: {path} holds weights only (no {', '.join(missing)}): training cannot "
                              "continue from it; give it as checkpoint= to scidiff-sample or start a new run")
    return ckpt


def newest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The most recently written ``*.ckpt`` under ``directory`` (hidden files, such as
    the temporaries of an interrupted write, are ignored), or ``None``."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    files = [p for p in directory.rglob(f"*{CHECKPOINT_SUFFIX}") if not p.name.startswith(".")]
    if not files:
        return None
    return max(files, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"))

"""Atomic, code-free checkpoints and finding the newest one in a run directory.

Writes go to a temporary file in the same directory, are flushed to disk and then
renamed over the target with ``os.replace`` (atomic on POSIX), so a process killed
while saving leaves the previous checkpoint intact. Reads use
``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain python
containers only, never objects whose unpickling would run code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

CHECKPOINT_SUFFIX = ".ckpt"
_TMP_PREFIX = ".tmp-"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs from the file)."""
    return torch.load(path, map_location=map_location, weights_only=True)


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


def newest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The most recently written ``*.ckpt`` under ``directory`` (temporary files
    of an interrupted write are ignored), or ``None``."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    files = [p for p in directory.rglob(f"*{CHECKPOINT_SUFFIX}") if not p.name.startswith(_TMP_PREFIX)]
    if not files:
        return None
    return max(files, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"))

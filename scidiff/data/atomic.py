"""Atomic writes of files and directories: a reader sees the old version or the new one,
never a half-written one.

:func:`atomic_path` yields a hidden temporary sibling of the target
(``.<name>.partial-<pid>-<random>``, on the same file system, so the final rename is
atomic on POSIX); the caller writes a file or a directory (a zarr store, ...) there,
and on success it is renamed over the target with ``os.replace``. On an exception the
temporary is removed and the target is left as it was. A crash (``SIGKILL``, power
loss) can leave a temporary behind, never a partial target; the temporaries are
hidden and their names never end like the target's, so globbing ``*.ckpt`` or
``*.zarr`` skips them.

The caller creates the temporary with ordinary calls (``open``, ``mkdir``,
``to_zarr``), so files get the permissions of any new file, 0666 & ~umask (and
directories 0777 & ~umask), unlike ``tempfile.mkstemp``'s 0600, which would outlive
the rename.

An existing *directory* target (or a directory replacing a file, or a file replacing
a directory) is replaced only with ``replace=True``: the old one is first renamed
aside, the new one renamed into place, then the old one deleted. Between the two
renames the target is briefly missing; it is never partial. A plain file over a
plain file is always replaced in one ``os.replace``.

.. code-block:: python

    with atomic_path("run/statistics.json") as tmp:
        tmp.write_text(text)
    with atomic_path("ensemble.zarr", replace=overwrite) as tmp:
        dataset.to_zarr(tmp)
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "temporary_sibling"]


def temporary_sibling(target: str | os.PathLike, kind: str = "partial") -> Path:
    """A fresh hidden name beside ``target``: ``.<name>.<kind>-<pid>-<random>`` (nothing is created)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove(path: Path) -> None:
    """Delete a file, a link or a directory tree; nothing if it does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path of ``target`` to write a file or a directory to;
    rename it over ``target`` on success, remove it on an exception (and re-raise).

    Args:
        target: the final path. Its parent directory is created if missing.
        replace: allow replacing an existing directory (or a file by a directory, or a
            directory by a file); the old one is deleted. A file always replaces a file.

    Raises:
        FileExistsError: ``target`` exists as a directory (or the new one is a
            directory and ``target`` exists) and ``replace`` is false; the new content
            is discarded and ``target`` is untouched.
        FileNotFoundError: the block wrote nothing to the temporary path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    try:
        yield tmp
        if not tmp.exists() and not tmp.is_symlink():
            raise FileNotFoundError(f"atomic write of {target}: nothing was written to {tmp}")
        _install(tmp, target, replace)
    except BaseException:
        _remove(tmp)
        raise


def _install(tmp: Path, target: Path, replace: bool) -> None:
    """Rename ``tmp`` over ``target`` (see :func:`atomic_path` for when that is allowed)."""
    plain = not tmp.is_dir() and not target.is_dir()
    if plain or not (target.exists() or target.is_symlink()):
        os.replace(tmp, target)
        return
    if not replace:
        raise FileExistsError(f"{target} already exists (pass replace=True to replace it)")
    old = temporary_sibling(target, "old")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the previous version back
        raise
    _remove(old)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically (flushed to disk before the rename); returns the path."""
    target = Path(target)
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return target


def atomic_write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``target`` atomically; returns the path."""
    return atomic_write_bytes(target, text.encode(encoding))

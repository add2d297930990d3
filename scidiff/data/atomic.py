"""Atomic writes of files and directories: a reader sees the old version or the new one,
never a half-written one.

:func:`atomic_path` yields a hidden temporary sibling of the target
(``.<name>.partial-<host>-<pid>-<random>``, on the same file system, so the final
rename is atomic on POSIX); the caller writes a file or a directory (a zarr store,
...) there, and on success it is renamed over the target with ``os.replace``. On an
exception the temporary is removed and the target is left as it was. A crash
(``SIGKILL``, power loss) can leave a temporary behind, never a partial target; the
temporaries are hidden and their names never end like the target's, so globbing
``*.ckpt`` or ``*.zarr`` skips them.

Leftovers of a crash are removed by the next :func:`atomic_path` in the same
directory (:func:`remove_stale_temporaries`): it deletes the temporaries there --
of any target, since checkpoints get a new name at every step -- whose writer is
dead: written on *this* host (``<host>``: the host name and the pid namespace, so
other machines sharing the file system, or containers with their own process ids,
are never judged by this host's process table) by a process id that no longer runs
(``os.kill(pid, 0)`` raises ``ProcessLookupError``). A live writer's temporary is
never touched (a reused pid only keeps a leftover longer). The old version a
replacement set aside (``.<name>.old-...``) is deleted only once ``<name>`` exists
again (a kill between the two renames leaves it the only copy). Temporaries of other
hosts, and those named before the host was part of the name
(``.<name>.partial-<pid>-<random>``), are left alone.

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
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "host_token", "remove_stale_temporaries",
           "temporary_sibling"]


KINDS = ("partial", "old")


def host_token() -> str:
    """This host, as temporaries name it: the host name (characters other than letters,
    digits, ``.``, ``_`` and ``-`` replaced by ``_``) and, where readable, the inode of the
    pid namespace (``node-07+4026531836``), so two containers of one host with their own
    process ids tell their temporaries apart."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname() or "localhost")
    try:
        return f"{name}+{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return name


def temporary_sibling(target: str | os.PathLike, kind: str = "partial") -> Path:
    """A fresh hidden name beside ``target``: ``.<name>.<kind>-<host>-<pid>-<random>``
    (:func:`host_token`; nothing is created)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{kind}-{host_token()}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove(path: Path) -> None:
    """Delete a file, a link or a directory tree; nothing if it does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0: nothing is sent)."""
    if pid <= 0:
        return True  # not a process id (0 and negatives address process groups): never judged dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OSError, OverflowError):  # not a valid pid here: leave it be
        return True
    return True


_TEMPORARY = re.compile(rf"\.(?P<name>.+)\.(?P<kind>{'|'.join(KINDS)})-(?P<host>.+)-(?P<pid>[0-9]+)-[0-9a-f]{{8}}")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporaries in ``directory`` that dead writers of this host left (the
    module docstring); returns what was deleted. Errors (a file another process removed
    first, no permission) are ignored: a leftover is only ever left longer."""
    directory = Path(directory)
    host = host_token()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        found = _TEMPORARY.fullmatch(entry.name)
        if found is None or found["host"] != host or _running(int(found["pid"])):
            continue
        target = directory / found["name"]
        if found["kind"] == "old" and not (target.exists() or target.is_symlink()):
            continue  # between the two renames of a replacement: the only copy of the previous version
        path = Path(entry.path)
        try:
            _remove(path)
        except OSError:
            continue
        removed.append(path)
    return removed


@contextmanager
def atomic_path(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path of ``target`` to write a file or a directory to;
    rename it over ``target`` on success, remove it on an exception (and re-raise).
    First, the temporaries that dead processes of this host left beside ``target`` are
    deleted (:func:`remove_stale_temporaries`).

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
    remove_stale_temporaries(target.parent)
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

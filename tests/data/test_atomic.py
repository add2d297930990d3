"""Atomic writes: the target holds the old version or the new one, never a partial one."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from scidiff.data.atomic import atomic_path, atomic_write_bytes, atomic_write_text, host_token


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_a_file_is_written_through_a_hidden_sibling(tmp_path):
    target = tmp_path / "sub" / "stats.json"  # the parent is created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp.name.startswith(f".{target.name}.partial-{host_token()}-{os.getpid()}-")
        assert not tmp.exists() and not target.exists()
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert _names(target.parent) == ["stats.json"]


def test_each_write_gets_its_own_temporary(tmp_path):
    with atomic_path(tmp_path / "a") as one, atomic_path(tmp_path / "a") as two:
        assert one != two
        one.write_text("1")
        two.write_text("2")
    assert (tmp_path / "a").read_text() == "1"  # the last one renamed wins (inner exits first)
    assert _names(tmp_path) == ["a"]


def test_a_file_replaces_a_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert atomic_write_bytes(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    assert _names(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("as_dir", [False, True])
def test_an_exception_leaves_the_target_and_no_temporary(tmp_path, as_dir):
    target = tmp_path / "t"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target, replace=True) as tmp:
            if as_dir:
                (tmp / "inner").mkdir(parents=True)
                (tmp / "inner" / "chunk").write_bytes(b"x")
            else:
                tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["t"]


def test_keyboard_interrupt_also_cleans_up(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "t") as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert _names(tmp_path) == []


def test_writing_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "t"):
            pass
    assert _names(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_file_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f", "x")
        with atomic_path(tmp_path / "g") as tmp:
            tmp.write_text("x")
        with atomic_path(tmp_path / "d") as tmp:
            tmp.mkdir()
    finally:
        os.umask(old)
    for name in ("f", "g"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask


def test_a_directory_is_renamed_into_place(tmp_path, umask_022):
    target = tmp_path / "store.zarr"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "data").write_text("v1")
    assert (target / "data").read_text() == "v1"
    assert _names(tmp_path) == ["store.zarr"]


def test_an_existing_directory_is_replaced_only_when_asked(tmp_path):
    target = tmp_path / "store.zarr"
    target.mkdir()
    (target / "data").write_text("v1")
    (target / "stale").write_text("from v1 only")
    with pytest.raises(FileExistsError, match="replace=True"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "data").write_text("v2")
    assert _names(target) == ["data", "stale"] and (target / "data").read_text() == "v1"
    assert _names(tmp_path) == ["store.zarr"]

    with atomic_path(target, replace=True) as tmp:
        tmp.mkdir()
        (tmp / "data").write_text("v2")
    assert _names(target) == ["data"] and (target / "data").read_text() == "v2"  # the old one is gone
    assert _names(tmp_path) == ["store.zarr"]


@pytest.mark.parametrize("old_is_dir", [False, True])
def test_a_file_and_a_directory_replace_each_other_only_when_asked(tmp_path, old_is_dir):
    target = tmp_path / "out"
    if old_is_dir:
        target.mkdir()
        (target / "x").write_text("old")
    else:
        target.write_text("old")

    def write_new(tmp):
        if old_is_dir:
            tmp.write_text("new file")
        else:
            tmp.mkdir()
            (tmp / "x").write_text("new dir")

    with pytest.raises(FileExistsError):
        with atomic_path(target) as tmp:
            write_new(tmp)
    assert target.is_dir() == old_is_dir
    with atomic_path(target, replace=True) as tmp:
        write_new(tmp)
    assert target.is_dir() != old_is_dir
    assert _names(tmp_path) == ["out"]


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_writers_of_this_host_are_removed(tmp_path):
    """The next atomic write in the directory removes what killed writers of this host left
    (of any target: checkpoints are named by step), never a live writer's or another host's."""
    target = tmp_path / "store.zarr"
    host, dead = host_token(), _dead_pid()
    stale_dir = tmp_path / f".store.zarr.partial-{host}-{dead}-0123abcd"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "chunk").write_bytes(b"x")
    stale_file = tmp_path / f".store.zarr.partial-{host}-{dead}-89abcdef"
    stale_file.write_text("half")
    stale_ckpt = tmp_path / f".step0000500.ckpt.partial-{host}-{dead}-0123abcd"  # another target's
    stale_ckpt.write_bytes(b"\x00" * 10)
    live = tmp_path / f".store.zarr.partial-{host}-{os.getpid()}-00000000"  # a writer that still runs
    live.mkdir()
    keep = [
        live,
        tmp_path / f".store.zarr.partial-otherhost+1-{dead}-0123abcd",  # another host on a shared file system
        tmp_path / f".store.zarr.partial-{dead}-0123abcd",  # named before the host was part of the name
        tmp_path / f".other.zarr.partial-{host}-{os.getppid()}-0123abcd",  # another target's live writer
        tmp_path / f".store.zarr.old-{host}-{dead}-0123abcd",  # the previous version while the target is missing
        tmp_path / "notes.txt",
    ]
    for path in keep[1:]:
        path.write_text("keep")
    with atomic_path(target) as tmp:
        assert not any(p.exists() for p in (stale_dir, stale_file, stale_ckpt))  # gone before the write starts
        tmp.mkdir()
    assert all(path.exists() for path in keep)
    assert target.is_dir()
    # once the target exists again, a dead writer's set-aside old version is a leftover too
    with atomic_path(tmp_path / "store.zarr", replace=True) as tmp:
        tmp.mkdir()
    assert not keep[4].exists() and all(path.exists() for path in keep[:4])


def test_checkpoint_globbing_skips_the_temporaries(tmp_path):
    from scidiff.training import newest_checkpoint

    with atomic_path(tmp_path / "last.ckpt") as tmp:
        tmp.write_bytes(b"half")  # as a kill -9 would leave it (here: still open)
        assert tmp.name.startswith(".last.ckpt.partial-") and not tmp.name.endswith(".ckpt")
        assert list(tmp_path.glob("*.ckpt")) == [] and newest_checkpoint(tmp_path) is None

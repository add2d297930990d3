"""Atomic writes: the target holds the old version or the new one, never a partial one."""

from __future__ import annotations

import os
import stat

import pytest

from scidiff.data.atomic import atomic_path, atomic_write_bytes, atomic_write_text


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
        assert tmp.name.startswith(f".{target.name}.partial-{os.getpid()}-")
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

"""The command line: determinism, atomic writes, and errors that name the argument or path."""

import hashlib
from pathlib import Path

import pytest
import xarray as xr

from scidiff_datasets import _store, cli

from .conftest import GENERATOR_ARGS, run_cli


def digest(store: Path) -> dict[str, str]:
    """sha256 of every file of a store, by relative path."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["grf", "climate", "voxels"])
def test_same_seed_same_bytes_other_seed_other_data(tiny_store, tmp_path, name):
    again = tmp_path / "again.zarr"
    assert cli.main([name, "--out", str(again), "--size", "tiny", "--seed", "3", "-q", *GENERATOR_ARGS[name]]) == 0
    first = digest(tiny_store(name))
    assert len(first) > 5 and first == digest(again)
    other = tmp_path / "other.zarr"
    cli.main([name, "--out", str(other), "--size", "tiny", "--seed", "4", "-q", *GENERATOR_ARGS[name]])
    field = xr.open_zarr(again).attrs["fields"].split()[0]
    assert not xr.open_zarr(again)[field].equals(xr.open_zarr(other)[field])


def test_unknown_generator_is_named():
    proc = run_cli("galaxies", "--out", "x.zarr", "--size", "tiny", check=False)
    assert proc.returncode == 2
    assert "argument generator: invalid choice: 'galaxies'" in proc.stderr


def test_bad_size_is_named(tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["grf", "--out", str(tmp_path / "g.zarr"), "--size", "huge"])
    assert exc.value.code == 2
    assert not (tmp_path / "g.zarr").exists()


def test_bad_size_message(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["climate", "--out", str(tmp_path / "c.zarr"), "--size", "huge"])
    assert "argument --size: invalid choice: 'huge'" in capsys.readouterr().err


def test_existing_store_is_refused_then_overwritten(tmp_path, capsys):
    out = tmp_path / "g.zarr"
    cli.main(["grf", "--out", str(out), "--size", "tiny", "--num-samples", "2", "-q"])
    before = digest(out)
    with pytest.raises(SystemExit) as exc:
        cli.main(["grf", "--out", str(out), "--size", "tiny", "--num-samples", "3", "-q"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --out: {out} already exists" in err and "--overwrite" in err
    assert digest(out) == before
    cli.main(["grf", "--out", str(out), "--size", "tiny", "--num-samples", "3", "--overwrite", "-q"])
    assert xr.open_zarr(out).sizes["sample"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.zarr"]  # no partial or old siblings left


@pytest.mark.parametrize("argv,message", [
    (["grf", "--dims", "3", "--shape", "8", "8"], "argument --shape: expected 3 values for --dims 3, got 2"),
    (["grf", "--amplitude", "-1", "2"], "amplitude range"),
    (["voxels", "--spacing", "1.0"], "spacing must be in [0.25, 0.5]"),
    (["voxels", "--smiles", "/nonexistent/list.smi"], "/nonexistent/list.smi"),
    (["climate", "--grid", "2", "8"], "grid must be at least 4 x 4"),
    (["climate", "--diffusivity", "0.8", "0.2"], "diffusivity range"),
])
def test_bad_generator_options_are_named(tmp_path, capsys, argv, message):
    out = tmp_path / "bad.zarr"
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv[:1], "--out", str(out), "--size", "tiny", *argv[1:]])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_run_leaves_no_store(tmp_path, monkeypatch):
    """A generator that dies half-way leaves neither the final store nor its temporary sibling."""
    out = tmp_path / "g.zarr"
    real = _store.write_store

    def dying(out_path, spec, *, overwrite):
        def blocks():
            for i, block in enumerate(spec.blocks):
                if i == 1:
                    raise RuntimeError("killed")
                yield block
        return real(out_path, _store.StoreSpec(spec.template, blocks()), overwrite=overwrite)

    monkeypatch.setattr(_store, "write_store", dying)
    with pytest.raises(RuntimeError, match="killed"):
        cli.main(["grf", "--out", str(out), "--size", "tiny", "--shape", "256", "256", "--num-samples", "40", "-q"])
    assert list(tmp_path.iterdir()) == []


def test_store_is_written_under_a_temporary_name(tmp_path, monkeypatch):
    """While blocks are written, the final path does not exist yet (a kill leaves only the sibling)."""
    out = tmp_path / "g.zarr"
    seen = []
    real = _store.write_store

    def spying(out_path, spec, *, overwrite):
        def blocks():
            for block in spec.blocks:
                seen.append((out.exists(), sorted(p.name for p in tmp_path.iterdir())))
                yield block
        return real(out_path, _store.StoreSpec(spec.template, blocks()), overwrite=overwrite)

    monkeypatch.setattr(_store, "write_store", spying)
    cli.main(["grf", "--out", str(out), "--size", "tiny", "--num-samples", "3", "-q"])
    assert seen and all(not exists for exists, _ in seen)
    assert all(names == [f".g.zarr.partial-{__import__('os').getpid()}"] for _, names in seen)
    assert out.exists()

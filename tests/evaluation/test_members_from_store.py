"""Members read from a ``scidiff-sample`` store: an unfinished store is refused, naming the
store and how many members are not written yet, whichever layout holds its completion
record (the ``progress`` group, or the root ``done`` of the earlier layout); a finished one
is read. The stores are made with the real store-writing functions."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import xarray as xr

from scidiff.data.completion import read_done
from scidiff.data.dataset import FieldMetadata
from scidiff.evaluation import EvaluationError
from scidiff.evaluation.members import EnsembleSource
from scidiff.sampling.grid import ParameterSets
from scidiff.sampling.store import create_store

Y, X = 3, 4


def metadata() -> FieldMetadata:
    return FieldMetadata(
        path="data.zarr", sample_dims=("sample",), sample_shape=(2,), spatial_dims=("y", "x"),
        spatial_shape=(Y, X), channel_names=("tas", "pr"), channel_variables=("tas", "pr"),
        units=("K", "mm/day"), long_names=("temperature", "precipitation"), param_names=("forcing",),
        param_units=("W m-2",), field_names=(), coords={}, coord_dims={}, coord_attrs={},
    )


def new_store(path, members=3):
    sets = ParameterSets(names=("forcing",), values=np.array([[1.0], [2.0]]))
    return create_store(path, metadata=metadata(), sets=sets,
                        seeds=np.arange(2 * members, dtype=np.int64).reshape(2, members),
                        attrs={"identity": {"members": members}, "scidiff_version": "0.1.0",
                               "sample_config": json.dumps({"members": members})})


def member(j: int, k: int) -> np.ndarray:
    """Member (j, k), ``[C, y, x]``: tas = 10 j + k, pr = -(10 j + k)."""
    v = 10.0 * j + k
    return np.stack([np.full((Y, X), v), np.full((Y, X), -v)])


def write(store, pairs) -> None:
    store.write_members([j for j, _ in pairs], [k for _, k in pairs], np.stack([member(j, k) for j, k in pairs]))


def test_an_unfinished_store_is_refused_naming_it_and_its_unwritten_members(tmp_path):
    path = tmp_path / "ens.zarr"
    store = new_store(path)
    assert "done" not in xr.open_zarr(path)  # the record is not a data variable any more
    write(store, [(0, 0), (0, 1), (0, 2), (1, 0)])  # sample 1 misses members 1 and 2
    with pytest.raises(EvaluationError, match=(rf"^ensemble: {re.escape(str(path))} is unfinished: 2 of the 6 members "
                                               r"to evaluate are not written yet \(the first: member 1 of sample 1\); "
                                               r"finish the scidiff-sample run first")):
        EnsembleSource(path, metadata())
    write(store, [(1, 1)])
    # the members evaluated are the first ones: members=2 needs only those, and they are written
    assert EnsembleSource(path, metadata(), members=2).num_members == 2
    with pytest.raises(EvaluationError, match="is unfinished: 1 of the 6 members"):
        EnsembleSource(path, metadata())


def test_a_finished_store_is_read(tmp_path):
    path = tmp_path / "ens.zarr"
    store = new_store(path)
    write(store, [(1, 2), (0, 0), (1, 0), (0, 2), (0, 1), (1, 1)])  # in any order, a sample in several writes
    assert read_done(path).all() and store.done().all()
    source = EnsembleSource(path, metadata())
    got = source.read(np.array([1, 0])).numpy()
    assert got.shape == (2, 3, 2, Y, X)  # [B, M, C, *S]
    expected = np.stack([np.stack([member(j, k) for k in range(3)]) for j in (1, 0)])
    np.testing.assert_array_equal(got, expected)
    source.check_params(np.array([0, 1]), np.array([[1.0], [2.0]]), ["forcing"], np.array([0, 1]))


def legacy_store(path, done: np.ndarray):
    """A store of the earlier layout (``done`` a root data variable, one chunk per member)."""
    n, m = done.shape
    values = np.where(done[:, :, None, None], 1.0, np.nan).astype(np.float32) * np.ones((n, m, Y, X), np.float32)
    ds = xr.Dataset({"tas": (("sample", "member", "y", "x"), values), "pr": (("sample", "member", "y", "x"), values),
                     "done": (("sample", "member"), done)},
                    coords={"forcing": ("sample", np.arange(1.0, n + 1))},
                    attrs={"scidiff_kind": "scidiff-ensemble", "variables": ["tas", "pr"]})
    ds.to_zarr(path, zarr_format=2, consolidated=True,
               encoding={"tas": {"chunks": (1, 1, Y, X)}, "pr": {"chunks": (1, 1, Y, X)}, "done": {"chunks": (1, 1)}})
    return path


def test_stores_of_the_earlier_layout_are_checked_the_same_way(tmp_path):
    unfinished = np.array([[True, True, False], [True, True, True]])
    path = legacy_store(tmp_path / "old.zarr", unfinished)
    np.testing.assert_array_equal(read_done(path), unfinished)
    with pytest.raises(EvaluationError, match=r"old.zarr is unfinished: 1 of the 6 members .*member 2 of sample 0"):
        EnsembleSource(path, metadata())
    assert EnsembleSource(path, metadata(), members=2).read(np.array([0])).shape == (1, 2, 2, Y, X)
    finished = legacy_store(tmp_path / "done.zarr", np.ones((2, 3), bool))
    assert EnsembleSource(finished, metadata()).num_members == 3


def test_a_store_without_a_record_is_taken_as_it_is(tmp_path):
    path = tmp_path / "plain.zarr"
    xr.Dataset({"tas": (("sample", "member", "y", "x"), np.zeros((2, 3, Y, X))),
                "pr": (("sample", "member", "y", "x"), np.zeros((2, 3, Y, X)))}).to_zarr(path, zarr_format=2)
    assert read_done(path) is None
    assert EnsembleSource(path, metadata()).read(np.array([0, 1])).shape == (2, 3, 2, Y, X)

"""Parameter sets: grid / list / CSV parsing and validation against a checkpoint's names and ranges."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from scidiff.sampling.grid import (
    ParameterError,
    RangeWarning,
    check_parameter_sets,
    from_csv,
    parameter_sets,
)

NAMES = ("spectral_index", "amplitude")
RANGES = {"spectral_index": (1.0, 3.5), "amplitude": (0.5, 2.0)}


def test_grid_is_the_cartesian_product_last_name_fastest():
    sets = parameter_sets({"grid": {"amplitude": [1.0, 2.0], "spectral_index": [1.5, 2.5, 3.0]}})
    assert sets.names == ("amplitude", "spectral_index")
    np.testing.assert_array_equal(sets.values[:, 0], [1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(sets.values[:, 1], [1.5, 2.5, 3.0] * 2)
    scalar = parameter_sets({"grid": {"amplitude": 1.0, "spectral_index": [2.0]}, "list": None, "csv": None})
    assert scalar.values.tolist() == [[1.0, 2.0]]


def test_list_and_csv_and_reordering(tmp_path):
    listed = parameter_sets({"list": [{"amplitude": 1.0, "spectral_index": 2.0},
                                      {"spectral_index": 3.0, "amplitude": 0.7}]})
    ordered = check_parameter_sets(listed, NAMES, RANGES)
    assert ordered.names == NAMES
    assert ordered.values.tolist() == [[2.0, 1.0], [3.0, 0.7]]
    csv = tmp_path / "sets.csv"
    csv.write_text("amplitude, spectral_index\n1.0,2.0\n\n0.7,3.0\n")
    from_file = parameter_sets({"csv": "sets.csv"}, base_dir=tmp_path)
    np.testing.assert_array_equal(check_parameter_sets(from_file, NAMES, RANGES).values, ordered.values)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"grid": {"spectral_index": [1.5]}}, "parameter 'amplitude' is missing.*spectral_index, amplitude"),
        ({"grid": {"spectral_index": [1.5], "amplitude": [1], "slope": [2]}},
         "unknown parameter 'slope'.*spectral_index, amplitude"),
        ({"list": [{"spectral_index": 1.5, "amplitude": 1}, {"spectral_index": 2}]}, r"params.list\[1\]: names"),
        ({"grid": {"spectral_index": ["steep"], "amplitude": [1]}}, "params.grid.spectral_index: expected a number"),
        ({"grid": {"spectral_index": [1.5], "amplitude": [1]}, "csv": "x.csv"}, "give one of grid, list, csv"),
        ({"table": [1]}, "params.table: unknown key"),
        (None, "conditioned on spectral_index, amplitude"),
    ],
)
def test_bad_parameter_sets_name_the_problem(spec, message, tmp_path):
    with pytest.raises(ParameterError, match=message):
        check_parameter_sets(parameter_sets(spec), NAMES, RANGES)


def test_csv_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("spectral_index,amplitude\n1.5,1.0\n2.0,high\n")
    with pytest.raises(ParameterError, match=r"bad.csv line 3: not a number"):
        from_csv(bad)
    with pytest.raises(ParameterError, match="missing.csv does not exist"):
        from_csv(tmp_path / "missing.csv")


def test_out_of_range_warns_with_the_range_and_far_outside_says_so():
    inside = parameter_sets({"grid": {"spectral_index": [1.0, 3.5], "amplitude": [0.5, 2.0]}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_parameter_sets(inside, NAMES, RANGES)  # the range's ends are inside
    near = parameter_sets({"grid": {"spectral_index": [3.9], "amplitude": [1.0]}})
    with pytest.warns(RangeWarning, match=r"spectral_index = 3.9 lies outside the training range \[1, 3.5\]") as rec:
        check_parameter_sets(near, NAMES, RANGES)
    assert "far" not in str(rec[0].message)
    far = parameter_sets({"grid": {"spectral_index": [2.0], "amplitude": [0.5, 5.0]}})
    with pytest.warns(RangeWarning, match=r"amplitude = 5 lies far outside the training range \[0.5, 2\] \(200%"):
        check_parameter_sets(far, NAMES, RANGES)


def test_unconditional_model_takes_no_parameters():
    assert check_parameter_sets(None, (), {}).values.shape == (1, 0)
    with pytest.raises(ParameterError, match="unknown parameter 'amplitude'.*unconditional"):
        check_parameter_sets(parameter_sets({"grid": {"amplitude": [1.0]}}), (), {})

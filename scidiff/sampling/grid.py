"""Parameter sets for an ensemble: a grid, a list or a CSV file, checked against a checkpoint.

Three ways to say which physical parameter values to sample at (the ``params``
key of ``configs/sample.yaml``; exactly one of them):

* ``grid``: ``{spectral_index: [1.5, 2.5], amplitude: [1.0]}`` -- the cartesian
  product, in the order the keys are given, the last key varying fastest; a
  scalar is a one-value axis;
* ``list``: ``[{spectral_index: 1.5, amplitude: 1.0}, ...]`` -- one set per entry;
* ``csv``:  a file whose header names the parameters, one set per row.

:func:`check_parameter_sets` puts the columns in the checkpoint's parameter order
and checks them: a missing or unknown name raises :class:`ParameterError` (naming
the known names); a value outside the training range (:meth:`Pretrained.param_ranges`)
gives a :class:`RangeWarning` naming the range, more insistently when it lies more
than ``far`` (a fraction of the range's width) beyond it -- the model extrapolates
there, but the user may mean it, so it stays a warning.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SOURCES = ("grid", "list", "csv")


class ParameterError(ValueError):
    """Parameter sets that cannot be sampled; the message names the key or the file."""


class RangeWarning(UserWarning):
    """A requested parameter value lies outside the checkpoint's training range."""


@dataclass(frozen=True)
class ParameterSets:
    """``N`` parameter sets: ``values[j, i]`` is parameter ``names[i]`` of set ``j`` (physical units)."""

    names: tuple[str, ...]
    values: np.ndarray  # [N, P] float64

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[1] != len(self.names):
            raise ValueError(f"values must be [N, {len(self.names)}], got shape {self.values.shape}")

    def __len__(self) -> int:
        return self.values.shape[0]

    def as_dicts(self) -> list[dict[str, float]]:
        return [dict(zip(self.names, map(float, row))) for row in self.values]

    @classmethod
    def single_empty(cls) -> ParameterSets:
        """One set without parameters (an unconditional model)."""
        return cls(names=(), values=np.zeros((1, 0)))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ParameterError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ParameterError(f"{where}: expected a finite number, got {value}")
    return value


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return list(value)
    return [value]


def from_grid(grid: Mapping[str, Any], key: str = "params.grid") -> ParameterSets:
    """The cartesian product of the value lists (the last name varies fastest)."""
    if not isinstance(grid, Mapping) or not grid:
        raise ParameterError(f"{key}: expected a mapping of parameter name -> list of values, got {grid!r}")
    names = tuple(str(n) for n in grid)
    axes = []
    for name in names:
        values = _as_list(grid[name])
        if not values:
            raise ParameterError(f"{key}.{name}: empty list of values")
        axes.append([_number(v, f"{key}.{name}") for v in values])
    return ParameterSets(names=names, values=np.array(list(itertools.product(*axes)), dtype=np.float64))


def from_list(entries: Sequence[Mapping[str, Any]], key: str = "params.list") -> ParameterSets:
    """One set per mapping; every entry must name the same parameters."""
    entries = _as_list(entries)
    if not entries:
        raise ParameterError(f"{key}: empty list of parameter sets")
    names: tuple[str, ...] | None = None
    rows = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ParameterError(f"{key}[{i}]: expected a mapping of parameter name -> value, got {entry!r}")
        these = tuple(str(n) for n in entry)
        if names is None:
            names = these
        elif set(these) != set(names):
            raise ParameterError(f"{key}[{i}]: names {sorted(these)} differ from the first entry's {sorted(names)}")
        rows.append([_number(entry[n], f"{key}[{i}].{n}") for n in names])
    return ParameterSets(names=names, values=np.array(rows, dtype=np.float64))


def from_csv(path: str | os.PathLike, key: str = "params.csv") -> ParameterSets:
    """One set per row of a CSV file whose header names the parameters."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"{key}: file {path} does not exist")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or not all(h.strip() for h in header):
            raise ParameterError(f"{key}: {path} has no header row of parameter names")
        names = tuple(h.strip() for h in header)
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(names):
                raise ParameterError(f"{key}: {path} line {line} has {len(row)} values for {len(names)} names")
            try:
                rows.append([float(c) for c in row])
            except ValueError:
                raise ParameterError(f"{key}: {path} line {line}: not a number in {row}") from None
    if not rows:
        raise ParameterError(f"{key}: {path} has a header but no rows")
    values = np.array(rows, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ParameterError(f"{key}: {path} holds non-finite values")
    return ParameterSets(names=names, values=values)


def parameter_sets(spec: Mapping[str, Any] | None, base_dir: str | os.PathLike | None = None) -> ParameterSets | None:
    """Read the ``params`` config node: ``{grid: ...}``, ``{list: ...}`` or ``{csv: path}``
    (other keys ``None``). ``None`` (or all three unset) means no parameters given."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise ParameterError(f"params: expected a mapping with one of {SOURCES}, got {spec!r}")
    unknown = sorted(set(spec) - set(SOURCES))
    if unknown:
        raise ParameterError(f"params.{unknown[0]}: unknown key (use one of {', '.join(SOURCES)})")
    given = [k for k in SOURCES if spec.get(k) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ParameterError(f"params: give one of {', '.join(SOURCES)}, not {' and '.join(given)}")
    source = given[0]
    if source == "grid":
        return from_grid(spec["grid"])
    if source == "list":
        return from_list(spec["list"])
    path = Path(str(spec["csv"]))
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return from_csv(path)


def check_parameter_sets(
    sets: ParameterSets | None,
    names: Sequence[str],
    ranges: Mapping[str, tuple[float, float]],
    *,
    far: float = 0.5,
    key: str = "params",
) -> ParameterSets:
    """Order ``sets`` as the checkpoint's ``names`` and check them (see module docstring).

    Args:
        sets: the requested sets, or ``None`` when the config gives none.
        names: the checkpoint's parameter names (``Pretrained.param_names``).
        ranges: training range (min, max) per name (``Pretrained.param_ranges()``).
        far: beyond ``far * (max - min)`` outside the range the warning says the
            model extrapolates far from anything it saw.

    Returns:
        the sets with columns in the order of ``names``; for a model without
        parameters and no sets given, one empty set.
    """
    names = tuple(names)
    known = ", ".join(names) if names else "none: the checkpoint is unconditional"
    if sets is None:
        if names:
            raise ParameterError(f"{key}: the checkpoint is conditioned on {', '.join(names)}; "
                                 f"give values with params.grid, params.list or params.csv")
        return ParameterSets.single_empty()
    for name in sets.names:
        if name not in names:
            raise ParameterError(f"{key}: unknown parameter {name!r} (the checkpoint's parameters: {known})")
    for name in names:
        if name not in sets.names:
            raise ParameterError(f"{key}: parameter {name!r} is missing (the checkpoint's parameters: {known})")
    order = [sets.names.index(n) for n in names]
    ordered = ParameterSets(names=names, values=sets.values[:, order])
    for i, name in enumerate(names):
        if name not in ranges:
            continue
        lo, hi = ranges[name]
        col = ordered.values[:, i]
        outside = col[(col < lo) | (col > hi)]
        if outside.size == 0:
            continue
        width = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
        beyond = np.maximum(lo - outside, outside - hi) / width
        worst = float(outside[np.argmax(beyond)])
        if beyond.max() > far:
            warnings.warn(
                f"{key}: {name} = {worst:g} lies far outside the training range [{lo:g}, {hi:g}] "
                f"({100 * beyond.max():.0f}% of the range beyond it): the model never saw such values, "
                f"samples there are extrapolations",
                RangeWarning, stacklevel=2,
            )
        else:
            warnings.warn(
                f"{key}: {name} = {worst:g} lies outside the training range [{lo:g}, {hi:g}] "
                f"({outside.size} of {col.size} sets)",
                RangeWarning, stacklevel=2,
            )
    return ordered


__all__ = [
    "ParameterError",
    "ParameterSets",
    "RangeWarning",
    "check_parameter_sets",
    "from_csv",
    "from_grid",
    "from_list",
    "parameter_sets",
]

"""The value checks of the evaluation's settings, one line naming the key.

Every settings dataclass of the evaluation (:mod:`~scidiff.evaluation.settings`, the
metric suite of :mod:`~scidiff.evaluation.suite`, :class:`~scidiff.evaluation.floor.FloorSettings`,
:class:`~scidiff.evaluation.verdict.VerdictSettings`) checks its own values in
``__post_init__`` with these functions, so constructing the settings *is* the check.
A bad value raises ``ValueError`` whose message starts with the key's path in
``configs/evaluate.yaml`` (``bound.num_terms: must be >= 2 ...``); ``scidiff-evaluate``
prints it as its one-line error.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any


def is_integer(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_integer(key: str, value: Any, minimum: int, why: str = "") -> None:
    """``value`` is an integer ``>= minimum``; ``why`` (e.g. ``" (for a standard error)"``) ends the message."""
    if not is_integer(value):
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{key}: must be >= {minimum}{why}, got {value!r}")


def check_number(key: str, value: Any, low: float | None = None, strict: bool = False) -> None:
    """``value`` is a finite number, ``> low`` (``strict``) or ``>= low`` (``low`` None: any)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{key}: must be a finite number{bound}, got {value!r}")


def check_string_or_none(key: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key}: expected a string or null, got {value!r}")


def check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, got {value!r}")


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{key}: expected one of {choices}, got {value!r}")


def check_instance(key: str, value: Any, cls: type, how: str) -> None:
    """``value`` is a ``cls`` (the settings of a section); ``how`` says how to make one."""
    if not isinstance(value, cls):
        raise ValueError(f"{key}: expected {how}, got {value!r}")


__all__ = [
    "check_bool",
    "check_choice",
    "check_instance",
    "check_integer",
    "check_number",
    "is_integer",
]

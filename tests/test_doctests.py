"""Every ``>>>`` example in the docstrings of ``scidiff`` runs and shows what it says.

One test per module that has examples (``pytest --doctest-modules`` would need its own
command line; this keeps ``pytest tests`` the one test command). Examples are compared
with ``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``. An example that needs a store on disk or
a trained checkpoint belongs in a literal block (``::``) without ``>>>``, not here.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import scidiff

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names() -> list[str]:
    names = [scidiff.__name__]
    for info in pkgutil.walk_packages(scidiff.__path__, prefix=f"{scidiff.__name__}."):
        names.append(info.name)
    return sorted(names)


def _tests(module_name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(module_name)
    # exclude_empty: only docstrings with examples; objects imported from elsewhere are
    # found (and run) in the module that defines them
    found = doctest.DocTestFinder(exclude_empty=True).find(module, module_name)
    return sorted((t for t in found if t.examples), key=lambda t: t.name)


MODULES = [name for name in _module_names() if _tests(name)]


def test_the_package_has_doctests():
    # a broken discovery must not pass by finding nothing
    assert len(MODULES) >= 5, MODULES


@pytest.mark.parametrize("module_name", MODULES)
def test_doctests(module_name):
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    report: list[str] = []
    for test in _tests(module_name):
        runner.run(test, out=report.append)
    assert runner.tries > 0
    assert runner.failures == 0, f"{runner.failures} of {runner.tries} examples failed:\n" + "".join(report)

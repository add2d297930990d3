"""The layering of the package is a checked contract (``.importlinter``, docs/architecture.md).

``cli`` above ``training | sampling | evaluation`` (independent) above ``inference`` above
``data | nets | diffusion`` (independent) above ``conditioning | shapes``; the mathematics
and the denoisers import no Lightning, Hydra, OmegaConf, MLflow or xarray; ``data`` and
``inference`` no Lightning; no import cycles; no private name imported from another module.
The contract is checked on the package as it is, and shown to fail on copies of it with
one wrong-way import added.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"


def lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the ``scidiff`` package found first on ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root), "NO_COLOR": "1"}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, str(CONFIG), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_contract():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())
    assert all(f"{name} KEPT" in text for name in contract_names()) and "0 broken" in text, proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # a lower layer reaching up
        ("scidiff/diffusion/samplers.py", "import scidiff.inference.seeds", "cli above training"),
        ("scidiff/inference/seeds.py", "import scidiff.sampling.store", "cli above training"),
        # siblings are independent
        ("scidiff/evaluation/verdict.py", "import scidiff.training.ema", "cli above training"),
        # third-party frameworks kept out of the mathematics and out of data/inference
        ("scidiff/nets/layers.py", "import xarray", "import no Lightning, Hydra"),
        ("scidiff/inference/seeds.py", "import lightning", "data and inference import no Lightning"),
        # a cycle between two modules of one package
        ("scidiff/diffusion/schedules.py", "import scidiff.diffusion.process", "no import cycles"),
    ],
)
def test_a_wrong_way_import_breaks_the_contract(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "scidiff", tmp_path / "scidiff", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # added by the test\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0, proc.stdout[-3000:]
    # the contract of that rule is reported broken (an upward import is also a cycle)
    text = " ".join(proc.stdout.split())  # contract names wrap over lines
    (name,) = [n for n in contract_names() if n.startswith(broken) or broken in n]
    assert f"{name} BROKEN" in text, proc.stdout[-3000:]


def contract_names() -> list[str]:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(CONFIG)
    return [cfg[s]["name"] for s in cfg.sections() if s.startswith("importlinter:contract:")]


def private_imports(package: Path) -> list[str]:
    """``from scidiff.x import _name`` (or ``import``-ed module attributes ``mod._name``) where
    the name belongs to another module of the package."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scidiff"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and node.module != module:
                        found.append(f"{path.relative_to(package.parent)}:{node.lineno}: {node.module}.{alias.name}")
    return found


def test_no_private_name_is_imported_from_another_module():
    assert private_imports(ROOT / "scidiff") == []


def test_the_private_name_check_finds_one(tmp_path):
    pkg = tmp_path / "scidiff"
    pkg.mkdir()
    (pkg / "a.py").write_text("def _helper():\n    return 1\n")
    (pkg / "b.py").write_text("from scidiff.a import _helper\n")
    assert private_imports(pkg) == ["scidiff/b.py:1: scidiff.a._helper"]

"""The built wheel carries the whole Hydra config tree (console scripts outside a checkout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_every_config(tmp_path):
    # build from a copy of the checkout's files (no stale build/ directory, nothing written to the repo)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("scidiff-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = [f for f in files if f.startswith("configs/")]
    expected = {"scidiff/_configs/" + p[len("configs/"):] for p in tracked if p.endswith(".yaml")}
    assert expected and expected <= names, sorted(expected - names)
    assert "scidiff_datasets/cli.py" in names

"""README's first command installs scidiff without extras (``bash workflows/install.sh``): the main
job it runs must not need any package of the optional extras (peft, safetensors, rdkit, diffusers,
the test tools, ...).

One subprocess in which every optional extra's modules fail to import, as on a fresh core install,
runs the main job's steps through their CLI entry points at tiny sizes: ``scidiff-train
experiment=quickstart`` (sample figures included), ``scidiff-sample``, ``scidiff-selfcheck`` and
``scidiff-evaluate`` with its verdict; and a sweep asking for the SLURM launcher, which needs the
``cluster`` extra, is refused with the extra's name. The extras are read from pyproject.toml, so a
new one is covered when it is added there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import xarray as xr

REPO = Path(__file__).resolve().parents[2]

# Runs the steps in one interpreter (the imports are paid once) with the extras' modules absent.
RUNNER = r"""
import importlib.abc, json, sys

blocked, steps = json.loads(sys.argv[1]), json.loads(sys.argv[2])


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (an optional extra: absent here)", name=name)
        return None


sys.meta_path.insert(0, Absent())
import importlib

for module, args, expected in steps:
    print(f"[core] {module}", flush=True)
    try:
        code = importlib.import_module(module).main(args)
    except SystemExit as exc:
        code = exc.code
    if (code or 0) != expected:
        sys.exit(f"{module} exited with {code}")
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in blocked)
print("[core] loaded extras:", json.dumps(loaded))
"""


def _dist(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def optional_modules() -> list[str]:
    """Top-level modules of the installed distributions that only pyproject's extras require."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_dist(r) for r in project["dependencies"]}
    extras = {_dist(r) for reqs in project["optional-dependencies"].values() for r in reqs} - core
    modules = set()
    for module, dists in metadata.packages_distributions().items():
        if any(d.lower().replace("_", "-") in extras for d in dists):
            modules.add(module)
    return sorted(modules)


def test_main_job_runs_without_the_optional_extras(tmp_path, data_dir):
    blocked = optional_modules()
    assert {"peft", "safetensors", "rdkit", "pytest"} <= set(blocked)   # the test dev install has them
    run = tmp_path / "outputs" / "quickstart" / "core"
    steps = [  # (module, arguments, the exit status expected)
        ("scidiff.cli.train", ["experiment=quickstart", "run_name=core", "trainer.max_steps=4",
                               "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
                               "callbacks.periodic_checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false"],
         0),
        ("scidiff.cli.sample", [f"checkpoint={run}", "members=2", "sampler=dpmpp_2m", "sampler.steps=4",
                                f"out={run / 'ensemble.zarr'}", "params.list=[{spectral_index: 2.25, amplitude: 1.0}]"],
         0),
        ("scidiff.cli.selfcheck", ["--samples", "16"], 0),
        ("scidiff.cli.evaluate", [f"checkpoint={run}", "split=val", "max_samples=3", "batch_size=3",
                                  "bound.estimator=importance", "bound.num_terms=4", "sampling.members=2",
                                  "sampler=dpmpp_2m", "sampler.steps=4", "progress=false"], 0),
        ("scidiff.cli.train", ["-m", "hydra/launcher=slurm", "experiment=quickstart", "seed=0,1"], 2),
    ]
    env = {**os.environ, "SCIDIFF_DATA_DIR": str(data_dir), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(blocked), json.dumps(steps)], check=False,
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.splitlines()[-1] == "[core] loaded extras: []"
    assert ("error: hydra/launcher: the SLURM and submitit launchers (configs/hydra/launcher/) need the "
            "hydra-submitit-launcher plugin: pip install 'scidiff[cluster]'") in proc.stderr.splitlines()
    assert not (tmp_path / "outputs" / "multirun").exists()
    assert "verdict" in proc.stdout
    members = xr.open_zarr(run / "ensemble.zarr")
    assert members.sizes["member"] == 2 and bool(members["field"].notnull().all())
    assert (run / "eval" / "val" / "evaluation.nc").is_file()
    assert (tmp_path / "mlflow.db").is_file()

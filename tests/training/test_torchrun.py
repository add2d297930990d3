"""2 nodes x 1 process, simulated with two ``torchrun`` launches on localhost (gloo):
the recipe of workflows/torchrun.sh trains, the replicas agree, one MLflow run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from tests.training.conftest import QUIET

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_with_torchrun_on_localhost(tmp_path, data_dir):
    port = _free_port()
    args = ["experiment=quickstart", "trainer.max_steps=4", "trainer.val_check_interval=2", "run_name=tr",
            "callbacks.periodic_checkpoint.every_n_train_steps=2", *QUIET]
    base = {**os.environ, "SCIDIFF_DATA_DIR": str(data_dir), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
            "NNODES": "2", "NPROC": "1", "ACCEL": "cpu", "MASTER_PORT": str(port)}
    procs = [
        subprocess.Popen(["bash", str(REPO / "workflows" / "torchrun.sh"), *args], cwd=tmp_path,
                         env={**base, "NODE_RANK": str(node)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for node in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for node, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {node} failed ({p.returncode}):\n{out[-3000:]}"
    assert sum(o.count("scidiff-train: 4 steps") for o in outs) == 1      # global rank 0 alone reports
    assert [d.name for d in (tmp_path / "outputs" / "quickstart").iterdir()] == ["tr"]
    summary = json.loads((tmp_path / "outputs" / "quickstart" / "tr" / "summary.json").read_text())
    assert summary["world_size"] == 2
    sums = summary["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]

"""scidiff.inference.tracking without a training: which store holds a checkpoint's run,
models:/ references, and the status a failed command gives its runs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from scidiff.inference.tracking import (
    checkpoint_tracking_uri,
    failure_status,
    is_mlflow_reference,
    parse_model_uri,
)

CONFIG = {"output_root": "outputs", "task_name": "quickstart", "run_name": "tiny"}


def pretrained(checkpoint: Path, uri: str | None = "sqlite:///mlflow.db", source: str | None = None, config=CONFIG):
    return SimpleNamespace(checkpoint=checkpoint, mlflow_tracking_uri=uri, source_tracking_uri=source, config=config)


def test_the_store_of_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "train_here" / "outputs" / "quickstart" / "tiny" / "checkpoints" / "last.ckpt"
    # the recorded relative store is the training directory's, wherever the command runs
    assert checkpoint_tracking_uri(pretrained(ckpt)) == f"sqlite:///{tmp_path / 'train_here' / 'mlflow.db'}"
    assert checkpoint_tracking_uri(pretrained(ckpt, "sqlite:///db/runs.db")) == \
        f"sqlite:///{tmp_path / 'train_here' / 'db' / 'runs.db'}"
    # what is given wins; then the store the file was downloaded from; absolute paths and servers as recorded
    assert checkpoint_tracking_uri(pretrained(ckpt), "http://host:5000") == "http://host:5000"
    assert checkpoint_tracking_uri(pretrained(ckpt, source="sqlite:////a/b.db")) == "sqlite:////a/b.db"
    assert checkpoint_tracking_uri(pretrained(ckpt, "sqlite:////x/mlflow.db")) == "sqlite:////x/mlflow.db"
    assert checkpoint_tracking_uri(pretrained(ckpt, "http://host:5000")) == "http://host:5000"
    # a checkpoint moved out of its run directory: relative to the working directory, as recorded
    assert checkpoint_tracking_uri(pretrained(tmp_path / "copy" / "last.ckpt")) == "sqlite:///mlflow.db"
    assert checkpoint_tracking_uri(pretrained(ckpt, config={})) == "sqlite:///mlflow.db"
    # no MLflow run recorded: the default store
    assert checkpoint_tracking_uri(pretrained(ckpt, None)) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert checkpoint_tracking_uri(pretrained(ckpt, None)) == "http://env:5000"


def test_model_references():
    assert parse_model_uri("models:/grf-quickstart/12") == ("grf-quickstart", "12", None)
    assert parse_model_uri("models:/grf/latest") == ("grf", "latest", None)
    assert parse_model_uri("models:/grf@champion") == ("grf", None, "champion")
    for bad in ("models:/grf", "models:/grf/Production", "models:/@x", "models:/"):
        with pytest.raises(ValueError, match="expected models:/<name>/<version>"):
            parse_model_uri(bad)
    assert all(map(is_mlflow_reference, ["models:/grf/1", "runs:/abc", "0123456789abcdef0123456789abcdef"]))
    assert not is_mlflow_reference("outputs/quickstart/tiny")


def test_failure_status():
    assert failure_status(RuntimeError("x")) == "FAILED"
    assert failure_status(SystemExit(1)) == "FAILED"
    assert failure_status(KeyboardInterrupt()) == "KILLED"
    assert failure_status(SystemExit(143)) == "KILLED"

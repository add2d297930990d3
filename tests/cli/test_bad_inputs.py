"""The bad-input corpus: what a user gets wrong, per command. Every case must exit with status 2,
print one line ``error: ...`` naming the key or the file, and create or change nothing (the working
directory, the inputs and any existing output are compared file by file before and after).

The commands run in-process (their ``main``, as the console scripts call it): the corpus is large,
and a subprocess per case would spend most of its time importing torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

RUN = "outputs/quickstart/tiny"          # the tiny conditional run, under the `trained_run` directory


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``roots``: (size, modification time in ns)."""
    seen = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            st = path.lstat()
            seen[str(path)] = (st.st_size if path.is_file() else -1, st.st_mtime_ns if path.is_file() else 0)
    return seen


def call(main, argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def fill(texts: list[str], **values: Path) -> list[str]:
    """``{name}`` -> the path ``values[name]`` (other braces, e.g. of a YAML mapping, are kept)."""
    out = []
    for text in texts:
        for name, value in values.items():
            text = text.replace("{" + name + "}", str(value))
        out.append(text)
    return out


def merged(base: list[str], args: list[str]) -> list[str]:
    """``base`` overrides without the keys ``args`` sets, then ``args``."""
    keys = {a.split("=", 1)[0].lstrip("+") for a in args}
    return [b for b in base if b.split("=", 1)[0] not in keys] + args


def assert_refused(main, argv, expected, capsys, monkeypatch, *watched: Path) -> None:
    before = snapshot(*watched)
    code, err = call(main, argv, capsys, monkeypatch)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (argv, code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err[-2000:])
    assert expected in lines[0], (argv, lines[0])
    assert snapshot(*watched) == before, f"{argv} created or changed files"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, trained_run, data_dir) -> Path:
    """Broken inputs: checkpoints (truncated, zeroed, foreign, weights only) and stores (NaN in the
    validation split only, +inf in training, a parameter missing)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    last = trained_run / RUN / "checkpoints" / "last.ckpt"
    (d / "truncated.ckpt").write_bytes(last.read_bytes()[:4096])
    (d / "zeroed.ckpt").write_bytes(bytes(last.stat().st_size))
    torch.save({"weights": torch.zeros(3)}, d / "foreign.ckpt")
    full = torch.load(last, weights_only=True)
    torch.save({"state_dict": full["state_dict"]}, d / "weights_only.ckpt")
    (d / "a_file").write_text("not a directory")
    ds = xr.open_zarr(data_dir / "grf_quickstart.zarr").isel(sample=slice(0, 256)).load()
    n = ds["spectral_index"].values
    val = int(np.flatnonzero((n >= 2.0) & (n <= 2.5))[0])
    train = int(np.flatnonzero(n < 1.9)[0])
    for name, change in {
        "nan_in_val": lambda x: x["field"].values.__setitem__((val, 3, 3), np.nan),
        "inf_in_train": lambda x: x["field"].values.__setitem__((train, 0, 0), np.inf),
        "no_amplitude": None,
    }.items():
        copy = ds.copy(deep=True)
        if change is None:
            copy = copy.drop_vars("amplitude")
        else:
            change(copy)
        for v in copy.variables.values():
            v.encoding.clear()
        copy.to_zarr(d / f"{name}.zarr", zarr_format=2, consolidated=True)
    return d


# --------------------------------------------------------------------------------------------- train
TRAIN_CASES = [
    (["trainer.max_stepz=3"], "trainer.max_stepz: unknown config key"),
    (["+data.batch_sise=3"], "data.batch_sise: unknown key for scidiff.data.FieldDataModule"),
    (["trainer.max_steps=abc"], "trainer.max_steps: expected int"),
    (["denoiser=transformer9"], "denoiser=transformer9: no such config"),
    (["experiment=quickstar"], "experiment=quickstar: no such config"),
    (["boundary=[zeros,periodic]"], "boundary: expected one of"),
    (["data.path=/nonexistent/store.zarr"], "data.path: dataset /nonexistent/store.zarr does not exist"),
    (["data.path={inputs}/nan_in_val.zarr"], "val split of {inputs}/nan_in_val.zarr: variable(s) ['field'] have "
                                             "missing (NaN) values"),
    (["data.path={inputs}/inf_in_train.zarr"], "variable ['field'] contain +-inf values"),
    (["data.path={inputs}/no_amplitude.zarr"], "'amplitude' not found in store"),
    (["data.variables=[temperature]"], "variable 'temperature' not found in store"),
    (["resume=/nonexistent.ckpt"], "resume: checkpoint file /nonexistent.ckpt does not exist"),
    (["resume={inputs}/truncated.ckpt"], "resume: {inputs}/truncated.ckpt is not a readable checkpoint"),
    (["resume={inputs}/zeroed.ckpt"], "resume: {inputs}/zeroed.ckpt is not a readable checkpoint"),
    (["resume={inputs}/foreign.ckpt"], "resume: {inputs}/foreign.ckpt is not a Lightning checkpoint"),
    (["resume={inputs}/weights_only.ckpt"], "resume: {inputs}/weights_only.ckpt holds weights only"),
    (["resume={run}/checkpoints/last.ckpt", "denoiser=unet_tiny"], "was trained with another denoiser"),
    (["output_root={inputs}/a_file/runs"], "output_root: cannot create the run directory"),
    (["run_name=tiny", "output_root={trained}/outputs"], "run_name: {trained}/outputs/quickstart/tiny already holds"),
    (["register_model=a/b"], "register_model: expected a model name"),
    (["register_model=m", "logger=none"], "register_model: m: the model registry is MLflow's"),
]


@pytest.mark.parametrize(("args", "expected"), TRAIN_CASES, ids=[" ".join(a) for a, _ in TRAIN_CASES])
def test_train_refuses_bad_input(args, expected, inputs, trained_run, data_dir, tmp_path, capsys, monkeypatch):
    from scidiff.cli.train import main

    values = {"inputs": inputs, "run": trained_run / RUN, "trained": trained_run}
    args, expected = fill(args, **values), fill([expected], **values)[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    assert_refused(main, ["experiment=quickstart", "trainer.max_steps=2", *args], expected,
                   capsys, monkeypatch, tmp_path, inputs, trained_run / "outputs", trained_run / "mlflow.db")


def test_train_without_rdkit_says_which_extra_to_install(tmp_path, capsys, monkeypatch):
    """experiment=voxels generates its store with RDKit; without it, one line names the extra."""
    from scidiff.cli.train import main

    monkeypatch.setitem(sys.modules, "rdkit", None)  # import rdkit now raises ImportError
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(tmp_path / "data"))
    assert_refused(main, ["experiment=voxels"], "pip install 'scidiff[molecules]'", capsys, monkeypatch, tmp_path)
    from scidiff_datasets.cli import main as make_dataset

    with pytest.raises(SystemExit) as stop:
        make_dataset(["voxels", "--out", str(tmp_path / "v.zarr"), "--size", "tiny"])
    assert stop.value.code == 2 and "pip install 'scidiff[molecules]'" in capsys.readouterr().err
    assert not (tmp_path / "v.zarr").exists()


@pytest.fixture(scope="module")
def fields(inputs, data_dir) -> Path:
    """Fields a user brings to scidiff-invert (physical units, with their parameters), and broken copies."""
    src = xr.open_zarr(data_dir / "grf_quickstart.zarr").isel(sample=slice(40, 42)).load()
    ds = xr.Dataset({name: (src[name].dims, src[name].values, dict(src[name].attrs))
                     for name in ("field", "spectral_index", "amplitude")},
                    coords={k: (src[k].dims, src[k].values, dict(src[k].attrs)) for k in ("sample", "y", "x")})
    ds.to_zarr(inputs / "fields.zarr", zarr_format=2, consolidated=True)
    ds.drop_vars("amplitude").to_zarr(inputs / "fields_no_amplitude.zarr", zarr_format=2, consolidated=True)
    bad = ds.copy(deep=True)
    bad["field"].values[0, 0, 0] = np.inf
    bad.to_zarr(inputs / "fields_inf.zarr", zarr_format=2, consolidated=True)
    ds.isel(x=slice(0, 8)).to_zarr(inputs / "fields_small_grid.zarr", zarr_format=2, consolidated=True)
    return inputs / "fields.zarr"


# --------------------------------------------------------------------------------------------- sample
SETS = "params.grid={spectral_index: [2.0], amplitude: [1.0]}"
SAMPLE_CASES = [
    (["+memberz=3"], "memberz: unknown key"),
    (["members=abc"], "members: expected int"),
    (["members=0"], "members"),
    (["sampler=euler"], "sampler=euler: no such config in configs/sampler/"),
    (["sampler.eta=-1"], "sampler.eta: expected >= 0"),
    (["sampler.stepz=4"], "sampler.stepz: unknown config key"),
    (["sampler=dpmpp_3m", "sampler.steps=2"], "sampler.steps: 2 model calls are fewer than the solver's order 3"),
    (["sampler=unipc", "sampler.order=4"], "sampler.order: expected 1, 2 or 3, got 4"),
    (["sampler.timesteps=[10,500]"], "sampler.timesteps: timesteps must be strictly decreasing"),
    (["guidance.scale=strong"], "guidance.scale: expected a finite number"),
    (["params.grid={spectral_index: [2.0]}"], "parameter 'amplitude' is missing"),
    (["params.grid={spectral_index: [2.0], amplitude: [1.0], slope: [2.0]}"], "unknown parameter 'slope'"),
    (["params.grid=null", "params.csv={inputs}/missing.csv"], "missing.csv"),
    (["checkpoint={inputs}/missing.ckpt"], "missing.ckpt does not exist"),
    (["checkpoint={inputs}/truncated.ckpt"], "truncated.ckpt is not a readable torch checkpoint"),
    (["checkpoint={inputs}/zeroed.ckpt"], "zeroed.ckpt is not a readable torch checkpoint"),
    (["checkpoint={inputs}/foreign.ckpt"], "foreign.ckpt has no state_dict"),
    (["checkpoint={inputs}/weights_only.ckpt"], "weights_only.ckpt was not written by scidiff-train"),
    (["checkpoint=models:/no-such-model/1"], "no-such-model"),
    (["conditions.path={inputs}/nowhere.zarr"], "conditions.path: {inputs}/nowhere.zarr does not exist"),
    (["out={inputs}/a_file"], "a_file"),
]


@pytest.mark.parametrize(("args", "expected"), SAMPLE_CASES, ids=[" ".join(a) for a, _ in SAMPLE_CASES])
def test_sample_refuses_bad_input(args, expected, inputs, trained_run, tmp_path, capsys, monkeypatch):
    from scidiff.cli.sample import main

    args, expected = fill(args, inputs=inputs), fill([expected], inputs=inputs)[0]
    monkeypatch.chdir(trained_run)
    base = [f"checkpoint={RUN}", "members=2", "sampler.steps=2", "progress=false", SETS, f"out={tmp_path / 'e.zarr'}"]
    assert_refused(main, merged(base, args), expected, capsys, monkeypatch,
                   tmp_path, inputs, trained_run / "outputs", trained_run / "mlflow.db")


# --------------------------------------------------------------------------------------------- evaluate
EVALUATE_CASES = [
    (["bound.estimater=exact"], "bound.estimater"),
    (["bound.estimator=exactly"], "bound.estimator"),
    (["sampling.members=many"], "sampling.members"),
    (["sampling.members=1"], "sampling.members: must be >= 2"),
    (["nonsense=1"], "nonsense"),
    (["verdict.factor=-1"], "verdict.factor: must be a finite number > 0, got -1"),
    (["floor.pool=bogus"], "floor.pool"),
    (["+verdict.factr=2"], "verdict.factr"),
    (["verdict.fail_on_unfaithful=maybe"], "verdict.fail_on_unfaithful"),
    (["split=everything"], "split"),
    (["checkpoint={inputs}/missing.ckpt"], "missing.ckpt does not exist"),
    (["checkpoint={inputs}/truncated.ckpt"], "truncated.ckpt is not a readable torch checkpoint"),
    (["checkpoint={inputs}/zeroed.ckpt"], "zeroed.ckpt is not a readable torch checkpoint"),
    (["checkpoint={inputs}/foreign.ckpt"], "foreign.ckpt has no state_dict"),
    (["checkpoint=models:/no-such-model/1"], "no-such-model"),
    (["data_path={inputs}/nowhere.zarr"], "nowhere.zarr"),
    (["ensemble={inputs}/nowhere.zarr"], "nowhere.zarr"),
    (["out={inputs}/done"], "already holds an evaluation (evaluation.nc)"),
    (["out={inputs}/a_file"], "exists and is not a directory"),
]


@pytest.mark.parametrize(("args", "expected"), EVALUATE_CASES, ids=[" ".join(a) for a, _ in EVALUATE_CASES])
def test_evaluate_refuses_bad_input(args, expected, inputs, trained_run, data_dir, tmp_path, capsys, monkeypatch):
    from scidiff.cli.evaluate import main

    (inputs / "done").mkdir(exist_ok=True)
    (inputs / "done" / "evaluation.nc").write_bytes(b"an earlier evaluation")
    args, expected = fill(args, inputs=inputs), fill([expected], inputs=inputs)[0]
    monkeypatch.chdir(tmp_path)
    base = [f"checkpoint={trained_run / RUN}", "max_samples=2", "sampling.members=2", "progress=false"]
    assert_refused(main, merged(base, args), expected, capsys, monkeypatch,
                   tmp_path, inputs, trained_run / "outputs", trained_run / "mlflow.db")


# --------------------------------------------------------------------------------------------- invert
INVERT_CASES = [
    (["stepz=3"], "stepz: unknown config key"),
    (["guidance.scal=2"], "guidance.scal"),
    (["sampler.steps=many"], "sampler.steps: expected a positive integer"),
    (["sampler.spacing=middle"], "sampler.spacing: unknown value 'middle'"),
    (["sampler.eta=0.5"], "deterministic DDIM"),
    (["sampler=ddpm"], "deterministic DDIM"),
    (["refine_steps=-1"], "refine_steps"),
    (["batch_size=0"], "batch_size"),
    (["input={inputs}/nowhere.zarr"], "input: {inputs}/nowhere.zarr does not exist"),
    (["input={inputs}/fields_no_amplitude.zarr"], "lacks the parameter(s) ['amplitude']"),
    (["input={inputs}/fields_inf.zarr"], "variable 'field' holds +-inf at 1 points"),
    (["input={inputs}/fields_small_grid.zarr"], "fields_small_grid.zarr"),
    (["checkpoint={inputs}/missing.ckpt"], "missing.ckpt does not exist"),
    (["checkpoint={inputs}/truncated.ckpt"], "truncated.ckpt is not a readable torch checkpoint"),
    (["checkpoint={inputs}/zeroed.ckpt"], "zeroed.ckpt is not a readable torch checkpoint"),
    (["checkpoint={inputs}/foreign.ckpt"], "foreign.ckpt has no state_dict"),
    (["checkpoint=models:/no-such-model/1"], "no-such-model"),
    (["out={inputs}/fields.zarr"], "fields.zarr already exists"),
    (["device=cuda:7"], "device"),
]


@pytest.mark.parametrize(("args", "expected"), INVERT_CASES, ids=[" ".join(a) for a, _ in INVERT_CASES])
def test_invert_refuses_bad_input(args, expected, fields, inputs, trained_run, tmp_path, capsys, monkeypatch):
    from scidiff.cli.invert import main

    args, expected = fill(args, inputs=inputs), fill([expected], inputs=inputs)[0]
    monkeypatch.chdir(trained_run)
    base = [f"checkpoint={RUN}", f"input={fields}", f"out={tmp_path / 'latent.zarr'}"]
    assert_refused(main, merged(base, args), expected, capsys, monkeypatch,
                   tmp_path, inputs, trained_run / "outputs", trained_run / "mlflow.db")

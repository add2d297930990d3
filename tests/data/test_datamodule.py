import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import xarray as xr
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler, _update_dataloader
from lightning.pytorch.trainer.states import RunningStage

from tests.data.conftest import climate_like, write
from scidiff.data import CoordinateSplit, FieldDataModule, IndexSplit, Statistics

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _dm(path, **kw):
    args = dict(variables=["sst", {"name": "pr", "transform": "log1p"}], spatial_dims=["lat", "lon"],
                sample_dims="time", params=["co2"], split=IndexSplit(train=[0, 16], val=[16, 20], test=[20, 24]),
                batch_size=4)
    args.update(kw)
    return FieldDataModule(path, **args)


def test_setup_statistics_on_train_split_only(climate_store):
    dm = _dm(climate_store)
    dm.setup("fit")
    ds = xr.open_zarr(climate_store)
    assert dm.statistics.x[0].mean == pytest.approx(float(np.nanmean(ds["sst"].values[:16].astype("f8"))), rel=1e-10)
    assert dm.statistics.params[0].mean == pytest.approx(ds["co2"].values[:16].mean(), rel=1e-12)
    assert dm.statistics.params[0].mean < ds["co2"].values.mean() - 20  # co2 rises over time: val/test unseen
    assert [len(dm.datasets[k]) for k in ("train", "val", "test")] == [16, 4, 4]
    batch = next(iter(dm.val_dataloader()))
    assert batch["index"].tolist() == [16, 17, 18, 19]
    assert set(batch) == {"x", "mask", "params", "index"}
    phys = dm.inverse_transform(batch["x"].double(), batch["mask"])
    np.testing.assert_allclose(phys[:, 1].numpy(), ds["pr"].values[16:20], rtol=1e-4, atol=1e-5)
    assert torch.isnan(phys[:, 0]).sum() == 4 * 6  # land points are NaN again, as in the store
    co2 = dm.inverse_params(batch["params"].double())
    np.testing.assert_allclose(co2[:, 0].numpy(), ds["co2"].values[16:20], rtol=1e-6)
    with pytest.raises(ValueError, match=r"params must be \[B, 1\] for the parameters \['co2'\]"):
        dm.transform_params(torch.zeros(4, 2))


def test_training_loader_shuffles_deterministically(climate_store):
    dm = _dm(climate_store, seed=3)
    dm.setup("fit")
    a = torch.cat([b["index"] for b in dm.train_dataloader()])
    b = torch.cat([b["index"] for b in _fresh(climate_store, seed=3).train_dataloader()])
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(16)) and a.tolist() != list(range(16))


def _fresh(path, **kw):
    dm = _dm(path, **kw)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("shuffle", [True, False])
def test_two_ranks_see_disjoint_samples(climate_store, shuffle):
    """Lightning's own DistributedSampler injection, as under Trainer(strategy='ddp', devices=2)."""
    dm = _dm(climate_store, split=IndexSplit(train=[0, 20], val=[20, 24]), shuffle=shuffle)
    dm.setup("fit")
    seen = []
    for rank in range(2):
        dl = dm.train_dataloader()
        sampler = _get_distributed_sampler(dl, shuffle=shuffle, overfit_batches=0, mode=RunningStage.TRAINING,
                                           num_replicas=2, rank=rank)
        dl = _update_dataloader(dl, sampler, mode=RunningStage.TRAINING)
        seen.append(torch.cat([b["index"] for b in dl]).tolist())
    assert len(seen[0]) == len(seen[1]) == 10
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(20))


def test_statistics_file_is_written_then_reused(climate_store, tmp_path):
    file = tmp_path / "run" / "statistics.json"
    dm = _dm(climate_store, statistics_path=file)
    dm.setup()
    assert file.exists()
    dm2 = _dm(climate_store, statistics_path=file, split=IndexSplit(train=[0, 8], val=[8, 24]))
    dm2.setup()
    assert dm2.statistics == dm.statistics  # loaded, not recomputed on the other split
    other = _dm(climate_store, variables=["sst"], statistics_path=file)
    with pytest.raises(ValueError, match=r"statistics do not match the data: variable channels \['sst', 'pr'\]"):
        other.setup()


def test_checkpoint_state_restores_without_the_training_split(climate_store, tmp_path):
    dm = _dm(climate_store)
    dm.setup()
    state = dm.state_dict()
    assert Statistics.from_state(state["statistics"]) == dm.statistics
    assert state["metadata"]["param_names"] == ["co2"]
    restored = _dm(climate_store, split=IndexSplit(train=[8, 24], val=[0, 8]))
    restored.load_state_dict(state)
    restored.setup()
    assert restored.statistics == dm.statistics
    assert restored.split_indices["train"].tolist() == list(range(16))
    x = torch.randn(2, 2, 6, 10, dtype=torch.float64)
    assert torch.equal(restored.inverse_transform(x), dm.inverse_transform(x))


class _Probe(L.LightningModule):
    """Records what it is fed; a linear 'denoiser' so there is something to optimise."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, _):
        assert torch.isfinite(batch["x"]).all()
        self.seen.append(batch["index"])
        return ((batch["x"] * self.w - batch["x"]) ** 2 * batch["mask"]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_and_checkpoint_carry_the_statistics(climate_store, tmp_path):
    """The Lightning side: scidiff-train's wrapper around the plain data module."""
    from scidiff.training import ResumableDataModule

    dm = _dm(climate_store)
    assert not isinstance(dm, L.LightningDataModule)
    model = _Probe()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=ResumableDataModule(dm))
    assert len(model.seen) == 3 and all(len(i) == 4 for i in model.seen)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert Statistics.from_state(ckpt["ResumableDataModule"]["statistics"]) == dm.statistics


def test_the_data_package_loads_no_lightning():
    code = "import sys, scidiff.data; print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _schema_store(kind, tmp_path):
    """Tiny stores with the documented schemas of datasets/README.md."""
    rng = np.random.default_rng(0)
    n = 16
    f4 = lambda *s: rng.random(s).astype("f4")  # noqa: E731
    if kind == "grf":
        ds = xr.Dataset({"field": (("sample", "y", "x"), rng.standard_normal((n, 8, 12)).astype("f4")),
                         "spectral_index": (("sample",), 1 + 2.5 * f4(n)),
                         "amplitude": (("sample",), 0.5 * 4 ** f4(n))})
    elif kind == "climate":
        sst = 270 + 30 * f4(n, 4, 8)
        sst[:, 1, 2:4] = np.nan
        ds = xr.Dataset(
            {"tas": (("sample", "lat", "lon"), 250 + 50 * f4(n, 4, 8)), "sst": (("sample", "lat", "lon"), sst),
             "rlut": (("sample", "lat", "lon"), 200 + 50 * f4(n, 4, 8)),
             "co2_forcing": (("sample",), 8 * f4(n)), "diffusivity": (("sample",), 0.35 + 0.4 * f4(n)),
             "solar_constant": (("sample",), 1340 + 60 * f4(n)),
             "land_sea_mask": (("lat", "lon"), (f4(4, 8) > 0.7).astype("f4"))},
            coords={"simulation": ("sample", np.repeat(np.arange(4), 4)), "lat": np.linspace(-60, 60, 4),
                    "lon": np.arange(8) * 45.0})
    else:
        dens = {f"density_{e}": (("sample", "z", "y", "x"), 0.5 * f4(n, 4, 6, 8) ** 8) for e in "CNOF"}
        ds = xr.Dataset({**dens, "num_heavy_atoms": (("sample",), rng.integers(5, 20, n).astype("f4")),
                         "molecular_weight": (("sample",), 100 + 200 * f4(n)), "tpsa": (("sample",), 100 * f4(n))})
    return write(ds, tmp_path / f"{kind}.zarr")


@pytest.mark.parametrize("kind, x_shape, keys", [
    ("grf", (1, 8, 12), {"x", "params", "index"}),
    ("climate", (1, 4, 8), {"x", "params", "fields", "index"}),
    ("voxels", (4, 4, 6, 8), {"x", "params", "index"}),
])
def test_dataset_configs_instantiate(kind, x_shape, keys, tmp_path):
    hydra = pytest.importorskip("hydra")
    from hydra.utils import instantiate

    path = _schema_store(kind, tmp_path)
    with hydra.initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = hydra.compose(config_name=None, overrides=[f"+data={kind}", f"data.path={path}", "data.num_workers=0",
                                                         "data.batch_size=2"])
    dm = instantiate(cfg.data)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == keys
    assert tuple(batch["x"].shape) == (2, *x_shape)
    assert batch["params"].shape[1] == len(dm.metadata.param_names) == 3 if kind != "grf" else 2


def test_user_store_config(climate_store):
    hydra = pytest.importorskip("hydra")
    from hydra.utils import instantiate

    with hydra.initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = hydra.compose(config_name=None, overrides=[
            "+data=zarr", f"data.path={climate_store}", "data.variables=[sst]", "data.spatial_dims=[lat,lon]",
            "data.sample_dims=time", "data.num_workers=0", "data/split=coordinate", "data.split.coord=time.year",
            "data.split.train=[2000,2008]", "data.split.val=[2009,2011]"])
    dm = instantiate(cfg.data)
    assert isinstance(dm.split, CoordinateSplit)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "mask", "index"} and batch["x"].shape == (16, 1, 6, 10)
    years = xr.open_zarr(climate_store)["time.year"].values
    assert dm.split_indices["train"].tolist() == np.flatnonzero(years <= 2008).tolist()
    assert len(dm.datasets["test"]) == 0


@pytest.mark.parametrize(("variable", "where", "value", "expected"), [
    ("pr", 18, np.nan, r"val split of .*: variable\(s\) \['pr'\] have missing \(NaN\) values in samples \[18\]"),
    ("pr", 22, np.inf, r"test split of .*: variable\(s\) \['pr'\]: values outside their transform's domain"),
    ("co2", 17, np.nan, r"val split of .*: parameter\(s\) \['co2'\] are missing or invalid"),
])
def test_every_split_is_checked_at_setup(tmp_path, variable, where, value, expected):
    """A value only the validation or test split has fails at setup, naming the split, the variable
    and the sample, not at the first validation thousands of steps later."""
    ds = climate_like(nan_points=False)  # no missing point in training: no mask
    ds[variable].values[where] = value
    dm = _dm(write(ds, tmp_path / "bad.zarr"))
    with pytest.raises(ValueError, match=expected):
        dm.setup("fit")


def test_a_restored_run_is_not_rechecked(climate_store, tmp_path):
    dm = _dm(climate_store)
    dm.setup("fit")
    state = dm.state_dict()
    again = _dm(climate_store)
    calls = []
    again.check_values = lambda *a, **k: calls.append(a)
    again.load_state_dict(state)
    again.setup("fit")
    assert calls == []

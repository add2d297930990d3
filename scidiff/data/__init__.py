"""Scientific fields from xarray/zarr/netCDF: lazy datasets, reversible transforms,
out-of-core statistics, deterministic splits, atomic writes (:mod:`scidiff.data.atomic`),
the completion record of ensemble stores (:mod:`scidiff.data.completion`) and a data module. Nothing here imports Lightning: the Lightning side of the data
module is :class:`scidiff.training.ResumableDataModule`.

For a store ``store.zarr`` holding ``t2m(time, lat, lon)``::

    dm = FieldDataModule("store.zarr", variables=["t2m"], spatial_dims=["lat", "lon"],
                         sample_dims="time", split=CoordinateSplit("time.year", train=[1980, 2009]))
    dm.setup()
    batch = next(iter(dm.train_dataloader()))      # {"x": [B, C, lat, lon], ...}
    physical = dm.inverse_transform(batch["x"])
"""

from scidiff.data.datamodule import FieldDataModule
from scidiff.data.dataset import (
    FieldDataset,
    FieldMetadata,
    FieldSpec,
    ParamSpec,
    VariableSpec,
    coarsen_repeat,
    open_store,
)
from scidiff.data.splits import CoordinateSplit, FractionSplit, IndexSplit, check_disjoint
from scidiff.data.statistics import (
    ChannelSpec,
    ChannelStats,
    PhysicalBlock,
    RunningMoments,
    SampleSource,
    Statistics,
    compute_statistics,
)
from scidiff.data.transforms import ChannelTransform, resolve_transform

__all__ = [
    "ChannelSpec",
    "ChannelStats",
    "ChannelTransform",
    "CoordinateSplit",
    "FieldDataModule",
    "FieldDataset",
    "FieldMetadata",
    "FieldSpec",
    "FractionSplit",
    "IndexSplit",
    "ParamSpec",
    "PhysicalBlock",
    "RunningMoments",
    "SampleSource",
    "Statistics",
    "VariableSpec",
    "check_disjoint",
    "coarsen_repeat",
    "compute_statistics",
    "open_store",
    "resolve_transform",
]

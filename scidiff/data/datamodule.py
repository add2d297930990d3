"""``FieldDataModule``: splits, statistics, transforms and loaders for one store.

``setup()`` opens the store once for its layout (checking every configured
variable, dim and parameter), splits the samples, computes the statistics out
of core on the training split (or loads them from ``statistics_path``) and
builds one lazy :class:`~scidiff.data.FieldDataset` per split. Loaders use
``__getitems__`` (one read per variable per batch), optional workers (each opens
its own handle) and pinned memory.

It is a plain class (``scidiff.data`` does not import Lightning) with the methods of
a Lightning data module (``setup``, ``*_dataloader``, ``state_dict``,
``load_state_dict``, ``teardown``). To train with a ``lightning.Trainer``, wrap it in
:class:`scidiff.training.ResumableDataModule`, as ``scidiff-train`` does: that
``LightningDataModule`` shards and orders the training split itself, and under DDP
Lightning's ``DistributedSampler`` injection gives each rank a disjoint shard of the
validation and test loaders.

Everything later stages need is here: ``metadata`` (names, units, spatial dims
and coordinates, parameter names), ``statistics`` (``save_statistics`` writes the
JSON file to log to MLflow; ``state_dict`` goes into the checkpoint) and the
transforms (``inverse_transform`` and ``inverse_params`` back to physical units).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from scidiff.data.dataset import FieldDataset, FieldMetadata, MaskMode, open_store
from scidiff.data.splits import SPLIT_NAMES, FractionSplit
from scidiff.data.statistics import Statistics, compute_statistics, default_block_size, iter_blocks
from scidiff.data.transforms import ChannelTransform


class FieldDataModule:
    """Splits, statistics, transforms and loaders over a zarr/netCDF store (module docstring).

    Args:
        path, variables, spatial_dims, sample_dims, params, fields, embedding, mask, engine, open_kwargs:
            as for :class:`~scidiff.data.FieldDataset`.
        split: an object with ``indices(ds, sample_dims) -> {"train", "val", "test"}``
            (:class:`IndexSplit`, :class:`FractionSplit`, :class:`CoordinateSplit`);
            default ``FractionSplit(0.8, 0.1, 0.1)``.
        batch_size: training batch size; ``eval_batch_size`` (default the same) for val/test.
        num_workers: DataLoader workers (each opens its own store handle).
        pin_memory: default: when CUDA is available.
        persistent_workers: default: when ``num_workers > 0``.
        prefetch_factor: batches each worker reads ahead (``None``: torch's default).
        shuffle, drop_last: for the training loader; ``seed`` seeds its shuffling.
        statistics_path: a JSON statistics file: loaded if it exists (and checked against the
            configuration), otherwise computed and written there.
        stats_block_size: samples read at a time while computing statistics.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        variables: Sequence[Any],
        spatial_dims: Sequence[str],
        sample_dims: str | Sequence[str] = "sample",
        params: Sequence[Any] = (),
        fields: Sequence[Any] = (),
        embedding: Any = None,
        split: Any = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        mask: MaskMode = "auto",
        statistics_path: str | os.PathLike | None = None,
        stats_block_size: int | None = None,
        engine: str | None = None,
        open_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.path = os.fspath(path)
        self.split = split if split is not None else FractionSplit()
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = (num_workers > 0) if persistent_workers is None else bool(persistent_workers)
        self.prefetch_factor = prefetch_factor
        self.shuffle, self.drop_last, self.seed = bool(shuffle), bool(drop_last), int(seed)
        self.statistics_path = None if statistics_path is None else Path(statistics_path)
        self.stats_block_size = stats_block_size
        # Checks the layout now, so a bad config fails at instantiation, before any training.
        self._base = FieldDataset(
            self.path, variables, spatial_dims, sample_dims, params, fields,
            statistics=None, mask=mask, engine=engine, open_kwargs=open_kwargs, embedding=embedding,
        )
        self.split_indices: dict[str, np.ndarray] | None = None
        self.statistics: Statistics | None = None
        self.datasets: dict[str, FieldDataset] = {}

    # -- what later stages read -----------------------------------------------------------

    @property
    def metadata(self) -> FieldMetadata:
        """Names, units, spatial dims/coordinates and parameter names (no statistics needed)."""
        return self._base.metadata

    def _need_stats(self) -> Statistics:
        if self.statistics is None:
            raise RuntimeError("FieldDataModule: call setup() (or load_state_dict) before using the transforms")
        return self.statistics

    @property
    def x_transform(self) -> ChannelTransform:
        """Physical -> normalised for ``x``; has ``inverse`` and ``log_abs_det_jacobian``."""
        return self._need_stats().x_transform()

    @property
    def param_transform(self) -> ChannelTransform:
        return self._need_stats().param_transform()

    @property
    def has_mask(self) -> bool:
        """Whether batches carry ``mask``."""
        self._need_stats()
        return self._base.has_mask

    def open_store(self):
        """The store as an ``xarray.Dataset``, opened with this module's engine and options
        (the caller closes it): for variables the module does not read, e.g. a per-sample
        log-likelihood."""
        return open_store(self.path, self._base.engine, self._base.open_kwargs)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Physical ``[B, C, *S]`` -> normalised."""
        return self.x_transform(x)

    def inverse_transform(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised ``[B, C, *S]`` (model output) -> physical units; with ``mask``
        (1 = valid, broadcastable), missing points become NaN again, as in the store."""
        out = self.x_transform.inverse(x)
        if mask is not None:
            out = torch.where(torch.broadcast_to(mask != 0, out.shape), out, torch.full((), torch.nan, dtype=out.dtype))
        return out

    def transform_params(self, params: torch.Tensor) -> torch.Tensor:
        """Physical ``[B, P]`` (in the order of ``metadata.param_names``) -> normalised."""
        return self.param_transform(self._check_params(params))

    def inverse_params(self, params: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, P]`` -> physical units."""
        return self.param_transform.inverse(self._check_params(params))

    def _check_params(self, params: torch.Tensor) -> torch.Tensor:
        names = self.metadata.param_names
        if params.ndim != 2 or params.shape[1] != len(names):
            raise ValueError(
                f"params must be [B, {len(names)}] for the parameters {list(names)}, got shape {tuple(params.shape)}"
            )
        return params

    # -- lifecycle --------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Split, compute or load the statistics and build the datasets (``stage`` is
        unused: every split is prepared). Keeps statistics and splits already restored."""
        if self.split_indices is None:
            ds = open_store(self.path, self._base.engine, self._base.open_kwargs)
            try:
                self.split_indices = self.split.indices(ds, self._base.sample_dims)
            finally:
                ds.close()
        fresh = self.statistics is None
        if fresh:
            self.statistics = self._load_or_compute_statistics()
        self._build_datasets()
        if fresh:  # a restored run was checked when it started
            self.check_values()

    def check_values(self, splits: Sequence[str] = ("val", "test")) -> None:
        """Read every sample of ``splits`` once, as the loaders will, so that a value the
        training split did not have (NaN without a mask, +-inf, outside a log transform's
        domain, a missing parameter) fails now, naming the split, rather than at the first
        validation thousands of steps later. The training split was read by the statistics.

        Raises:
            ValueError: ``"<split> split of <store>: <what and which samples>"``.
        """
        for name in splits:
            dataset = self.datasets.get(name)
            if dataset is None or len(dataset) == 0:
                continue
            block = self.stats_block_size or default_block_size(dataset.sample_nbytes)
            for indices in iter_blocks(dataset.indices, int(block)):
                try:
                    dataset.read_batch(indices)
                except ValueError as err:
                    raise ValueError(f"{name} split of {self.path}: {err}") from None

    def _load_or_compute_statistics(self) -> Statistics:
        path = self.statistics_path
        if path is not None and path.exists():
            return Statistics.load(path)
        stats = compute_statistics(
            self._base, self.split_indices["train"], self.stats_block_size,
            info={"store": self.path, "split": "train", "sample_dims": list(self._base.sample_dims)},
        )
        if path is not None:
            stats.save(path)
        return stats

    def adopt_statistics(self, other: Statistics, what: str, parts: Sequence[str] = ("x",),
                         extra_fields: bool = False) -> None:
        """Normalise with ``other``'s statistics for ``parts`` (``x``, ``params``, ``fields``, ``embedding``):
        those of another run on the same variables (a latent run normalises its fields as its
        autoencoder was trained; a fine-tuning run everything as its base model). With
        ``extra_fields`` the data may have condition fields after ``other``'s (a ControlNet's new
        condition), which keep their own statistics. Call after :meth:`setup`; ``ValueError``
        naming ``what`` when the names or transforms differ."""
        import dataclasses

        mine = self._need_stats()
        labels = {"x": "variables", "params": "parameters", "fields": "condition fields",
                  "embedding": "embedding components"}
        changes = {}
        for part in parts:
            own, theirs = getattr(mine, part), getattr(other, part)
            names, other_names = [c.name for c in own], [c.name for c in theirs]
            shared = names[:len(other_names)] if part == "fields" and extra_fields else names
            if shared != other_names:
                raise ValueError(f"{what} normalised the {labels[part]} {other_names}, the data config has {names}")
            for a, b in zip(own, theirs):
                if (a.pointwise, a.log_offset) != (b.pointwise, b.log_offset):
                    raise ValueError(f"{what} transformed {a.name} with {b.pointwise}, the data config with "
                                     f"{a.pointwise}")
            changes[part] = tuple(theirs) + tuple(own[len(theirs):])
        # provenance: the adopted parts' (all of them: the other's own record)
        info = dict(other.info) if set(parts) >= {"x", "params", "fields"} else dict(mine.info)
        info["normalised_as"] = f"{what} ({', '.join(parts)})"
        self.statistics = dataclasses.replace(mine, **changes, info=info)
        self._build_datasets()

    def _build_datasets(self) -> None:
        self._base.set_statistics(self.statistics)  # validates the channels against the config
        self.datasets = {name: self._base.subset(self.split_indices[name]) for name in SPLIT_NAMES}

    def save_statistics(self, path: str | os.PathLike) -> Path:
        """Write the statistics JSON (e.g. beside the run, then ``mlflow.log_artifact``)."""
        return self._need_stats().save(path)

    def state_dict(self) -> dict[str, Any]:
        """Statistics, metadata and splits as plain python: what a checkpoint keeps (under
        the key of the Lightning data module that wraps this one, ``"ResumableDataModule"``)."""
        if self.statistics is None:
            return {}
        return {
            "statistics": self.statistics.state_dict(),
            "metadata": self.metadata.state_dict(),
            "split_indices": {k: v.tolist() for k, v in (self.split_indices or {}).items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the checkpoint's statistics (never recomputed on resume) and splits."""
        if not state_dict:
            return
        self.statistics = Statistics.from_state(state_dict["statistics"])
        if state_dict.get("split_indices"):
            self.split_indices = {k: np.asarray(v, np.int64) for k, v in state_dict["split_indices"].items()}
        if self.split_indices is not None:
            self._build_datasets()

    # -- loaders ------------------------------------------------------------------------------

    def _loader(self, name: str, train: bool) -> DataLoader:
        if not self.datasets:
            raise RuntimeError("FieldDataModule: call setup() before asking for loaders")
        dataset = self.datasets[name]
        if len(dataset) == 0:
            raise ValueError(f"the {name!r} split is empty; give it samples in the split config")
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=self.shuffle and train,
            drop_last=self.drop_last and train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed) if (self.shuffle and train) else None,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def teardown(self, stage: str | None = None) -> None:
        """Close every open store handle (they are reopened on next use)."""
        for ds in self.datasets.values():
            ds.close()
        self._base.close()

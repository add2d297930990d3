"""The Lightning side of the data: a ``LightningDataModule`` around a plain data module,
with a training data order that a resumed run reproduces exactly.

:class:`ResumableDataModule` is what ``scidiff-train`` hands to ``Trainer.fit``: it
wraps the plain :class:`~scidiff.data.FieldDataModule` (``scidiff.data`` imports no
Lightning) and forwards the hooks, the checkpoint state and every other attribute to
it. Checkpoints keep that state under the key ``"ResumableDataModule"``.

The order of epoch ``e`` is a pure function of ``(seed, e)``: a permutation drawn
from ``numpy.random.default_rng([seed, e])``, padded to a multiple of the number
of ranks and dealt round-robin (as ``DistributedSampler`` does), so every rank
reads a disjoint shard without Lightning replacing the sampler. The loader is
*stateful* in Lightning's sense (``state_dict`` / ``load_state_dict``): the fit
loop stores ``{epoch, batches_done}`` in every checkpoint and, on resume, the
first epoch skips the batches already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


class ResumableSampler(DistributedSampler):
    """Per-epoch seeded shuffling, rank sharding and a one-shot skip for resuming.

    A ``DistributedSampler`` by type only (``__init__`` is its own), so that Lightning
    keeps it under DDP instead of wrapping it in another sharding sampler.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        if num_samples < 1:
            raise ValueError("ResumableSampler: the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.batches_done = 0       # of the current epoch, updated by the training step
        self._skip_batches = 0      # set by load_state_dict, used by the next __iter__ only

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of each epoch."""
        if epoch != self.epoch:
            self._skip_batches = 0
        self.epoch = int(epoch)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices of ``epoch``, in order (before any skip)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        padded = len(self) * self.world_size
        order = np.concatenate([order, order[: padded - self.num_samples]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        # The list is built now, not lazily: iter() is called once per epoch, at a point
        # where the epoch and the skip are known.
        indices = self.epoch_indices(self.epoch)[self._skip_batches * self.batch_size :]
        self._skip_batches = 0
        self.batches_done = 0
        return iter(indices.tolist())

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed,
                "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state["seed"]) != self.seed or int(state["world_size"]) != self.world_size:
            raise ValueError(
                f"resume: the checkpoint's data order used seed={state['seed']} on {state['world_size']} "
                f"rank(s); this run has seed={self.seed} on {self.world_size}. Exact resume needs the same."
            )
        self.epoch = int(state["epoch"])
        self._skip_batches = int(state["batches_done"])
        self.batches_done = self._skip_batches


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose sampler's position is saved in checkpoints by Lightning."""

    sampler: ResumableSampler

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.batch_sampler.sampler.load_state_dict(state)


class ResumableDataModule(L.LightningDataModule):
    """The ``LightningDataModule`` of training: wraps a plain data module (e.g.
    :class:`~scidiff.data.FieldDataModule`), keeps its validation/test loaders,
    statistics and transforms as they are, and gives a :class:`ResumableLoader` over
    its training split.

    The wrapped module must have ``setup(stage)``, ``teardown(stage)``,
    ``state_dict()``, ``load_state_dict(state)``, ``val_dataloader()``,
    ``test_dataloader()``, ``datasets["train"]`` after ``setup``, and ``batch_size``,
    ``num_workers``, ``pin_memory``, ``drop_last``, ``seed`` and ``shuffle`` attributes
    (``prepare_data()``, ``persistent_workers`` and ``prefetch_factor`` are used when
    present). Attribute
    reads fall through to it (``dm.inverse_transform``, ``dm.metadata``...).
    """

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.sampler: ResumableSampler | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)

    def prepare_data(self) -> None:
        prepare = getattr(self.inner, "prepare_data", None)
        if prepare is not None:
            prepare()

    def setup(self, stage: str | None = None) -> None:
        self.inner.setup(stage)

    def teardown(self, stage: str | None = None) -> None:
        self.inner.teardown(stage)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def train_dataloader(self) -> ResumableLoader:
        inner = self.inner
        dataset: Dataset = inner.datasets["train"]
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.sampler = ResumableSampler(len(dataset), inner.batch_size, seed=inner.seed,
                                        shuffle=inner.shuffle, rank=rank, world_size=world)
        kwargs: dict[str, Any] = {}
        if inner.num_workers > 0:
            kwargs["persistent_workers"] = getattr(inner, "persistent_workers", False)
            if getattr(inner, "prefetch_factor", None) is not None:
                kwargs["prefetch_factor"] = inner.prefetch_factor
        return ResumableLoader(dataset, batch_size=inner.batch_size, sampler=self.sampler,
                               drop_last=inner.drop_last, num_workers=inner.num_workers,
                               pin_memory=inner.pin_memory, **kwargs)

    def val_dataloader(self):
        return self.inner.val_dataloader()

    def test_dataloader(self):
        return self.inner.test_dataloader()

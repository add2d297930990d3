"""Normalisation statistics, computed out of core on the training split.

:func:`compute_statistics` reads the training samples block by block (a block
is at most ``block_size`` samples, so memory stays bounded for stores larger
than RAM), warps each channel with its pointwise transform and merges per-block
moments in float64 with Chan et al.'s parallel update::

    n = n_a + n_b,   delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    M2   = M2_a + M2_b + delta^2 * n_a * n_b / n          (std = sqrt(M2 / n), ddof = 0)

NaN is a missing value (counted in ``nan_count``, excluded); +-inf is an error.
A channel with ``anomaly`` scaling also gets the same moments per grid point
(its ``point_mean`` and ``point_std`` maps), merged the same way.

:class:`Statistics` is a small frozen record: it round-trips through plain
python (``state_dict`` / ``from_state``, for checkpoints) and JSON (``save`` /
``load``, a file beside the run and an MLflow artifact), and builds the
transforms (:meth:`Statistics.x_transform` and friends).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from scidiff.data.atomic import atomic_write_text
from scidiff.data.transforms import (
    ChannelTransform,
    Pointwise,
    Scaling,
    affine_from_stats,
    warp_domain_ok,
)

FORMAT_VERSION = 1
DEFAULT_BLOCK_BYTES = 32 * 2**20
# anomaly scaling: a grid point's scale is at least this fraction of the channel's std, so a
# point (nearly) constant over the training split does not turn a new value there into a huge one
ANOMALY_STD_FLOOR = 0.01


@dataclass(frozen=True)
class ChannelStats:
    """Statistics of ``g(x)`` for one channel over the finite points of a split."""

    name: str
    pointwise: Pointwise
    scaling: Scaling
    log_offset: float
    count: int  # finite points used
    nan_count: int  # missing points
    mean: float
    std: float  # population std (ddof = 0)
    min: float
    max: float
    fixed_shift: float = 0.0  # used by scaling "fixed" only
    fixed_scale: float | None = None
    # scaling "anomaly" only: the spatial shape and, flattened in C order, each grid point's
    # mean and std; a point with no finite value in the split has the channel's mean and std
    point_shape: tuple[int, ...] | None = None
    point_mean: tuple[float, ...] | None = None
    point_std: tuple[float, ...] | None = None

    def affine(self) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
        """``(shift, scale)``: numbers, or for ``anomaly`` maps of shape ``point_shape`` (the
        scale floored at ``ANOMALY_STD_FLOOR`` times the channel's std)."""
        if self.scaling != "anomaly":
            return affine_from_stats(self.scaling, self.mean, self.std, self.min, self.max,
                                     self.fixed_shift, self.fixed_scale)
        if self.point_shape is None or self.point_mean is None or self.point_std is None:
            raise ValueError(f"variable {self.name!r} has anomaly scaling but no per-point statistics "
                             f"(statistics computed before it was configured? delete them to recompute)")
        shape = tuple(self.point_shape)
        mean = np.asarray(self.point_mean, np.float64).reshape(shape)
        std = np.asarray(self.point_std, np.float64).reshape(shape)
        return mean, np.maximum(std, ANOMALY_STD_FLOOR * self.std)


def _validate(stats: ChannelStats, kind: str) -> None:
    if stats.count == 0:
        raise ValueError(
            f"{kind} {stats.name!r} has no finite value in the training split "
            f"({stats.nan_count} points, all NaN): nothing to learn or normalise"
        )
    if stats.scaling in ("none", "fixed"):
        return
    spread = stats.std if stats.scaling == "zscore" else stats.max - stats.min
    if not spread > 1e-12 * max(1.0, abs(stats.mean)):
        raise ValueError(
            f"{kind} {stats.name!r} has zero variance in the training split "
            f"(constant {stats.mean:.6g} over {stats.count} points); {stats.scaling} scaling "
            f"would divide by zero: drop it or give it transform 'none'"
        )


@dataclass(frozen=True)
class Statistics:
    """Per-channel statistics of the target (``x``), the parameters, the conditioning fields and
    the components of the conditioning vector (``embedding``)."""

    x: tuple[ChannelStats, ...]
    params: tuple[ChannelStats, ...] = ()
    fields: tuple[ChannelStats, ...] = ()
    info: Mapping[str, Any] = field(default_factory=dict)  # provenance: store, split, sample count
    embedding: tuple[ChannelStats, ...] = ()

    @property
    def has_missing(self) -> bool:
        """Whether the target had missing (NaN) points in the split the statistics saw."""
        return any(c.nan_count > 0 for c in self.x)

    @staticmethod
    def _transform(channels: Sequence[ChannelStats]) -> ChannelTransform:
        affine = [c.affine() for c in channels]
        shifts, scales = [a[0] for a in affine], [a[1] for a in affine]
        grids = {tuple(c.point_shape) for c in channels if c.scaling == "anomaly"}
        if len(grids) > 1:
            raise ValueError(f"per-point (anomaly) statistics on different grids {sorted(grids)}: "
                             f"{[c.name for c in channels if c.scaling == 'anomaly']}")
        if grids:  # every channel as a map on the one grid
            grid = grids.pop()
            shifts = [np.broadcast_to(np.asarray(v, np.float64), grid) for v in shifts]
            scales = [np.broadcast_to(np.asarray(v, np.float64), grid) for v in scales]
            shifts, scales = np.stack(shifts), np.stack(scales)
        return ChannelTransform(
            [c.name for c in channels],
            [c.pointwise for c in channels],
            shifts,
            scales,
            [c.log_offset for c in channels],
        )

    def normalised_rms(self) -> float:
        """Root mean square of the normalised target over its channels and points: the data
        scale sigma_data of EDM preconditioning (1 for z-scored channels; ``minmax`` or
        ``none`` scaling give other values). Per channel sqrt(m^2 + s^2) with m, s the mean and
        std of the normalised values (for ``anomaly``, per grid point, averaged over the grid);
        channels weigh equally."""
        second = []
        for c in self.x:
            shift, scale = c.affine()
            if c.scaling == "anomaly":
                mean = np.asarray(c.point_mean, np.float64).reshape(shift.shape)
                std = np.asarray(c.point_std, np.float64).reshape(shift.shape)
                second.append(float(np.mean(((mean - shift) / scale) ** 2 + (std / scale) ** 2)))
            else:
                second.append(((c.mean - shift) / scale) ** 2 + (c.std / scale) ** 2)
        return math.sqrt(sum(second) / len(second))

    def x_transform(self) -> ChannelTransform:
        """Physical -> normalised for the target channels ``[B, C, *S]``."""
        return self._transform(self.x)

    def param_transform(self) -> ChannelTransform:
        """Physical -> normalised for the parameters ``[B, P]``."""
        return self._transform(self.params)

    def field_transform(self) -> ChannelTransform:
        """Physical -> normalised for the conditioning fields read from variables."""
        return self._transform(self.fields)

    def embedding_transform(self) -> ChannelTransform:
        """Physical -> normalised for the conditioning vector ``[B, E]``."""
        return self._transform(self.embedding)

    def state_dict(self) -> dict[str, Any]:
        """Plain python (JSON-able) state, for checkpoints; see :meth:`from_state`."""
        return {
            "format_version": FORMAT_VERSION,
            "x": [asdict(c) for c in self.x],
            "params": [asdict(c) for c in self.params],
            "fields": [asdict(c) for c in self.fields],
            "embedding": [asdict(c) for c in self.embedding],
            "info": dict(self.info),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Statistics:
        version = state.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"statistics format_version {version!r} is not {FORMAT_VERSION}")
        return cls(
            x=tuple(_channel_stats(c) for c in state["x"]),
            params=tuple(_channel_stats(c) for c in state["params"]),
            fields=tuple(_channel_stats(c) for c in state["fields"]),
            embedding=tuple(_channel_stats(c) for c in state.get("embedding", ())),
            info=dict(state.get("info", {})),
        )

    def save(self, path: str | Path) -> Path:
        """Write the statistics as JSON (a few kB) and return the path."""
        # atomic: DDP ranks may write the same file while another reads it
        return atomic_write_text(path, json.dumps(self.state_dict(), indent=1, default=_json_default))

    @classmethod
    def load(cls, path: str | Path) -> Statistics:
        path = Path(path)
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the statistics file {path}: {err}") from err
        return cls.from_state(state)


def _channel_stats(state: Mapping[str, Any]) -> ChannelStats:
    """A :class:`ChannelStats` from its plain state (lists back to tuples)."""
    state = dict(state)
    for key in ("point_shape", "point_mean", "point_std"):
        if state.get(key) is not None:
            state[key] = tuple(state[key])
    return ChannelStats(**state)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


class RunningMoments:
    """Count, mean, M2, min and max per channel, merged block by block in float64."""

    def __init__(self, num_channels: int) -> None:
        self.count = np.zeros(num_channels, np.int64)
        self.nan_count = np.zeros(num_channels, np.int64)
        self.mean = np.zeros(num_channels, np.float64)
        self.m2 = np.zeros(num_channels, np.float64)
        self.min = np.full(num_channels, np.inf)
        self.max = np.full(num_channels, -np.inf)

    def update(self, block: np.ndarray) -> None:
        """Merge a block ``[N, C, ...]`` (NaN = missing)."""
        c = self.count.shape[0]
        v = np.moveaxis(np.asarray(block, np.float64), 1, 0).reshape(c, -1)
        finite = ~np.isnan(v)
        n_b = finite.sum(axis=1)
        self.nan_count += v.shape[1] - n_b
        has = n_b > 0
        if not has.any():
            return
        v0 = np.where(finite, v, 0.0)
        mean_b = np.where(has, v0.sum(axis=1) / np.maximum(n_b, 1), 0.0)
        m2_b = (np.where(finite, v - mean_b[:, None], 0.0) ** 2).sum(axis=1)
        n = self.count + n_b
        delta = mean_b - self.mean
        safe_n = np.maximum(n, 1)
        self.mean = self.mean + delta * n_b / safe_n
        self.m2 = self.m2 + m2_b + delta**2 * self.count * n_b / safe_n
        self.count = n
        self.min = np.minimum(self.min, np.where(finite, v, np.inf).min(axis=1))
        self.max = np.maximum(self.max, np.where(finite, v, -np.inf).max(axis=1))

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / np.maximum(self.count, 1))


class PointMoments:
    """:class:`RunningMoments` of every grid point of every channel: blocks ``[N, C, *S]``."""

    def __init__(self, channel_shape: Sequence[int]) -> None:
        self.num_channels, *spatial = (int(n) for n in channel_shape)
        self.shape = tuple(spatial)
        self.moments = RunningMoments(self.num_channels * int(np.prod(self.shape, dtype=np.int64)))

    def update(self, block: np.ndarray) -> None:
        self.moments.update(np.asarray(block).reshape(block.shape[0], -1))

    def channel(self, i: int, fill_mean: float, fill_std: float) -> tuple[np.ndarray, np.ndarray]:
        """Channel ``i``'s mean and std maps ``[*S]``; points with no finite value get the fills."""
        size = int(np.prod(self.shape, dtype=np.int64))
        part = slice(i * size, (i + 1) * size)
        seen = self.moments.count[part] > 0
        mean = np.where(seen, self.moments.mean[part], fill_mean).reshape(self.shape)
        std = np.where(seen, self.moments.std[part], fill_std).reshape(self.shape)
        return mean, std


@dataclass(frozen=True)
class ChannelSpec:
    """How one channel is normalised: what :func:`compute_statistics` needs to know."""

    name: str
    pointwise: Pointwise = "none"
    scaling: Scaling = "zscore"
    log_offset: float = 0.0
    fixed_shift: float = 0.0
    fixed_scale: float | None = None


@dataclass(frozen=True)
class PhysicalBlock:
    """Samples in physical units, as read from the store (NaN = missing)."""

    x: np.ndarray  # [N, C, *S]
    params: np.ndarray | None  # [N, P]
    fields: np.ndarray | None  # [N, Cv, *S], the variable fields only
    embedding: np.ndarray | None = None  # [N, E]


class SampleSource(Protocol):
    """What :func:`compute_statistics` reads samples from; a
    :class:`~scidiff.data.FieldDataset` is one."""

    indices: np.ndarray  # the flat sample indices it serves
    sample_nbytes: int  # bytes of one sample's target channels (float32)

    def channel_specs(self) -> tuple[Sequence[ChannelSpec], ...]:
        """Specs of the target channels, the parameters, the variable fields and (optionally, a
        fourth entry) the embedding's components."""
        ...

    def read_physical(self, flat_indices: np.ndarray) -> PhysicalBlock:
        """The samples ``flat_indices`` in physical units."""
        ...


def _warp_np(block: np.ndarray, specs: Sequence[ChannelSpec], kind: str) -> np.ndarray:
    """Check the domain and apply each channel's pointwise warp, ``[N, C, ...]`` float64."""
    block = np.asarray(block, np.float64)
    if np.isinf(block).any():
        bad = [s.name for i, s in enumerate(specs) if np.isinf(block[:, i]).any()]
        raise ValueError(f"{kind} {bad} contain +-inf values; use NaN for missing points")
    out = block.copy()
    for i, s in enumerate(specs):
        if s.pointwise == "none":
            continue
        ch = block[:, i]
        if np.isfinite(ch).any() and not warp_domain_ok(float(np.nanmin(ch)), s.pointwise, s.log_offset):
            raise ValueError(
                f"{kind} {s.name!r} has values down to {np.nanmin(ch):.6g}, outside the domain of its "
                f"{s.pointwise!r} transform (log_offset={s.log_offset}); choose another transform or offset"
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            out[:, i] = np.log(ch + s.log_offset) if s.pointwise == "log" else np.log1p(ch)
    return out


def _finish(moments: RunningMoments, specs: Sequence[ChannelSpec], kind: str,
            points: PointMoments | None = None) -> tuple[ChannelStats, ...]:
    out = []
    for i, s in enumerate(specs):
        per_point = {}
        if s.scaling == "anomaly" and moments.count[i]:
            mean, std = points.channel(i, float(moments.mean[i]), float(moments.std[i]))
            per_point = {"point_shape": points.shape, "point_mean": tuple(mean.ravel().tolist()),
                         "point_std": tuple(std.ravel().tolist())}
        stats = ChannelStats(
            name=s.name, pointwise=s.pointwise, scaling=s.scaling, log_offset=float(s.log_offset),
            count=int(moments.count[i]), nan_count=int(moments.nan_count[i]),
            mean=float(moments.mean[i]), std=float(moments.std[i]),
            min=float(moments.min[i]) if moments.count[i] else math.nan,
            max=float(moments.max[i]) if moments.count[i] else math.nan,
            fixed_shift=float(s.fixed_shift), fixed_scale=None if s.fixed_scale is None else float(s.fixed_scale),
            **per_point,
        )
        _validate(stats, kind)
        out.append(stats)
    return tuple(out)


def default_block_size(sample_nbytes: int) -> int:
    """Samples read at a time when a whole split is read: about ``DEFAULT_BLOCK_BYTES`` of target data."""
    return max(1, DEFAULT_BLOCK_BYTES // max(1, int(sample_nbytes)))


def iter_blocks(indices: np.ndarray, block_size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of the sorted ``indices``, each at most ``block_size`` long and
    aligned to multiples of ``block_size`` in the store's sample index, so each block
    reads few store chunks when ``block_size`` is a multiple of the chunk length."""
    indices = np.sort(np.asarray(indices, np.int64))
    if indices.size == 0:
        return
    groups = indices // block_size
    cuts = np.flatnonzero(np.diff(groups)) + 1
    yield from np.split(indices, cuts)


def compute_statistics(
    dataset: SampleSource,
    indices: Sequence[int] | np.ndarray | None = None,
    block_size: int | None = None,
    info: Mapping[str, Any] | None = None,
) -> Statistics:
    """Statistics of ``dataset``'s samples ``indices`` (the training split), out of core.

    Args:
        dataset: what the samples are read from (a :class:`SampleSource`, e.g. a
            :class:`~scidiff.data.FieldDataset`); its channel specs say which warp and
            scaling each channel gets.
        indices: flat sample indices into the store (default: the dataset's own).
        block_size: samples read at a time (default: about 32 MiB of target data).
        info: provenance recorded in the statistics (store path, split, ...).

    Raises:
        ValueError: naming the channel, for an all-NaN channel, zero variance, +-inf
            values or values outside a log transform's domain.
    """
    indices = np.asarray(dataset.indices if indices is None else indices, np.int64)
    if indices.size == 0:
        raise ValueError("compute_statistics: no samples (is the training split empty?)")
    if block_size is None:
        block_size = default_block_size(dataset.sample_nbytes)
    x_specs, p_specs, f_specs, *rest = dataset.channel_specs()
    e_specs = rest[0] if rest else []
    for kind, specs in (("parameter", p_specs), ("embedding component", e_specs)):
        if any(s.scaling == "anomaly" for s in specs):
            raise ValueError(f"{kind}s {[s.name for s in specs if s.scaling == 'anomaly']} have no grid points: "
                             f"transform 'anomaly' is for fields; use 'zscore'")
    mx, mp, mf = RunningMoments(len(x_specs)), RunningMoments(len(p_specs)), RunningMoments(len(f_specs))
    me = RunningMoments(len(e_specs))
    points: dict[str, PointMoments] = {}  # "x" / "fields": per-point moments, if a channel needs them
    for block in iter_blocks(indices, int(block_size)):
        phys = dataset.read_physical(block)
        for kind, specs, moments, values in (("variable", x_specs, mx, phys.x),
                                             ("field variable", f_specs, mf, phys.fields)):
            if not specs:
                continue
            warped = _warp_np(values, specs, kind)
            moments.update(warped)
            if any(s.scaling == "anomaly" for s in specs):
                points.setdefault(kind, PointMoments(warped.shape[1:])).update(warped)
        if p_specs:
            mp.update(_warp_np(phys.params, p_specs, "parameter"))
        if e_specs:
            me.update(_warp_np(phys.embedding, e_specs, "embedding component"))
    meta = {"num_samples": int(indices.size), "block_size": int(block_size), **dict(info or {})}
    return Statistics(
        x=_finish(mx, x_specs, "variable", points.get("variable")),
        params=_finish(mp, p_specs, "parameter"),
        fields=_finish(mf, f_specs, "field variable", points.get("field variable")),
        embedding=_finish_embedding(me, e_specs),
        info=meta,
    )


def _finish_embedding(moments: RunningMoments, specs: Sequence[ChannelSpec]) -> tuple[ChannelStats, ...]:
    """An embedding's component statistics. A component constant over the training split (a
    fingerprint bit no training molecule sets) carries nothing to learn, but is no error: it is
    only centred (a fixed scaling of 1), so a new value still reaches the model."""
    specs = list(specs)
    for i, s in enumerate(specs):
        spread = moments.std[i] if s.scaling == "zscore" else moments.max[i] - moments.min[i]
        if s.scaling in ("zscore", "minmax") and moments.count[i] and not spread > 1e-12 * max(1.0, abs(moments.mean[i])):
            specs[i] = ChannelSpec(s.name, s.pointwise, "fixed", s.log_offset, float(moments.mean[i]), 1.0)
    return _finish(moments, specs, "embedding component")

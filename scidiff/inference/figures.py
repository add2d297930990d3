"""Figures of generated samples next to data, for fields of rank 1, 2 or 3."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _view(field: np.ndarray) -> np.ndarray:
    """A 1-D profile or a 2-D image of one channel ``[*S]``: 3-D fields show their middle slice
    along the first spatial axis."""
    if field.ndim == 3:
        return field[field.shape[0] // 2]
    return field


def samples_figure(
    data: np.ndarray,
    samples: np.ndarray,
    channel_names: Sequence[str] = (),
    units: Sequence[str] = (),
    title: str = "",
    row_labels: tuple[str, str] = ("data", "sample"),
) -> Figure:
    """Rows: data then samples (``[N, C, *S]`` each, physical units); one panel per
    member and channel. 1-D fields are line plots, 2-D images, 3-D the middle slice.
    Data and samples of a channel share one colour scale (or y-range); ``row_labels``
    name the two rows."""
    if data.ndim != samples.ndim or data.shape[1] != samples.shape[1]:
        raise ValueError(f"data {data.shape} and samples {samples.shape} must share channels and rank")
    rank = data.ndim - 2
    n, c = min(len(data), len(samples)), data.shape[1]
    fig, axes = plt.subplots(2 * c, n, figsize=(2.0 * n + 1, 2.0 * 2 * c), squeeze=False)
    for ch in range(c):
        name = channel_names[ch] if ch < len(channel_names) else f"channel {ch}"
        unit = f" [{units[ch]}]" if ch < len(units) and units[ch] else ""
        both = np.concatenate([data[:n, ch].ravel(), samples[:n, ch].ravel()])
        both = both[np.isfinite(both)]
        lo, hi = (np.percentile(both, [1, 99]) if both.size else (0.0, 1.0))
        for row, (label, arr) in enumerate(zip(row_labels, (data, samples))):
            for j in range(n):
                ax = axes[2 * ch + row, j]
                view = _view(arr[j, ch])
                if rank == 1:
                    ax.plot(view, lw=0.8)
                    ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
                else:
                    im = ax.imshow(view, origin="lower", vmin=lo, vmax=hi, cmap="RdBu_r")
                    ax.set_xticks([])
                    ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(f"{label}\n{name}{unit}", fontsize=8)
        if rank > 1:
            fig.colorbar(im, ax=axes[2 * ch : 2 * ch + 2, :].ravel().tolist(), shrink=0.8)
    if title:
        fig.suptitle(title + (" (middle slices)" if rank == 3 else ""), fontsize=9)
    return fig

"""Figures of an :class:`~scidiff.evaluation.result.Evaluation` (matplotlib, Agg backend).

Each function returns a ``Figure``; :func:`evaluation_figures` draws all that apply
and saves them as PNG files. Everything is in physical units except the bound terms,
which are per dimension of the normalised data (the figure says so).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from scidiff.inference.figures import samples_figure  # noqa: E402


DIMENSIONLESS = ("", "1", "-", "dimensionless", "none")


def _label(names, units, c: int) -> str:
    name = names[c] if c < len(names) else f"channel {c}"
    unit = units[c] if c < len(units) else ""
    return f"{name} [{unit}]" if str(unit).strip().lower() not in DIMENSIONLESS else name


def bound_terms_figure(terms_bpd: np.ndarray, prior_bpd: float, title: str = "") -> Figure:
    """The mean bound terms L_t (bits/dim, normalised data) against t, log scale.

    L_0 (the reconstruction term, a negative log *density*: it may be negative) is
    marked apart, since a log axis cannot show it; the prior term is in the legend.
    """
    t = np.arange(terms_bpd.size)
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    pos = terms_bpd[1:] > 0
    ax.semilogy(t[1:][pos], terms_bpd[1:][pos], lw=1.0, label="L_t, t >= 1 (KL of the reverse step)")
    ax.axhline(abs(prior_bpd) if prior_bpd != 0 else np.nan, ls=":", color="grey",
               label=f"prior L_T = {prior_bpd:.3g}")
    ax.set_xlabel("timestep t (0 = least noisy)")
    ax.set_ylabel("bits / dim (normalised data)")
    ax.set_title(title or "variational bound terms", fontsize=9)
    ax.text(0.98, 0.95, f"L_0 (reconstruction) = {terms_bpd[0]:.4g} bits/dim", transform=ax.transAxes,
            ha="right", va="top", fontsize=8)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def _power(unit: str) -> str:
    """``K`` -> ``K^2``, ``W m-2`` -> ``(W m-2)^2``."""
    return f"{unit}^2" if unit.replace("_", "").isalnum() else f"({unit})^2"


def _length(grid_units, d: int) -> str:
    """The volume element of a ``d``-dim grid: ``(grid spacing)^2``, ``km``, ``deg_N · deg_E``."""
    units = list(grid_units) if grid_units and len(grid_units) == d else ["grid spacing"] * d
    if len(set(units)) == 1:
        u = units[0]
        u = u if u.replace("_", "").isalnum() else f"({u})"
        return u if d == 1 else f"{u}^{d}"
    return " · ".join(u if u.replace("_", "").isalnum() else f"({u})" for u in units)


def spectrum_ylabel(unit: str, grid_units=(), d: int = 2) -> str:
    """``power spectral density P(k) [unit^2 · (grid unit)^d]`` (a dimensionless field,
    unit ``1``: just the volume element, e.g. ``[(grid spacing)^2]``)."""
    unit = str(unit or "").strip()
    length = _length(grid_units, d)
    if unit.lower() in DIMENSIONLESS:
        return f"power spectral density P(k) [{length}]"
    return f"power spectral density P(k) [{_power(unit)} · {length}]"


def wavenumber_xlabel(grid_units=(), d: int = 2) -> str:
    units = set(grid_units) if grid_units and len(grid_units) == d else {"grid spacing"}
    per = units.pop() if len(units) == 1 else "unit length of each axis"
    return f"wavenumber |k| [cycles per {per}]"


def spectra_figure(wavenumber: np.ndarray, power_data: np.ndarray, power_samples: np.ndarray,
                   names=(), units=(), title: str = "", power_floor: np.ndarray | None = None,
                   grid_units=(), spatial_rank: int | None = None) -> Figure:
    """Mean radial power spectra of data, samples and (optional) the floor ensembles of
    real fields, one panel per channel (log-log), in the field's units."""
    c = power_data.shape[0]
    d = spatial_rank or (len(grid_units) if grid_units else 2)
    fig, axes = plt.subplots(1, c, figsize=(4.4 * c, 3.6), squeeze=False)
    curves = [(power_data, "k-", "data"), (power_samples, "C1--", "samples")]
    if power_floor is not None:
        curves.append((power_floor, "C2:", "floor (real fields, nearest conditions)"))
    for ch in range(c):
        ax = axes[0, ch]
        for power, style, label in curves:
            ok = np.isfinite(power[ch]) & (power[ch] > 0)
            ax.loglog(wavenumber[ok], power[ch][ok], style, lw=1.2, label=label)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(wavenumber_xlabel(grid_units, d), fontsize=8)
        ax.set_ylabel(spectrum_ylabel(units[ch] if ch < len(units) else "", grid_units, d), fontsize=8)
        ax.set_title(_label(names, units, ch), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title or "radial power spectra", fontsize=9)
    fig.tight_layout()
    return fig


def rank_histogram_figure(hist: np.ndarray, names=(), title: str = "", floor: np.ndarray | None = None) -> Figure:
    """Rank histograms ``[C, M + 1]`` with the flat line of a calibrated ensemble, and
    beside the model's bars those of the floor ensembles (real fields), if given."""
    c, r = hist.shape
    fig, axes = plt.subplots(1, c, figsize=(3.8 * c, 3.2), squeeze=False)
    width = 0.9 if floor is None else 0.42
    for ch in range(c):
        ax = axes[0, ch]
        shift = 0.0 if floor is None else -0.22
        ax.bar(np.arange(r) + shift, hist[ch], width=width, color="C0", label="model")
        if floor is not None:
            ax.bar(np.arange(r) + 0.22, floor[ch], width=width, color="C2", alpha=0.8, label="floor (real fields)")
        ax.axhline(1.0 / r, color="k", ls="--", lw=1.0, label="calibrated")
        top = np.nanmax([np.nanmax(hist[ch]), 1.0 / r] + ([np.nanmax(floor[ch])] if floor is not None else []))
        ax.set_ylim(0.0, 1.45 * top)  # room for the legend above the bars
        ax.set_xlabel(f"rank of the data among {r - 1} members")
        ax.set_ylabel("relative frequency")
        ax.set_title(names[ch] if ch < len(names) else f"channel {ch}", fontsize=9)
        ax.legend(fontsize=7, ncol=3 if floor is not None else 1, loc="upper center")
    fig.suptitle(title or "rank histograms", fontsize=9)
    fig.tight_layout()
    return fig


def maps_figure(maps: dict[str, np.ndarray], names=(), units=(), title: str = "") -> Figure:
    """CRPS and bias maps of 2-D fields (rows: channels; columns: CRPS, bias, std ratio)."""
    crps, bias = maps["crps"], maps["bias"]
    ratio = maps["std_samples"] / maps["std_data"]
    c = crps.shape[0]
    fig, axes = plt.subplots(c, 3, figsize=(11.0, 3.2 * c), squeeze=False)
    for ch in range(c):
        label = _label(names, units, ch)
        lim = float(np.nanmax(np.abs(bias[ch]))) if np.isfinite(bias[ch]).any() else 1.0
        for ax, arr, cmap, kw, what in (
            (axes[ch, 0], crps[ch], "viridis", {}, "CRPS"),
            (axes[ch, 1], bias[ch], "RdBu_r", {"vmin": -lim, "vmax": lim}, "bias (samples - data)"),
            (axes[ch, 2], ratio[ch], "PuOr_r", {"vmin": 0.0, "vmax": 2.0}, "std ratio (samples / data)"),
        ):
            im = ax.imshow(arr, origin="lower", cmap=cmap, **kw)
            ax.set_title(f"{what}\n{label}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def evaluation_figures(evaluation, out_dir: str | Path) -> list[Path]:
    """Draw every figure that applies to ``evaluation`` and save them as PNGs in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = evaluation
    split = ev.split
    figures: list[tuple[str, Figure]] = []
    if ev.panels_data is not None and ev.panels_samples is not None:
        figures.append(("samples.png", samples_figure(
            ev.panels_data, ev.panels_samples, ev.channel_names, ev.units,
            title=f"{split}: data (top) and a sample with the same conditions (bottom)")))
    if ev.wavenumber is not None:
        figures.append(("power_spectra.png", spectra_figure(
            ev.wavenumber, ev.power_data, ev.power_samples, ev.channel_names, ev.units,
            title=f"{split}: radial power spectra", power_floor=getattr(ev, "power_floor", None),
            grid_units=getattr(ev, "grid_units", ()), spatial_rank=len(ev.spatial_dims))))
    if ev.terms is not None:
        figures.append(("bound_terms.png", bound_terms_figure(
            ev.terms, ev.scalars.get("prior_bpd", 0.0),
            title=f"{split}: bound terms; total {ev.scalars['bpd']:.4g} bits/dim in physical units")))
    if ev.rank_histogram is not None:
        figures.append(("rank_histogram.png", rank_histogram_figure(
            ev.rank_histogram, ev.channel_names, title=f"{split}: rank histograms",
            floor=getattr(ev, "rank_histogram_floor", None))))
    if ev.maps and len(ev.spatial_dims) == 2:
        figures.append(("maps.png", maps_figure(ev.maps, ev.channel_names, ev.units, title=f"{split}: maps")))
    paths = []
    for name, fig in figures:
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


__all__ = [
    "bound_terms_figure",
    "evaluation_figures",
    "maps_figure",
    "rank_histogram_figure",
    "spectra_figure",
    "spectrum_ylabel",
    "wavenumber_xlabel",
]

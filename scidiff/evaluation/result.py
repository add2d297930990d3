"""What :func:`~scidiff.evaluation.run.evaluate` gives back: an :class:`Evaluation`, or an
:class:`EvaluationError` naming the setting or the file that made it impossible.

The :class:`Evaluation` is plain data (numpy arrays, floats, the verdict); the evaluation
file, MLflow and the figures are written from it (:mod:`~scidiff.evaluation.report`,
:mod:`~scidiff.evaluation.plots`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scidiff.evaluation.verdict import Verdict


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked; the message names the setting or the file."""


@dataclass
class Evaluation:
    """Everything :func:`~scidiff.evaluation.run.evaluate` computed, as numpy arrays and floats (physical units).

    Attributes:
        split: the split evaluated; ``indices`` ``[N]`` the samples' flat store indices.
        scalars: metric name -> value, names as logged under ``eval/<split>/`` (e.g.
            ``bpd``, ``bpd_se``, ``crps/<var>``).
        per_sample: name -> ``[N]`` (``bpd``, ``bpd_model``, ``log_det_bpd``, ``prior_bpd``,
            ``reconstruction_bpd``, ``bpd_se`` (importance), ``bpd/<variance>``, and with
            a true log-likelihood in the store ``true_nll_bpd`` and ``gap/<variance>``,
            ``gap/ode``, or ``conditional_nll_bpd`` and ``gap_conditional/...``).
        terms: ``[T]`` mean per-timestep bound terms in bits/dim (model units; column 0 is
            L_0): the exact terms, or with the importance estimator their unbiased
            (Horvitz-Thompson) estimates from the sampled timesteps (zero where no
            sample drew t; ``info["terms"]`` says which); either way they sum, with the
            mean prior term ``prior_bpd``, to the mean ``bpd_model``.
        wavenumber ``[K]``, power_data / power_samples ``[C, K]``: mean radial spectra.
        rank_histogram: ``[C, M + 1]`` relative frequencies.
        maps: name -> ``[C, *S]`` (``crps``, ``bias``, ``std_samples``, ``std_data``).
        panels_data / panels_samples: ``[n, C, *S]`` the first data samples and member 0.
        channel_names, units, spatial_dims, coords: from the checkpoint's metadata.
        info: provenance (checkpoint, sha256, estimator, ...), plain python.
        power_floor ``[C, K]``, rank_histogram_floor ``[C, M + 1]``: the same for the floor
            ensembles (real fields; :mod:`scidiff.evaluation.floor`); their scalars are
            ``floor/<metric>`` in ``scalars``.
        floor_indices: ``[N, M]`` store indices of each sample's floor ensemble.
        verdict: every sample metric against its floor (:mod:`scidiff.evaluation.verdict`),
            None without sampling or floor.
        grid_units: per spatial dim, the unit of its coordinate (``units`` attribute), or
            ``grid spacing`` (no coordinate, unit steps), or ``<dim> units``.
    """

    split: str
    indices: np.ndarray
    scalars: dict[str, float]
    per_sample: dict[str, np.ndarray]
    terms: np.ndarray | None
    wavenumber: np.ndarray | None
    power_data: np.ndarray | None
    power_samples: np.ndarray | None
    rank_histogram: np.ndarray | None
    maps: dict[str, np.ndarray]
    panels_data: np.ndarray | None
    panels_samples: np.ndarray | None
    channel_names: tuple[str, ...]
    units: tuple[str, ...]
    spatial_dims: tuple[str, ...]
    coords: dict[str, np.ndarray]
    info: dict[str, Any]
    power_floor: np.ndarray | None = None
    rank_histogram_floor: np.ndarray | None = None
    floor_indices: np.ndarray | None = None
    verdict: Verdict | None = None
    grid_units: tuple[str, ...] = ()


__all__ = ["Evaluation", "EvaluationError"]

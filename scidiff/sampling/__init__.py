"""Ensemble generation to zarr: parameter sets, members, ranks, resumption.

* :mod:`~scidiff.sampling.grid`      -- parameter sets from a grid, a list or a CSV
  file, checked against the checkpoint's names and training ranges;
* :mod:`~scidiff.sampling.ensemble`  -- this rank's missing members generated in
  batches (through :mod:`scidiff.inference.generation`); each rank owns a contiguous
  block of samples (parameter sets) and writes all their members, so ranks beyond the
  number of samples idle;
* :mod:`~scidiff.sampling.store`     -- the zarr store (``docs/architecture.md#ensemble-output``):
  ``(sample, member, *spatial)`` in physical units, one chunk per sample holding all
  its members ``(1, M, *spatial)``, and the completion record ``done(sample, member)``
  in the sub-group ``progress``, each flag written after its member's data;
* :mod:`~scidiff.sampling.observations` -- sparse observations for inpainting;
* :mod:`~scidiff.sampling.conditions` -- spatial condition fields (coarse fields,
  static maps, sst) read from a store and normalised as in training;
* :mod:`~scidiff.sampling.tracking`  -- the run recorded in MLflow;
* :mod:`~scidiff.sampling.workflow`  -- :func:`sample_ensemble`, what
  ``scidiff-sample`` runs.

    from scidiff.sampling import sample_ensemble
    sample_ensemble({"checkpoint": "outputs/quickstart/run", "params": {"grid": {"spectral_index": [1.5, 2.5],
                     "amplitude": [1.0]}}, "members": 8, "seed": 0, "out": "ens.zarr",
                     "sampler": {"name": "ddim", "steps": 50}, "guidance": {"scale": 1.0}})
"""

from scidiff.sampling.conditions import ConditionError, Conditions, load_conditions
from scidiff.sampling.ensemble import FieldConditions, run_ensemble
from scidiff.sampling.grid import ParameterError, ParameterSets, RangeWarning, check_parameter_sets, parameter_sets
from scidiff.sampling.store import EnsembleStore, StoreError, create_store
from scidiff.sampling.workflow import SampleError, sample_ensemble

__all__ = [
    "ConditionError",
    "Conditions",
    "EnsembleStore",
    "FieldConditions",
    "ParameterError",
    "ParameterSets",
    "RangeWarning",
    "SampleError",
    "StoreError",
    "check_parameter_sets",
    "create_store",
    "load_conditions",
    "parameter_sets",
    "run_ensemble",
    "sample_ensemble",
]

"""Every metric gives the same result on one process and split over two ranks.

Simulated: two instances each see half the data, one merges the other's state
with the declared reductions (``Metric.merge_state``). Real: two gloo processes
each update on their half and ``compute()`` syncs the states. The float64 sums
add in another order, hence rtol 1e-9 rather than exact equality.
"""

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scidiff.evaluation import (
    CRPS,
    AtomCounts,
    BiasStdMaps,
    BitsPerDim,
    BoundTerms,
    DomainMeanStdRatio,
    EnergyScore,
    PowerSpectrum,
    RankHistogram,
    ShellCorrelation,
    SpectralError,
    SpreadSkillRatio,
    Wasserstein1,
)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    forecasts = torch.randn(6, 5, 2, 12, 10, generator=g, dtype=torch.float64)
    obs = torch.randn(6, 2, 12, 10, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 1, 12, 10, generator=g) > 0.2
    weights = torch.cos(torch.linspace(-1.2, 1.2, 12, dtype=torch.float64)).reshape(
        12, 1
    )
    voxels = torch.rand(6, 2, 8, 10, 12, generator=g, dtype=torch.float64)
    nats = 100 * torch.rand(6, generator=g, dtype=torch.float64)
    dims = torch.randint(100, 240, (6,), generator=g)
    terms = torch.rand(6, 7, generator=g, dtype=torch.float64)
    ensemble = {"forecasts": forecasts, "obs": obs, "mask": mask, "weights": weights}
    return {
        "crps": (lambda: CRPS(num_channels=2), ensemble),
        "crps_map": (lambda: CRPS(num_channels=2, spatial_shape=(12, 10)), ensemble),
        "spread_skill": (lambda: SpreadSkillRatio(num_channels=2), ensemble),
        "energy": (lambda: EnergyScore(), ensemble),
        "rank_histogram": (
            lambda: RankHistogram(num_channels=2, num_members=5),
            ensemble,
        ),
        "power_spectrum": (
            lambda: PowerSpectrum(
                num_channels=2, spatial_shape=(12, 10), spacing=(1.0, 2.0)
            ),
            {"x": obs},
        ),
        "spectral_error": (
            lambda: SpectralError(num_channels=2, spatial_shape=(12, 10)),
            {"samples": forecasts, "data": obs},
        ),
        "shell_correlation": (
            lambda: ShellCorrelation(num_channels=2, spatial_shape=(12, 10), spacing=(1.0, 2.0)),
            {"samples": forecasts, "mask": mask},
        ),
        "bias_std": (
            lambda: BiasStdMaps(num_channels=2, spatial_shape=(12, 10)),
            {"samples": forecasts, "data": obs, "mask": mask},
        ),
        "domain_mean": (
            lambda: DomainMeanStdRatio(num_channels=2),
            {"samples": forecasts, "data": obs, "mask": mask, "weights": weights},
        ),
        "wasserstein": (
            lambda: Wasserstein1(num_channels=2, value_range=(-5.0, 5.0), num_bins=200),
            {"samples": forecasts, "data": obs, "mask": mask, "weights": weights},
        ),
        "bits_per_dim": (lambda: BitsPerDim(), {"nats": nats, "dims": dims}),
        "bound_terms": (lambda: BoundTerms(num_timesteps=7), {"terms": terms}),
        "atom_counts": (
            lambda: AtomCounts(num_channels=2, threshold=0.5),
            {"density": voxels},
        ),
    }


def _half(kwargs: dict, rank: int) -> dict:
    """Rank ``rank``'s share of a batch: half of every batched input (samples 0-2 or 3-5)."""
    part = {}
    for name, value in kwargs.items():
        batched = (
            isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == 6
        )
        if name == "weights":
            batched = False
        part[name] = value[3 * rank : 3 * rank + 3] if batched else value
    return part


def _as_tensors(result) -> dict[str, torch.Tensor]:
    if isinstance(result, dict):
        return result
    if dataclasses.is_dataclass(result):
        return {
            f.name: getattr(result, f.name)
            for f in dataclasses.fields(result)
            if isinstance(getattr(result, f.name), torch.Tensor)
        }
    return {"value": result}


def _assert_same(got, expected, name: str) -> None:
    got, expected = _as_tensors(got), _as_tensors(expected)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(
            got[key],
            expected[key],
            rtol=1e-9,
            atol=1e-12,
            equal_nan=True,
            msg=f"{name}.{key}",
        )


@pytest.mark.parametrize("name", list(_inputs().keys()))
def test_merged_rank_states_equal_one_process(name):
    make, kwargs = _inputs()[name]
    whole = make()
    whole.update(**kwargs)
    ranks = [make(), make()]
    for rank, metric in enumerate(ranks):
        metric.update(**_half(kwargs, rank))
    ranks[0].merge_state(ranks[1])
    _assert_same(_results(ranks[0]), _results(whole), name)
    assert all(reduction is not None for reduction in whole._reductions.values())


def _results(metric) -> dict[str, torch.Tensor]:
    """``compute()`` and the extra synced read-outs some metrics have."""
    results = _as_tensors(metric.compute())
    if isinstance(metric, SpectralError):
        samples, data = metric.spectra()
        results |= {"samples_power": samples.power, "data_power": data.power}
    if isinstance(metric, Wasserstein1):
        results |= dict(zip(("samples_out", "data_out"), metric.out_of_range()))
    if isinstance(metric, (BitsPerDim, ShellCorrelation)):
        results["standard_error"] = metric.standard_error()
    if isinstance(metric, DomainMeanStdRatio):
        results |= {f"std_{group}": metric.std(group) for group in ("samples", "data")}
    return results


def _worker(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
    )
    try:
        results = {}
        for name, (make, kwargs) in _inputs().items():
            metric = make()
            metric.update(**_half(kwargs, rank))
            results[name] = _results(metric)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(
        _worker,
        args=(2, str(tmp_path / "rendezvous"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    results = torch.load(tmp_path / "results.pt")
    for name, (make, kwargs) in _inputs().items():
        whole = make()
        whole.update(**kwargs)
        _assert_same(results[name], _results(whole), name)

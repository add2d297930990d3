"""Ensemble generation with the tiny conditional checkpoint: seeds, batch-size invariance,
physical units, resumption without recomputation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import xarray as xr

from scidiff.inference import DDIM, GuidanceSpec, generate, member_seed, member_seeds
from scidiff.inference.runtime import DistContext
from scidiff.sampling.ensemble import rank_groups, rank_members, run_ensemble
from scidiff.sampling.grid import ParameterSets
from scidiff.sampling.store import create_store
from scidiff.inference.checkpoint import load_pretrained

SETS = ParameterSets(names=("spectral_index", "amplitude"), values=np.array([[1.5, 1.0], [3.0, 1.5]]))
# guidance w = 2 (both halves of the model in one call) and eta > 0 (noise at every step)
SAMPLER = DDIM(steps=4, eta=0.5)
GUIDANCE = GuidanceSpec(scale=2.0, rescale=0.3)


@pytest.fixture(scope="module")
def pretrained(trained_run):
    return load_pretrained(trained_run / "outputs" / "quickstart" / "tiny")


def run(pretrained, path, batch_size, members=3, seed=7, **kw):
    seeds = member_seeds(seed, len(SETS), members)
    store = create_store(path, metadata=pretrained.metadata, sets=SETS, seeds=seeds,
                         attrs={"identity": {"seed": seed, "members": members}})
    result = run_ensemble(pretrained, store, SETS, seeds, sampler=SAMPLER, guidance=GUIDANCE,
                          batch_size=batch_size, progress=False, **kw)
    return store, result


def test_seeds_depend_only_on_base_seed_sample_and_member():
    small, large = member_seeds(0, 2, 3), member_seeds(0, 5, 7)
    np.testing.assert_array_equal(small, large[:2, :3])
    assert small[1, 2] == member_seed(0, 1, 2)
    assert len(np.unique(large)) == large.size
    assert member_seed(1, 1, 2) != member_seed(0, 1, 2)
    assert member_seed(0, 1, 2) != member_seed(0, 2, 1)
    assert (large >= 0).all()


def test_ranks_split_members_round_robin():
    parts = [rank_members(3, 5, r, 4) for r in range(4)]
    flat = sorted(p for part in parts for p in part)
    assert flat == [(j, k) for j in range(3) for k in range(5)]
    assert parts[1][:2] == [(0, 1), (1, 0)]


def test_ranks_take_whole_micro_batches():
    parts = [rank_groups(3, 5, 4, r, 2) for r in range(2)]
    assert [len(g) for g in parts[0]] == [4, 4] and [len(g) for g in parts[1]] == [4, 3]
    flat = sorted(jk for part in parts for g in part for jk in g)
    assert flat == [(j, k) for j in range(3) for k in range(5)]
    assert parts[1][0] == [(0, 4), (1, 0), (1, 1), (1, 2)]


class OneOfRanks(DistContext):
    """Rank ``rank`` of ``world_size``, run one after another in this process (no collectives)."""

    def barrier(self):
        pass

    def sum(self, values):
        return list(values)

    def max(self, value):
        return value


def test_members_are_bitwise_identical_for_any_batch_size_and_ranks(pretrained, tmp_path):
    """Fixed micro-batches of 4 over 2 x 5 members (the last one padded): batch sizes 1, 7 and
    16, and two ranks, give the same bits, with batched denoiser calls."""
    stores = {}
    for b in (1, 7, 16):
        stores[b], result = run(pretrained, tmp_path / f"b{b}.zarr", batch_size=b, members=5, micro_batch=4)
        assert (result.written, result.skipped) == (10, 0)
    seeds = member_seeds(7, len(SETS), 5)
    ranked = create_store(tmp_path / "ranks.zarr", metadata=pretrained.metadata, sets=SETS, seeds=seeds,
                          attrs={"identity": {"seed": 7, "members": 5}})
    for rank in (0, 1):
        run_ensemble(pretrained, ranked, SETS, seeds, sampler=SAMPLER, guidance=GUIDANCE, batch_size=3,
                     micro_batch=4, progress=False, dist_ctx=OneOfRanks(rank, 2))
    assert ranked.done().all()
    a = xr.open_zarr(stores[1].path)["field"].values
    assert np.isfinite(a).all()
    for other in (stores[7].path, stores[16].path, ranked.path):
        np.testing.assert_array_equal(a, xr.open_zarr(other)["field"].values)
    # members differ from each other and between parameter sets
    assert np.abs(a[0, 0] - a[0, 1]).max() > 0.1 and np.abs(a[0, 0] - a[1, 0]).max() > 0.1


def test_batched_denoiser_calls_agree_to_rounding(pretrained):
    """Without fixed micro-batches a member agrees with itself in another batch only to float32
    rounding (the kernels block differently per batch size)."""
    seeds = [int(s) for s in member_seeds(3, 1, 4)[0]]
    params = torch.as_tensor(SETS.values[[0, 0, 1, 1]])
    kw = dict(sampler=SAMPLER, guidance=GUIDANCE)
    batched = generate(pretrained, params, seeds, **kw)
    single = torch.cat([generate(pretrained, params[i:i + 1], seeds[i:i + 1], **kw) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_output_is_in_physical_units(pretrained, tmp_path):
    """Give the checkpoint a temperature-like normalisation (mean 273.15 K, std 10 K): the store
    must hold 273.15 + 10 x (what the model generates), not the model's ~N(0, 1) numbers."""
    base, _ = run(pretrained, tmp_path / "base.zarr", batch_size=3)
    x = pretrained.statistics.x[0]
    kelvin = dataclasses.replace(pretrained.statistics, x=(dataclasses.replace(x, mean=273.15, std=10.0),))
    shifted = dataclasses.replace(pretrained, statistics=kelvin)
    warm, _ = run(shifted, tmp_path / "kelvin.zarr", batch_size=3)
    model_units = (xr.open_zarr(base.path)["field"].values - x.mean) / x.std
    stored = xr.open_zarr(warm.path)["field"].values
    np.testing.assert_allclose(stored, 273.15 + 10.0 * model_units, rtol=0, atol=2e-3)
    assert 260 < stored.mean() < 286 and 2.0 < stored.std() < 50.0


def test_interrupted_run_resumes_without_recomputing(pretrained, tmp_path):
    full, _ = run(pretrained, tmp_path / "full.zarr", batch_size=2, members=4, micro_batch=2)

    class Crash(RuntimeError):
        pass

    def crash_after_two_batches(batch, seen=[]):  # noqa: B006 - state across calls
        seen.append(batch)
        if len(seen) == 2:
            raise Crash

    path = tmp_path / "resumed.zarr"
    with pytest.raises(Crash):
        run(pretrained, path, batch_size=2, members=4, micro_batch=2, on_batch=crash_after_two_batches)
    store = type(full).open(path)
    done_before = store.done().copy()
    assert done_before.sum() == 4
    generated = []
    seeds = member_seeds(7, len(SETS), 4)
    result = run_ensemble(pretrained, store, SETS, seeds, sampler=SAMPLER, guidance=GUIDANCE, batch_size=3,
                          micro_batch=2, progress=False, on_batch=generated.extend)
    assert (result.written, result.skipped) == (4, 4)
    assert not any(done_before[j, k] for j, k in generated)
    assert store.done().all()
    np.testing.assert_array_equal(xr.open_zarr(path)["field"].values, xr.open_zarr(full.path)["field"].values)

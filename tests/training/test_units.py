"""EMA, learning-rate schedule, resumable sampler, atomic checkpoints, per-bucket loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from scidiff.training import EMA, ResumableSampler, atomic_torch_save, newest_checkpoint, safe_torch_load, warmup_cosine


def test_ema_follows_the_closed_form():
    net = nn.Linear(1, 1, bias=False)
    ema = EMA(net, decay=0.9, warmup=10)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema.model.weight.data.fill_(0.0)
    expected = 0.0
    for n in range(30):
        with torch.no_grad():
            net.weight.fill_(float(n + 1))
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * (n + 1)
        ema.update(net)
    assert ema.model.weight.item() == pytest.approx(expected, rel=1e-6)
    assert int(ema.num_updates) == 30
    assert "num_updates" in ema.state_dict() and not ema.model.weight.requires_grad


def test_warmup_cosine_values():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    lrs = []
    for _ in range(111):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1)


def test_sampler_shards_and_skips():
    n, bs = 10, 2
    full = [ResumableSampler(n, bs, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in full:
        s.set_epoch(1)
    shards = [list(s) for s in full]
    assert sorted(shards[0] + shards[1]) == sorted(range(n))       # disjoint, complete
    assert list(full[0]) == shards[0]                               # same epoch, same order
    full[0].set_epoch(2)
    assert list(full[0]) != shards[0]
    resumed = ResumableSampler(n, bs, seed=3, rank=0, world_size=2)
    resumed.load_state_dict({"epoch": 1, "batches_done": 1, "seed": 3, "world_size": 2})
    assert list(resumed) == shards[0][bs:]                          # skips one batch, once
    assert list(resumed) == shards[0]
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({"epoch": 1, "batches_done": 1, "seed": 4, "world_size": 2})


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "c.ckpt"
    atomic_torch_save({"w": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"w": Boom()}, path)
    assert torch.equal(safe_torch_load(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]        # no temporary left behind
    assert newest_checkpoint(tmp_path) == path


def test_checkpoint_loading_refuses_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"obj": np.random.default_rng(0)}, path)               # an arbitrary python object
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        safe_torch_load(path)

"""Denoiser contract shared by the UNet and the DiT: shapes, dependence on t and on
the conditions, classifier-free-guidance drop, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from tests.nets.conftest import GRIDS, randomize_zeros

from scidiff.conditioning import Conditioning


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("dims", "shape", "patch"), GRIDS)
def test_shapes_any_rank(make, batch, dims, shape, patch):
    model = make(2, dims, patch_size=patch)
    x = torch.randn(batch, 2, *shape)
    out = model(x, torch.randint(0, 1000, (batch,)), None)
    assert out.shape == (batch, 2, *shape)


@pytest.mark.parametrize(("dims", "shape", "patch"), GRIDS)
def test_learned_variance_doubles_channels(make, dims, shape, patch):
    model = make(3, dims, patch_size=patch, learned_variance=True)
    out = model(torch.randn(2, 3, *shape), torch.tensor([0, 999]))
    assert out.shape == (2, 6, *shape)


def test_output_depends_on_t(make):
    model = randomize_zeros(make(2, 2, patch_size=(4, 8))).eval()
    x = torch.randn(2, 2, 24, 40)
    a = model(x, torch.tensor([3, 3]))
    b = model(x, torch.tensor([500, 500]))
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()
    # per-sample t: changing sample 1's t leaves sample 0 alone
    c = model(x, torch.tensor([3, 500]))
    torch.testing.assert_close(c[0], a[0])
    torch.testing.assert_close(c[1], b[1])


def test_params_matter_and_drop_removes_them(make):
    model = randomize_zeros(make(2, 2, patch_size=(4, 8), num_params=3)).eval()
    x = torch.randn(2, 2, 24, 40)
    t = torch.tensor([10, 700])
    p1, p2 = torch.randn(2, 3), torch.randn(2, 3)
    a = model(x, t, Conditioning(params=p1))
    b = model(x, t, Conditioning(params=p2))
    assert ((a - b).abs().flatten(1).mean(1) > 1e-4).all()

    all_dropped = torch.ones(2, dtype=torch.bool)
    da = model(x, t, Conditioning(params=p1, drop=all_dropped))
    db = model(x, t, Conditioning(params=p2, drop=all_dropped))
    assert torch.equal(da, db)
    # no cond, or cond without params, is the null condition too
    assert torch.equal(model(x, t, None), da)
    assert torch.equal(
        model(x, t, Conditioning(drop=torch.zeros(2, dtype=torch.bool))), da
    )
    # NaN placeholders in dropped rows never reach the output
    assert torch.equal(
        model(
            x,
            t,
            Conditioning(params=torch.full((2, 3), float("nan")), drop=all_dropped),
        ),
        da,
    )

    # per-sample drop: only the kept sample sees its parameters
    mixed = torch.tensor([True, False])
    ma = model(x, t, Conditioning(params=p1, drop=mixed))
    mb = model(x, t, Conditioning(params=p2, drop=mixed))
    assert torch.equal(ma[0], mb[0])
    assert (ma[1] - mb[1]).abs().mean() > 1e-4


def test_fourier_param_features(make):
    model = randomize_zeros(
        make(1, 1, patch_size=4, num_params=2, param_fourier_features=16)
    ).eval()
    x, t = torch.randn(2, 1, 32), torch.tensor([5, 5])
    a = model(x, t, Conditioning(params=torch.zeros(2, 2)))
    b = model(x, t, Conditioning(params=torch.full((2, 2), 0.1)))
    assert (a - b).abs().mean() > 1e-4


def test_embedding_matters_and_drop_removes_it(make):
    model = randomize_zeros(make(1, 3, patch_size=4, embedding_dim=8)).eval()
    x, t = torch.randn(2, 1, 8, 12, 16), torch.tensor([1, 2])
    e1, e2 = torch.randn(2, 8), torch.randn(2, 8)
    a = model(x, t, Conditioning(embedding=e1))
    b = model(x, t, Conditioning(embedding=e2))
    assert (a - b).abs().mean() > 1e-4
    drop = torch.ones(2, dtype=torch.bool)
    assert torch.equal(
        model(x, t, Conditioning(embedding=e1, drop=drop)), model(x, t, None)
    )


def test_fields_matter_resample_and_drop(make):
    model = randomize_zeros(make(2, 2, patch_size=(4, 8), field_channels=2)).eval()
    x, t = torch.randn(2, 2, 24, 40), torch.tensor([50, 50])
    f1, f2 = torch.randn(2, 2, 24, 40), torch.randn(2, 2, 24, 40)
    a = model(x, t, Conditioning(fields=f1))
    b = model(x, t, Conditioning(fields=f2))
    assert (a - b).abs().mean() > 1e-4
    drop = torch.ones(2, dtype=torch.bool)
    null = model(x, t, None)
    assert torch.equal(model(x, t, Conditioning(fields=f1, drop=drop)), null)
    # the null condition is not the same as a condition that happens to be zero
    zero = model(x, t, Conditioning(fields=torch.zeros(2, 2, 24, 40)))
    assert (zero - null).abs().mean() > 1e-4
    # a coarse field (downscaling) is resampled to the grid of x
    coarse = model(x, t, Conditioning(fields=torch.randn(2, 2, 6, 10)))
    assert coarse.shape == (2, 2, 24, 40)
    # a constant coarse field resamples to the same constant field
    torch.testing.assert_close(
        model(x, t, Conditioning(fields=torch.full((2, 2, 6, 10), 0.7))),
        model(x, t, Conditioning(fields=torch.full((2, 2, 24, 40), 0.7))),
    )


def test_field_resample_error_mode(make):
    model = make(1, 2, patch_size=4, field_channels=1, field_resample="error")
    with pytest.raises(ValueError, match=r"\(6, 10\).*\(24, 40\)"):
        model(
            torch.randn(1, 1, 24, 40),
            torch.tensor([0]),
            Conditioning(fields=torch.randn(1, 1, 6, 10)),
        )


def test_autocast_bf16(make):
    model = make(1, 2, patch_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 1, 16, 24), torch.tensor([1, 2]))
    assert out.shape == (2, 1, 16, 24) and torch.isfinite(out).all()


# ---------------------------------------------------------------- bad input


def test_wrong_channel_count(make):
    model = make(3, 2)
    with pytest.raises(ValueError, match=r"\[B, 3, S0, S1\].*\(2, 4, 24, 40\)"):
        model(torch.randn(2, 4, 24, 40), torch.tensor([0, 1]))


def test_wrong_rank(make):
    model = make(3, 2)
    with pytest.raises(ValueError, match=r"\[B, 3, S0, S1\].*\(2, 3, 8, 24, 40\)"):
        model(torch.randn(2, 3, 8, 24, 40), torch.tensor([0, 1]))


def test_wrong_t(make):
    model = make(1, 1)
    with pytest.raises(
        ValueError, match=r"t must have shape \[B\] = \[2\], got \(3,\)"
    ):
        model(torch.randn(2, 1, 32), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer timesteps"):
        model(torch.randn(2, 1, 32), torch.tensor([0.5, 1.0]))


def test_params_of_wrong_length(make):
    model = make(1, 1, num_params=3)
    with pytest.raises(ValueError, match=r"\[B, 3\].*\(2, 4\)"):
        model(
            torch.randn(2, 1, 32),
            torch.tensor([0, 1]),
            Conditioning(params=torch.randn(2, 4)),
        )


def test_condition_the_model_was_not_built_for(make):
    model = make(1, 1)
    with pytest.raises(ValueError, match=r"num_params=0"):
        model(
            torch.randn(2, 1, 32),
            torch.tensor([0, 1]),
            Conditioning(params=torch.randn(2, 4)),
        )
    with pytest.raises(ValueError, match=r"field_channels=0"):
        model(
            torch.randn(2, 1, 32),
            torch.tensor([0, 1]),
            Conditioning(fields=torch.randn(2, 1, 32)),
        )
    with pytest.raises(ValueError, match=r"embedding_dim=0"):
        model(
            torch.randn(2, 1, 32),
            torch.tensor([0, 1]),
            Conditioning(embedding=torch.randn(2, 4)),
        )


def test_fields_of_wrong_channels_and_batch(make):
    model = make(1, 2, field_channels=2)
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"\[B, 2, S0', S1'\].*\(2, 3, 16, 16\)"):
        model(x, torch.tensor([0, 1]), Conditioning(fields=torch.randn(2, 3, 16, 16)))
    with pytest.raises(ValueError, match="batch size 3.*batch size 2"):
        model(x, torch.tensor([0, 1]), Conditioning(fields=torch.randn(3, 2, 16, 16)))


@pytest.mark.parametrize("dims", [0, 4])
def test_unsupported_rank(make, dims):
    with pytest.raises(ValueError, match="dims"):
        make(1, dims)


@pytest.mark.parametrize(("dims", "shape", "patch"), GRIDS)
def test_gradient_checkpointing_gives_the_same_gradients(make, dims, shape, patch):
    plain = randomize_zeros(make(1, dims, patch_size=patch, num_params=2))
    torch.manual_seed(0)
    ckpt = make(1, dims, patch_size=patch, num_params=2, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, cond = (
        torch.randn(2, 1, *shape),
        torch.tensor([3, 400]),
        Conditioning(params=torch.randn(2, 2)),
    )
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        model(x, t, cond).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])

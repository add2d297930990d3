import math

import pytest
import torch

from scidiff.data import ChannelTransform, resolve_transform


def _transform():
    # one channel per warp; scales chosen so a wrong sign or factor shows
    return ChannelTransform(
        ["a", "b", "c"], ["none", "log", "log1p"], shift=[3.0, 0.5, -1.0], scale=[2.0, 0.25, 4.0],
        log_offset=[0.0, 0.1, 0.0],
    )


def _positive(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64) * 5 + 0.01


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 7), (2, 3, 4, 5), (1, 3, 2, 3, 4)])
def test_round_trip_any_rank(shape):
    t = _transform()
    x = _positive(shape)
    assert torch.allclose(t.inverse(t(x)), x, rtol=1e-10, atol=1e-12)


def test_forward_values():
    t = _transform()
    x = torch.tensor([[5.0, 0.9, math.e - 1]], dtype=torch.float64)
    # (5-3)/2, (log(1.0)-0.5)/0.25, (log1p(e-1)+1)/4
    assert torch.allclose(t(x), torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64))


def test_minmax_maps_to_unit_interval():
    pointwise, scaling = resolve_transform("minmax")
    assert (pointwise, scaling) == ("none", "minmax")
    from scidiff.data.transforms import affine_from_stats

    shift, scale = affine_from_stats("minmax", mean=0.0, std=1.0, vmin=2.0, vmax=10.0)
    t = ChannelTransform(["v"], ["none"], [shift], [scale])
    assert t(torch.tensor([[2.0], [10.0], [6.0]])).flatten().tolist() == [-1.0, 1.0, 0.0]


def _autograd_logdet(t, x):
    out = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        jac = torch.autograd.functional.jacobian(lambda v: t(v.reshape(xb.shape)).reshape(-1), xb.reshape(-1))
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(3, 3), (2, 3, 4), (2, 3, 2, 3)])
def test_log_det_matches_autograd(shape):
    t = _transform()
    x = _positive(shape, seed=1)
    ld = t.log_abs_det_jacobian(x)
    assert ld.shape == (shape[0],)
    assert torch.allclose(ld, _autograd_logdet(t, x), rtol=1e-10, atol=1e-10)


def test_log_det_with_mask_counts_valid_points_only():
    t = _transform()
    x = _positive((2, 3, 4), seed=2)
    mask = torch.ones_like(x)
    mask[0, 1, :2] = 0
    mask[1, :, 3] = 0
    x_nan = x.clone()
    x_nan[mask == 0] = float("nan")  # missing points may hold anything
    ld = t.log_abs_det_jacobian(x_nan, mask)
    # Jacobian restricted to the valid coordinates, by autograd
    expected = []
    for b in range(2):
        valid = mask[b].reshape(-1).bool()

        def f(v, b=b, valid=valid):
            full = x[b].reshape(-1).clone()
            full[valid] = v
            return t(full.reshape(1, *x.shape[1:])).reshape(-1)[valid]

        jac = torch.autograd.functional.jacobian(f, x[b].reshape(-1)[valid])
        expected.append(torch.linalg.slogdet(jac).logabsdet)
    assert torch.allclose(ld, torch.stack(expected), rtol=1e-10)
    assert torch.isfinite(ld).all()


def test_log_det_zscore_closed_form():
    t = ChannelTransform(["a"], ["none"], [0.0], [3.0])
    x = torch.zeros(4, 1, 5, 6)
    assert torch.allclose(t.log_abs_det_jacobian(x), torch.full((4,), -30 * math.log(3.0), dtype=torch.float64))


def test_state_round_trip_and_select():
    t = _transform()
    t2 = ChannelTransform.from_state(t.state_dict())
    x = _positive((2, 3, 5))
    assert torch.equal(t(x), t2(x))
    sub = t.select(["c", "a"])
    assert torch.allclose(sub(x[:, [2, 0]]), t(x)[:, [2, 0]])


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="pointwise\\[a\\]"):
        ChannelTransform(["a"], ["sqrt"], [0.0], [1.0])
    with pytest.raises(ValueError, match="scale must be finite and > 0.*'a'"):
        ChannelTransform(["a"], ["none"], [0.0], [0.0])
    with pytest.raises(ValueError, match="disagree in length"):
        ChannelTransform(["a", "b"], ["none"], [0.0], [1.0])
    with pytest.raises(ValueError, match="transform='boxcox'"):
        resolve_transform("boxcox")
    with pytest.raises(ValueError, match="2 entries"):
        _transform().select(["a", "b"])(torch.zeros(1, 3))


def _per_point(spatial):
    """Channel 'a' per grid point (a shift and a scale map), 'b' one number broadcast."""
    g = torch.Generator().manual_seed(3)
    shift = torch.stack([torch.randn(spatial, generator=g, dtype=torch.float64), torch.full(spatial, 0.5)])
    scale = torch.stack([torch.rand(spatial, generator=g, dtype=torch.float64) + 0.2, torch.full(spatial, 0.25)])
    return ChannelTransform(["a", "b"], ["none", "log"], shift, scale, log_offset=[0.0, 0.1])


@pytest.mark.parametrize("spatial", [(7,), (4, 5), (2, 3, 4)])
def test_per_point_maps_round_trip_and_log_det_at_any_rank(spatial):
    t = _per_point(spatial)
    assert t.grid_shape == spatial
    x = _positive((2, 2, *spatial), seed=2)
    y = t(x)
    # each point with its own shift and scale
    assert torch.allclose(y[:, 0], (x[:, 0] - t.shift[0]) / t.scale[0], rtol=1e-12)
    assert torch.allclose(t.inverse(y), x, rtol=1e-10, atol=1e-12)
    assert torch.allclose(t.log_abs_det_jacobian(x), _autograd_logdet(t, x), rtol=1e-10, atol=1e-10)
    again = ChannelTransform.from_state(t.state_dict())
    assert torch.equal(again(x), y) and torch.equal(t.select(["b", "a"])(x.flip(1)), y.flip(1))
    assert "per point" in repr(t)


def test_per_point_maps_refuse_another_grid_by_channel():
    t = _per_point((4, 5))
    with pytest.raises(ValueError, match=r"\['a'\] are normalised per grid point .* \(4, 5\).* \(4, 6\)"):
        t(torch.ones(1, 2, 4, 6))
    with pytest.raises(ValueError, match="scale must be finite and > 0; it is not for \\['b'\\]"):
        ChannelTransform(["a", "b"], ["none", "none"], torch.zeros(2, 3), torch.tensor([[1.0, 1, 1], [1, 0, 1]]))


def test_point_weighted_log_det_is_the_weighted_sum_of_the_points_terms():
    """With area weights (normalised to a mean of 1) the log-determinant's per-point mean is the
    weighted mean of the per-point log-derivatives -log scale_p, which differ from point to point."""
    t = _per_point((4, 5))
    x = _positive((3, 2, 4, 5), seed=4)
    w = torch.linspace(0.2, 1.8, 4, dtype=torch.float64)[:, None].expand(4, 5)
    w = w / w.mean()
    per_point = torch.log(1 / (x[:, 1] + 0.1)) - math.log(0.25)  # 'b': log warp, one scale
    expected = (-(torch.log(t.scale[0]) * w).sum() + (per_point * w).sum(dim=(1, 2)))
    assert torch.allclose(t.log_abs_det_jacobian(x, point_weights=w), expected, rtol=1e-12)
    assert torch.allclose(t.log_abs_det_jacobian(x, point_weights=torch.ones(4, 5)), t.log_abs_det_jacobian(x))
    assert not torch.allclose(t.log_abs_det_jacobian(x, point_weights=w), t.log_abs_det_jacobian(x))

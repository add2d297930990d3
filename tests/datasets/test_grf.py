import numpy as np
import pytest
import xarray as xr
from scipy.stats import multivariate_normal

from scidiff_datasets import cli, grf


def dense_covariance(shape, amplitude, spectral_index):
    """Covariance of the periodic field from its definition, without FFTs:
    C(x, x') = (1/N) sum_m P(k_m) cos(k_m . (x - x')), P(0) = A k_min^-n."""
    n_points = int(np.prod(shape))
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    pos = np.stack([g.ravel() for g in grids], axis=1)  # [N, d] grid positions (= displacements)
    k = np.stack([2 * np.pi * np.asarray(m) / np.asarray(shape) for m in pos], axis=0)  # mode m -> k_m
    k = np.where(k > np.pi, k - 2 * np.pi, k)  # fold to (-pi, pi]; cos is unchanged but |k| is not
    kmag = np.linalg.norm(k, axis=1)
    kmag[0] = 2 * np.pi / max(shape)
    power = amplitude * kmag ** (-spectral_index)
    c_of_r = (power[None, :] * np.cos(pos @ k.T)).sum(axis=1) / n_points  # [displacements]
    strides = np.cumprod((1,) + tuple(shape[::-1]))[:-1][::-1]
    disp = (pos[:, None, :] - pos[None, :, :]) % np.asarray(shape)
    return c_of_r[(disp * strides).sum(-1)]


def test_tiny_store_schema(tiny_store):
    ds = xr.open_zarr(tiny_store("grf"))
    assert ds.field.dims == ("sample", "y", "x")
    assert ds.field.shape == (64, 32, 32)
    assert ds.field.dtype == np.float32 and ds.log_likelihood.dtype == np.float64
    for name in ("field", "spectral_index", "amplitude", "log_likelihood", "x", "y"):
        assert "units" in ds[name].attrs and "long_name" in ds[name].attrs, name
    assert ds.log_likelihood.units == "nat"
    assert ds.attrs["parameters"].split() == ["spectral_index", "amplitude"]
    assert ds.attrs["generator"] == "grf" and ds.attrs["seed"] == 3 and ds.attrs["size"] == "tiny"
    n, a = ds.spectral_index.values, ds.amplitude.values
    assert n.min() >= 1.0 and n.max() <= 3.5 and n.std() > 0.3
    assert a.min() >= 0.5 and a.max() <= 2.0
    np.testing.assert_array_equal(ds.x.values, np.arange(32.0))


def test_stored_log_likelihood_matches_dense_gaussian(tiny_store):
    ds = xr.open_zarr(tiny_store("grf")).isel(sample=[0, 1]).load()
    for j in range(2):
        a, n = float(ds.amplitude[j]), float(ds.spectral_index[j])
        cov = dense_covariance((32, 32), a, n)
        expected = multivariate_normal(mean=np.zeros(cov.shape[0]), cov=cov).logpdf(
            ds.field[j].values.astype(np.float64).ravel())
        assert ds.log_likelihood[j].item() == pytest.approx(expected, rel=1e-9, abs=1e-6)


def test_non_square_3d_log_likelihood_and_shape(tmp_path):
    out = tmp_path / "g3.zarr"
    assert cli.main(["grf", "--out", str(out), "--size", "tiny", "--dims", "3", "--shape", "3", "4", "5",
                     "--num-samples", "5", "--seed", "1", "-q"]) == 0
    ds = xr.open_zarr(out).load()
    assert ds.field.dims == ("sample", "z", "y", "x") and ds.field.shape == (5, 3, 4, 5)
    for j in range(5):
        cov = dense_covariance((3, 4, 5), float(ds.amplitude[j]), float(ds.spectral_index[j]))
        expected = multivariate_normal(mean=np.zeros(60), cov=cov).logpdf(ds.field[j].values.ravel())
        assert ds.log_likelihood[j].item() == pytest.approx(expected, rel=1e-9)
    # samples really are draws from that Gaussian: the whitened field has unit variance
    cov = dense_covariance((3, 4, 5), 1.0, 2.0)
    assert np.linalg.eigvalsh(cov).min() > 0


def test_1d_profiles_log_likelihood_and_schema(tmp_path):
    out = tmp_path / "g1.zarr"
    assert cli.main(["grf", "--out", str(out), "--size", "tiny", "--dims", "1", "--shape", "24",
                     "--num-samples", "4", "--seed", "2", "-q"]) == 0
    ds = xr.open_zarr(out).load()
    assert ds.field.dims == ("sample", "x") and ds.field.shape == (4, 24)
    assert ds.attrs["spatial_dims"] == "x" and ds.attrs["dims"] == 1
    for j in range(4):
        cov = dense_covariance((24,), float(ds.amplitude[j]), float(ds.spectral_index[j]))
        expected = multivariate_normal(mean=np.zeros(24), cov=cov).logpdf(ds.field[j].values.astype(np.float64))
        assert ds.log_likelihood[j].item() == pytest.approx(expected, rel=1e-9)
    assert grf.SIZES["tiny"][1] == (64, (64,))


def radial_power(fields):
    """Periodogram |fftn f|^2 / N averaged over samples and |k| bins -> (k, P)."""
    shape = fields.shape[1:]
    power = (np.abs(np.fft.fftn(fields, axes=tuple(range(1, fields.ndim)))) ** 2).mean(0) / np.prod(shape)
    k = grf.wavenumber(shape)
    edges = np.geomspace(2 * np.pi / max(shape) * 0.999, k.max() * 1.001, 16)
    idx = np.digitize(k.ravel(), edges)
    centres, values = [], []
    for b in range(1, len(edges)):
        sel = idx == b
        if sel.sum() >= 4:
            centres.append(np.exp(np.log(k.ravel()[sel]).mean()))
            values.append(power.ravel()[sel].mean())
    return np.array(centres), np.array(values)


@pytest.mark.parametrize("dims,shape,n", [(1, ["512"], 2.0), (2, ["48", "64"], 2.5), (3, ["16", "20", "24"], 1.5)])
def test_measured_spectral_slope_matches_requested(tmp_path, dims, shape, n):
    out = tmp_path / "slope.zarr"
    cli.main(["grf", "--out", str(out), "--size", "tiny", "--dims", str(dims), "--shape", *shape,
              "--num-samples", "64", "--spectral-index", str(n), str(n), "--amplitude", "1.5", "1.5", "-q"])
    ds = xr.open_zarr(out)
    k, p = radial_power(ds.field.values.astype(np.float64))
    slope, intercept = np.polyfit(np.log(k), np.log(p), 1)
    # binning power-law values in log-k bins biases the slope by far less than this
    assert slope == pytest.approx(-n, abs=0.06)
    assert np.exp(intercept) == pytest.approx(1.5, rel=0.15)


def test_per_sample_slope_tracks_stored_index(tiny_store):
    """Regress log |F(m)|^2 on log |k_m| over the modes of each sample: |F|^2 / (N P) is
    chi^2_2 / 2 (chi^2_1 at self-conjugate modes), whose log has a constant mean, so the
    slope estimates -n without bias."""
    ds = xr.open_zarr(tiny_store("grf")).load()
    fields = ds.field.values.astype(np.float64)
    log_k = np.log(grf.wavenumber(fields.shape[1:]).ravel()[1:])
    log_p = np.log(np.abs(np.fft.fftn(fields, axes=(1, 2))) ** 2).reshape(len(fields), -1)[:, 1:]
    fits = np.array([-np.polyfit(log_k, lp, 1)[0] for lp in log_p])
    err = fits - ds.spectral_index.values
    # var(log Exp) = pi^2/6 per independent mode; m and -m carry the same |F|, so ~N/2 of them
    sigma = np.sqrt(np.pi**2 / 6 / (log_k.size / 2 * log_k.var()))
    assert 0.05 < sigma < 0.15
    assert np.abs(err).max() < 4.5 * sigma
    assert np.abs(err.mean()) < 3 * sigma / np.sqrt(len(err))
    assert err.std() == pytest.approx(sigma, rel=0.3)
    assert np.corrcoef(fits, ds.spectral_index.values)[0, 1] > 0.98


def test_log_likelihood_equals_whitened_noise_density():
    """f = C^{1/2} w, so log p(f) = log N(w; 0, I) - 1/2 log det C = ... with det C = prod P_m."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 6, 10))
    a, n = np.array([0.7, 1.0, 1.9]), np.array([1.2, 2.0, 3.3])
    f = grf.sample_fields(w, a, n)
    logdet = np.log(grf.power_spectrum((6, 10), a, n)).sum(axis=(1, 2))
    expected = -0.5 * (w**2).sum(axis=(1, 2)) - 0.5 * 60 * np.log(2 * np.pi) - 0.5 * logdet
    np.testing.assert_allclose(grf.log_likelihood(f, a, n), expected, rtol=1e-12)

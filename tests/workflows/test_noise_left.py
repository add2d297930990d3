"""workflows/noise_left.py: the fraction of the noise a denoiser leaves, by wavenumber and noise level."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from scidiff.diffusion import GaussianDiffusion, NoiseSchedule
from scidiff.diffusion.analytic import GaussianFieldDenoiser
from tests.docs.test_pages import load_workflow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "workflows" / "noise_left.py"


def _field_and_exact_denoiser(count: int):
    """(n, P(k) [1, n], the v-prediction cosine chain, its exact denoiser, ``count`` fields [count, 1, n]) of a
    stationary periodic Gaussian field on 64 points with P(k) ~ k^-2.5."""
    n = 64
    k = torch.fft.fftfreq(n, d=1.0 / n).abs().double()
    power = (0.5 * k.clamp_min(1.0) ** -2.5).unsqueeze(0)
    diffusion = GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000), prediction="v")
    exact = GaussianFieldDenoiser(diffusion, power)
    return n, power, diffusion, exact, exact.sample(count, generator=torch.Generator().manual_seed(1))


def test_exact_denoiser_leaves_the_wiener_fraction():
    """A stationary periodic Gaussian field (1-D, P(k) ~ k^-2.5) and its exact denoiser: at every level and
    wavenumber the noise left is S / sqrt(S^2 + N^2), S^2 = P(k), N^2 = (sigma / alpha)^2, within the
    sampling error of 4096 fields (from near 1 at the largest scales to 0.02 at the smallest)."""
    nl = load_workflow(SCRIPT)
    n, power, diffusion, exact, x0 = _field_and_exact_denoiser(4096)
    timesteps = [0, 30, 300]
    left, sn, scale = nl.noise_left(exact, diffusion, x0, None, timesteps, torch.Generator().manual_seed(2))
    p = power[0, : n // 2 + 1]
    expected = (p / (p + scale[:, None] ** 2)).sqrt()
    assert left.shape == sn.shape == (len(timesteps), n // 2 + 1)
    assert expected.max() > 0.95 and expected[:, 1:].min() < 0.05
    rel = (left[:, 1:] - expected[:, 1:]).abs() / expected[:, 1:]
    assert rel.max() < 0.06, rel
    # the signal-to-noise column is P / N^2 from the same fields
    assert ((sn[:, 1:] / (p[1:] / scale[:, None] ** 2).sqrt() - 1).abs() < 0.06).all()
    # a denoiser that removes nothing leaves all the noise: v = 0, x0_hat = alpha x_t (alpha^2 = 0.999 at t = 10)
    def removes_nothing(x_in, t, cond):
        return torch.zeros_like(x_in)

    left0, _, _ = nl.noise_left(removes_nothing, diffusion, x0, None, [10], torch.Generator().manual_seed(2))
    assert (left0[0, 1:] > 0.9).all()


def test_restarted_from_real_fields_the_exact_denoiser_keeps_their_small_scales():
    """DDIM through every timestep from real fields noised to t0: the exact denoiser returns their small scales
    from t0 = 100 as from t0 = 0 (where only the last x0 prediction acts, which shrinks modes weaker than the
    lowest noise level); a denoiser that removes nothing returns the noise."""
    import types

    nl = load_workflow(SCRIPT)
    _, _, diffusion, exact, x0 = _field_and_exact_denoiser(512)
    model = types.SimpleNamespace(diffusion=diffusion, denoiser=exact, to_physical=lambda x: x)
    real = nl.high_pass_std(x0, 16)
    last_only = nl.high_pass_std(nl.restarted(model, x0, None, 0, torch.Generator().manual_seed(2)), 16) / real
    from_100 = nl.high_pass_std(nl.restarted(model, x0, None, 100, torch.Generator().manual_seed(2)), 16) / real
    assert 0.85 < last_only < 0.97 and abs(from_100 / last_only - 1) < 0.05, (last_only, from_100)
    model.denoiser = lambda x_in, t, cond: torch.zeros_like(x_in)   # v = 0: x0_hat = alpha x_t
    assert nl.high_pass_std(nl.restarted(model, x0, None, 100, torch.Generator().manual_seed(2)), 16) > 5 * real


def test_script_on_a_trained_run(trained_run, data_dir):
    """As a user runs it: the table for a trained run (its held-out fields), then the members' small scales."""
    out = subprocess.run([sys.executable, str(SCRIPT), str(trained_run / "outputs/quickstart/tiny"), "--data-path",
                          str(data_dir / "grf_quickstart.zarr"), "--split", "val", "--fields", "8", "--timesteps",
                          "0", "100"], capture_output=True, text=True, cwd=trained_run, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    fractions_table = out.stdout.split("started from the held-out fields")[0]
    rows = [line for line in fractions_table.splitlines() if line.startswith("| 0 |") or line.startswith("| 100 |")]
    assert len(rows) == 2
    for row in rows:
        fractions = [float(v) for v in row.strip("|").split("|")[2:-1]]
        assert all(0.0 < f < 5.0 for f in fractions), row
    assert "std above wavenumber k0 (physical units): k0=8: members" in out.stdout
    restart = out.stdout.split("started from the held-out fields noised to t0")[1].splitlines()
    assert [line.split("|")[1].strip() for line in restart if line.startswith("| ")][1:] == \
        ["real fields", "0", "100", "999"]

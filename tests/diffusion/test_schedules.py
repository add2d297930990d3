"""NoiseSchedule against the closed forms of DDPM, Improved DDPM, Chen (2023) and Lin et al. (2024)."""

import math

import pytest
import torch

from scidiff.diffusion import GaussianDiffusion, NoiseSchedule


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_alpha_bar_is_the_product_of_alphas(name):
    s = NoiseSchedule.from_name(name, num_timesteps=300)
    assert s.betas.dtype == s.alphas_cumprod.dtype == torch.float64
    prod = 1.0
    for t in range(300):
        prod *= 1.0 - float(s.betas[t])
        assert float(s.alphas_cumprod[t]) == pytest.approx(prod, rel=1e-12)
    assert float(s.alphas_cumprod_prev[0]) == 1.0
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    torch.testing.assert_close(s.snr, s.alphas_cumprod / (1 - s.alphas_cumprod))
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()


def test_linear_matches_ddpm_and_scales_with_T():
    s = NoiseSchedule.from_name("linear", num_timesteps=1000)
    assert float(s.betas[0]) == pytest.approx(1e-4)
    assert float(s.betas[-1]) == pytest.approx(0.02)
    assert float(s.betas[500] - s.betas[499]) == pytest.approx((0.02 - 1e-4) / 999)
    s4 = NoiseSchedule.from_name("linear", num_timesteps=250)
    assert float(s4.betas[0]) == pytest.approx(4e-4) and float(s4.betas[-1]) == pytest.approx(0.08)
    # Improved DDPM's scaling keeps the terminal alpha-bar of the same order.
    assert 0.1 < float(s4.alphas_cumprod[-1] / s.alphas_cumprod[-1]) < 10
    explicit = NoiseSchedule.from_name("linear", num_timesteps=100, beta_start=1e-3, beta_end=5e-2)
    assert float(explicit.betas[0]) == pytest.approx(1e-3) and float(explicit.betas[-1]) == pytest.approx(5e-2)


def test_cosine_matches_improved_ddpm_formula():
    T, s_off = 1000, 0.008
    sched = NoiseSchedule.from_name("cosine", num_timesteps=T)

    def f(t):
        return math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2

    for t in [0, 1, 10, 500, 990, 998, 999]:
        expected = min(1 - f(t + 1) / f(t), 0.999)
        assert float(sched.betas[t]) == pytest.approx(expected, rel=1e-10)
    # alpha-bar follows f(t+1)/f(0) wherever no beta was clipped
    assert float(sched.alphas_cumprod[499]) == pytest.approx(f(500) / f(0), rel=1e-10)
    assert float(sched.betas.max()) == pytest.approx(0.999)


def test_sigmoid_follows_chen_2023():
    T = 500
    sched = NoiseSchedule.from_name("sigmoid", num_timesteps=T, sigmoid_start=-3, sigmoid_end=3, sigmoid_tau=1.0)

    def sig(z):
        return 1 / (1 + math.exp(-z))

    def ab(u):
        return (sig(3) - sig(6 * u - 3)) / (sig(3) - sig(-3))

    for t in [0, 100, 250, 400]:
        assert float(sched.alphas_cumprod[t]) == pytest.approx(ab((t + 1) / T), rel=1e-9)
    assert float(sched.betas.max()) <= 0.999


def test_zero_terminal_snr_rescaling():
    base = NoiseSchedule.from_name("linear", num_timesteps=1000)
    z = NoiseSchedule.from_name("linear", num_timesteps=1000, zero_terminal_snr=True)
    assert float(z.alphas_cumprod[-1]) == 0.0 and float(z.betas[-1]) == pytest.approx(1.0)
    assert z.has_zero_terminal_snr and not base.has_zero_terminal_snr
    assert float(z.alphas_cumprod[0]) == pytest.approx(float(base.alphas_cumprod[0]), rel=1e-12)
    # sqrt(alpha-bar) is an affine map of the original (Lin et al. 2024, Algorithm 1)
    a, b = base.alphas_cumprod.sqrt(), z.alphas_cumprod.sqrt()
    slope = (b[0] - b[500]) / (a[0] - a[500])
    torch.testing.assert_close(b, (a - a[-1]) * slope, rtol=1e-9, atol=1e-12)
    assert float(z.snr[-1]) == 0.0
    # the eps-prediction pitfall is refused with a message, not a division by zero
    with pytest.raises(ValueError, match="prediction='eps'.*zero-terminal-SNR"):
        GaussianDiffusion(z, prediction="eps")
    GaussianDiffusion(z, prediction="v")


def test_explicit_betas_and_bad_input():
    s = NoiseSchedule([0.1, 0.2, 0.3])
    assert s.num_timesteps == 3
    assert float(s.alphas_cumprod[-1]) == pytest.approx(0.9 * 0.8 * 0.7)
    with pytest.raises(ValueError, match="betas must be finite.*\\[1\\]"):
        NoiseSchedule([0.1, float("nan"), 0.2])
    with pytest.raises(ValueError, match="betas must be finite"):
        NoiseSchedule(torch.tensor([0.1, float("inf")]))
    with pytest.raises(ValueError, match="betas must lie in"):
        NoiseSchedule([0.0, 0.1])
    with pytest.raises(ValueError, match="only at the last step"):
        NoiseSchedule([1.0, 0.5])
    with pytest.raises(ValueError, match="name: unknown schedule 'cosin'"):
        NoiseSchedule.from_name("cosin", num_timesteps=10)
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule.from_name("linear", num_timesteps=1)

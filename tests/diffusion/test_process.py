"""GaussianDiffusion: closed forms of the forward process, posterior, parameterisations and losses."""

import math

import pytest
import torch

from scidiff.diffusion import GaussianDiffusion, NoiseSchedule
from scidiff.diffusion.analytic import GaussianDataDenoiser

SHAPES = [(3, 2, 17), (3, 2, 6, 10), (3, 1, 4, 5, 6)]  # 1-D, 2-D, 3-D, non-square


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.from_name("linear", num_timesteps=1000)


@pytest.mark.parametrize("shape", SHAPES)
def test_q_sample_is_ddpm_eq4(sched, shape):
    diff = GaussianDiffusion(sched)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 499, 999])
    x_t = diff.q_sample(x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        ab = float(sched.alphas_cumprod[ti])
        torch.testing.assert_close(x_t[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i])


@pytest.mark.parametrize("shape", SHAPES)
def test_posterior_is_ddpm_eq7_and_bayes(sched, shape):
    """Posterior mean/variance equal DDPM eq. 7 and the product of the two Gaussians
    q(x_t | x_{t-1}) q(x_{t-1} | x_0) derived independently."""
    diff = GaussianDiffusion(sched)
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 250, 999])
    mean, var, log_var = diff.q_posterior_mean_variance(x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        beta, ab, ab_prev = (float(v[ti]) for v in (sched.betas, sched.alphas_cumprod, sched.alphas_cumprod_prev))
        eq7 = math.sqrt(ab_prev) * beta / (1 - ab) * x0[i] + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * x_t[i]
        torch.testing.assert_close(mean[i], eq7)
        precision = 1 / (1 - ab_prev) + (1 - beta) / beta
        bayes_mean = (math.sqrt(ab_prev) * x0[i] / (1 - ab_prev) + math.sqrt(1 - beta) * x_t[i] / beta) / precision
        torch.testing.assert_close(mean[i], bayes_mean)
        assert float(var[i].flatten()[0]) == pytest.approx(1 / precision, rel=1e-10)
        assert float(log_var[i].flatten()[0]) == pytest.approx(math.log(1 / precision), rel=1e-10)
    # t = 0: beta~_0 = 0, its log clipped to log beta~_1 (Improved DDPM)
    _, var0, log_var0 = diff.q_posterior_mean_variance(x0, x_t, torch.zeros(3, dtype=torch.long))
    assert float(var0.abs().max()) == 0.0
    assert float(log_var0.flatten()[0]) == pytest.approx(math.log(float(diff._tables64["posterior_variance"][1])))


@pytest.mark.parametrize("shape", SHAPES)
def test_eps_x0_v_round_trips(sched, shape):
    diff = GaussianDiffusion(sched)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 600, 999])
    x_t = diff.q_sample(x0, t, eps)
    v = diff.get_v(x0, eps, t)
    torch.testing.assert_close(diff.predict_x0_from_eps(x_t, t, eps), x0)
    torch.testing.assert_close(diff.predict_eps_from_x0(x_t, t, x0), eps)
    torch.testing.assert_close(diff.predict_x0_from_v(x_t, t, v), x0)
    torch.testing.assert_close(diff.predict_eps_from_v(x_t, t, v), eps)
    for pred, out in [("eps", eps), ("x0", x0), ("v", v)]:
        d = GaussianDiffusion(sched, prediction=pred)
        px0, peps = d.predictions(out, x_t, t)
        torch.testing.assert_close(px0, x0)
        torch.testing.assert_close(peps, eps)


def test_p_mean_variance_variances(sched):
    x_t = torch.randn(2, 1, 5, dtype=torch.float64)
    t = torch.tensor([0, 400])
    post = sched.betas * (1 - sched.alphas_cumprod_prev) / (1 - sched.alphas_cumprod)
    small = GaussianDiffusion(sched, variance="fixed_small").p_mean_variance(torch.zeros_like(x_t), x_t, t)
    assert float(small.log_variance[0, 0, 0]) == pytest.approx(math.log(post[1]))
    assert float(small.log_variance[1, 0, 0]) == pytest.approx(math.log(post[400]))
    large = GaussianDiffusion(sched, variance="fixed_large").p_mean_variance(torch.zeros_like(x_t), x_t, t)
    assert float(large.variance[0, 0, 0]) == pytest.approx(float(post[1]))
    assert float(large.variance[1, 0, 0]) == pytest.approx(float(sched.betas[400]))
    learned = GaussianDiffusion(sched, variance="learned_range")
    for v, expected in [(1.0, math.log(sched.betas[400])), (-1.0, math.log(post[400]))]:
        out = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], dim=1)
        pmv = learned.p_mean_variance(out, x_t, t)
        assert float(pmv.log_variance[1, 0, 0]) == pytest.approx(float(expected))
    mid = learned.p_mean_variance(torch.cat([torch.zeros_like(x_t), torch.zeros_like(x_t)], 1), x_t, t)
    assert float(mid.log_variance[1, 0, 0]) == pytest.approx(0.5 * float(math.log(sched.betas[400]) + math.log(post[400])))
    with pytest.raises(ValueError, match="model_output has shape"):
        learned.p_mean_variance(torch.zeros_like(x_t), x_t, t)


def test_p_mean_with_exact_x0_is_the_posterior_mean(sched):
    diff = GaussianDiffusion(sched, prediction="x0")
    x0, x_t = torch.randn(4, 2, 3, 7, dtype=torch.float64), torch.randn(4, 2, 3, 7, dtype=torch.float64)
    t = torch.tensor([3, 30, 300, 900])
    torch.testing.assert_close(diff.p_mean_variance(x0, x_t, t).mean, diff.q_posterior_mean_variance(x0, x_t, t)[0])


def test_clipping_is_off_by_default_and_optional(sched):
    x0 = torch.full((1, 1, 4), 5.0, dtype=torch.float64)
    x_t = torch.zeros_like(x0)
    t = torch.tensor([10])
    assert float(GaussianDiffusion(sched, prediction="x0").p_mean_variance(x0, x_t, t).pred_x0.max()) == 5.0
    clipped = GaussianDiffusion(sched, prediction="x0", clip_range=(-1, 1)).p_mean_variance(x0, x_t, t)
    assert float(clipped.pred_x0.max()) == 1.0
    thr = GaussianDiffusion(sched, prediction="x0", dynamic_threshold=0.9).p_mean_variance(x0, x_t, t)
    assert float(thr.pred_x0.max()) == pytest.approx(1.0)  # clamp to s = 5 then divide by s


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
@pytest.mark.parametrize("shape", [(4096, 1, 3), (2048, 1, 2, 3)])
def test_training_loss_of_the_exact_denoiser_is_the_posterior_variance(sched, pred, shape):
    """At fixed t the exact denoiser's expected eps-MSE is Var[eps | x_t] = ab s^2 / (ab s^2 + 1 - ab)."""
    diff = GaussianDiffusion(sched, prediction=pred)
    s = 0.7
    den = GaussianDataDenoiser(diff, mean=0.3, std=s)
    torch.manual_seed(0)
    x0 = 0.3 + s * torch.randn(shape, dtype=torch.float64)
    t = torch.full((shape[0],), 200)
    loss = diff.training_loss(den, x0, t=t)
    assert loss.shape == (shape[0],)
    ab = float(sched.alphas_cumprod[200])
    var_eps = ab * s**2 / (ab * s**2 + 1 - ab)
    # target-space MSE = (d target / d eps)^2-scaled Var[eps | x_t]
    scale = {"eps": 1.0, "x0": (1 - ab) / ab, "v": 1 / ab}[pred]
    se = scale * var_eps * math.sqrt(2 / loss.numel() / shape[1] / math.prod(shape[2:]))
    assert float(loss.mean()) == pytest.approx(scale * var_eps, abs=5 * se)


def test_training_loss_masks_points(sched):
    diff = GaussianDiffusion(sched)
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    x0 = torch.zeros(2, 1, 8, dtype=torch.float64)
    noise = torch.ones_like(x0)
    noise[..., 4:] = 100.0  # huge errors where masked
    mask = torch.ones_like(x0)
    mask[..., 4:] = 0
    t = torch.tensor([5, 6])
    assert diff.training_loss(zero, x0, mask=mask, t=t, noise=noise).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="mask"):
        diff.training_loss(zero, x0, mask=torch.ones(2, 3, 8), t=t)


def test_min_snr_weights(sched):
    t = torch.tensor([0, 100, 999])
    snr = sched.snr[t]
    x = torch.zeros(3, 1, 1, dtype=torch.float64)
    gamma = 5.0
    for pred, expected in [
        ("eps", torch.minimum(snr, torch.tensor(gamma)) / snr),
        ("x0", torch.minimum(snr, torch.tensor(gamma))),
        ("v", torch.minimum(snr, torch.tensor(gamma)) / (snr + 1)),
    ]:
        d = GaussianDiffusion(sched, prediction=pred, loss_weighting="min_snr", min_snr_gamma=gamma)
        torch.testing.assert_close(d.loss_weight(t, x).flatten(), expected)
    assert float(GaussianDiffusion(sched).loss_weight(t, x)) == 1.0


def test_hybrid_loss_detaches_the_mean(sched):
    """L_hybrid's variational term trains the variance channels only (Improved DDPM 3.1)."""
    torch.manual_seed(0)
    lin = torch.nn.Conv1d(1, 2, 1, dtype=torch.float64)
    den = lambda x, t, c: lin(x)  # noqa: E731
    x0 = torch.randn(8, 1, 16, dtype=torch.float64)
    t, noise = torch.randint(0, 1000, (8,)), torch.randn_like(x0)
    hybrid = GaussianDiffusion(sched, variance="learned_range", hybrid_lambda=1e-3)
    hybrid.training_loss(den, x0, t=t, noise=noise).sum().backward()
    grad_hybrid = lin.weight.grad.clone()
    lin.zero_grad()
    mse_only = ((noise - lin(hybrid.q_sample(x0, t, noise))[:, :1]) ** 2).mean(dim=(1, 2)).sum()
    mse_only.backward()
    torch.testing.assert_close(grad_hybrid[0], lin.weight.grad[0])  # mean channel: MSE gradient only
    assert float(grad_hybrid[1].abs().sum()) > 0  # variance channel: trained by the bound
    loss = hybrid.training_loss(den, x0, t=t, noise=noise)
    vb = hybrid.vb_term(lin(hybrid.q_sample(x0, t, noise)).detach(), x0, hybrid.q_sample(x0, t, noise), t)
    mse = ((noise - lin(hybrid.q_sample(x0, t, noise))[:, :1]) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(loss, mse + 1e-3 * 1000 * vb)


def test_vb_term_is_zero_for_the_true_posterior(sched):
    """KL(q || p) = 0 when p's mean is the posterior mean and the variance is beta~."""
    diff = GaussianDiffusion(sched, prediction="x0")
    x0, x_t = torch.randn(3, 1, 4, 5, dtype=torch.float64), torch.randn(3, 1, 4, 5, dtype=torch.float64)
    t = torch.tensor([5, 50, 500])
    torch.testing.assert_close(diff.vb_term(x0, x0, x_t, t), torch.zeros(3, dtype=torch.float64))
    # t = 0: Gaussian decoder NLL with variance beta~_1 at the true data, in bits/dim
    nll = diff.vb_term(x0, x0, x_t, torch.zeros(3, dtype=torch.long))
    var = float(diff._tables64["posterior_variance"][1])
    expected = 0.5 * (math.log(2 * math.pi) + math.log(var)) / math.log(2)
    torch.testing.assert_close(nll, torch.full((3,), expected, dtype=torch.float64))


def test_bad_arguments_name_themselves(sched):
    with pytest.raises(ValueError, match="prediction: unknown value 'epsilon'"):
        GaussianDiffusion(sched, prediction="epsilon")
    with pytest.raises(ValueError, match="variance: unknown value 'small'"):
        GaussianDiffusion(sched, variance="small")
    with pytest.raises(ValueError, match="loss_weighting"):
        GaussianDiffusion(sched, loss_weighting="snr")
    diff = GaussianDiffusion(sched)
    x0 = torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match=r"t out of range.*\[0, 999\].*max 1000"):
        diff.q_sample(x0, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="t out of range"):
        diff.q_sample(x0, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[2\]"):
        diff.q_sample(x0, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="t must hold integer"):
        diff.q_sample(x0, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"noise has shape \(2, 1, 5\) but x0 has shape \(2, 1, 4\)"):
        diff.q_sample(x0, torch.tensor([1, 2]), torch.zeros(2, 1, 5))
    with pytest.raises(ValueError, match="x0 must be"):
        diff.q_sample(torch.zeros(2, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="x_t has shape"):
        diff.q_posterior_mean_variance(x0, torch.zeros(2, 1, 3), torch.tensor([1, 2]))

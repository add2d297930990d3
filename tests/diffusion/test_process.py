"""GaussianDiffusion: closed forms of the forward process, posterior, parameterisations and losses."""

import math
import warnings

import pytest
import torch

from scidiff.diffusion import ErrorAmplificationWarning, GaussianDiffusion, NoiseSchedule, samplers
from scidiff.diffusion.analytic import GaussianDataDenoiser
from scidiff.diffusion.process import AMPLIFICATION_LIMIT

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
def test_eps_x0_v_edm_round_trips(sched, shape):
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
    cases = [("eps", 1.0, eps), ("x0", 1.0, x0), ("v", 1.0, v)] + [("edm", sd, None) for sd in (0.5, 1.0, 2.0)]
    for pred, sd, out in cases:
        d = GaussianDiffusion(sched, prediction=pred, sigma_data=sd)
        if out is None:  # F* by its definition (x0 - c_skip x_t) / c_out (Karras et al. 2022, eq. 8)
            out = (x0 - d.coef("edm_c_skip", t, x_t) * x_t) / d.coef("edm_c_out", t, x_t)
        torch.testing.assert_close(d.target(x0, eps, t), out)
        px0, peps = d.predictions(out, x_t, t)
        torch.testing.assert_close(px0, x0)
        torch.testing.assert_close(peps, eps)


def test_edm_coefficients_are_karras_table_1_on_the_vp_chain(sched):
    """EDM's VE preconditioning (sigma^2 = (1 - ab) / ab, x_ve = x_t / sqrt(ab)):
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2) on x_ve, i.e. c_skip / sqrt(ab), c_out, c_in / sqrt(ab) on x_t;
    with sd = 1 F = -v exactly; the plain F-MSE is EDM's 1/c_out^2 weighting of the x0 error."""
    ab = sched.alphas_cumprod
    sigma2 = (1 - ab) / ab
    for sd in (0.5, 1.0, 2.0):
        d = GaussianDiffusion(sched, prediction="edm", sigma_data=sd)
        tab = d._tables64
        assert all(tab[k].dtype == torch.float64 for k in ("edm_c_in", "edm_c_skip", "edm_c_out"))
        torch.testing.assert_close(tab["edm_c_skip"], sd**2 / (sigma2 + sd**2) / ab.sqrt(), rtol=1e-12, atol=0)
        torch.testing.assert_close(tab["edm_c_out"], sigma2.sqrt() * sd / (sigma2 + sd**2).sqrt(), rtol=1e-12, atol=0)
        torch.testing.assert_close(tab["edm_c_in"], 1 / (sigma2 + sd**2).sqrt() / ab.sqrt(), rtol=1e-12, atol=0)
    d1, dv = GaussianDiffusion(sched, prediction="edm"), GaussianDiffusion(sched, prediction="v")
    torch.testing.assert_close(d1._tables64["edm_c_skip"], ab.sqrt(), rtol=1e-14, atol=0)
    torch.testing.assert_close(d1._tables64["edm_c_out"], (1 - ab).sqrt(), rtol=1e-14, atol=0)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 2, 3, 5, generator=g, dtype=torch.float64), torch.randn(4, 2, 3, 5, generator=g,
                                                                                       dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    x_t = d1.q_sample(x0, t, eps)
    torch.testing.assert_close(d1.target(x0, eps, t), -dv.target(x0, eps, t), rtol=1e-14, atol=1e-14)
    for a, b in zip(d1.predictions(-dv.target(x0, eps, t), x_t, t), dv.predictions(dv.target(x0, eps, t), x_t, t)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    d = GaussianDiffusion(sched, prediction="edm", sigma_data=0.3)
    f_star = d.target(x0, eps, t)
    torch.testing.assert_close(d.predict_x0_from_edm(x_t, t, f_star), x0)  # x0^ = x0 when F = F*
    f = f_star + torch.randn(x0.shape, generator=g, dtype=torch.float64)
    c_out = d.coef("edm_c_out", t, x0)
    torch.testing.assert_close(((f - f_star) ** 2), (d.predict_x0_from_edm(x_t, t, f) - x0) ** 2 / c_out**2)


def test_model_output_scales_the_input_for_edm_only(sched):
    x_t = torch.randn(3, 1, 4, 6, dtype=torch.float64)
    t = torch.tensor([0, 300, 999])
    seen = []

    def spy(x, tt, cond):
        seen.append((x, tt, cond))
        return torch.zeros_like(x)

    for pred in ("eps", "x0", "v"):
        d = GaussianDiffusion(sched, prediction=pred)
        seen.clear()
        d.model_output(spy, x_t, t, "c")
        assert seen[0][0] is x_t and seen[0][1] is t and seen[0][2] == "c"  # no extra multiply
        assert d.scale_model_input(x_t, t) is x_t
    d = GaussianDiffusion(sched, prediction="edm", sigma_data=0.5)
    seen.clear()
    d.model_output(spy, x_t, t)
    ab = sched.alphas_cumprod[t].reshape(3, 1, 1, 1)
    torch.testing.assert_close(seen[0][0], x_t / (1 - ab + 0.25 * ab).sqrt())
    torch.testing.assert_close(d.scale_model_input(x_t, t), seen[0][0])
    torch.testing.assert_close(d.unscale_model_input(d.scale_model_input(x_t, t), t), x_t)


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_zero_terminal_snr_edm_is_finite(sd):
    ztsnr = NoiseSchedule.from_name("linear", num_timesteps=200, zero_terminal_snr=True)
    d = GaussianDiffusion(ztsnr, prediction="edm", sigma_data=sd, loss_weighting="min_snr")
    last = ztsnr.num_timesteps - 1
    tab = d._tables64
    for k in ("edm_c_in", "edm_c_skip", "edm_c_out", "edm_eps_coef_x", "edm_eps_coef_out",
              "edm_target_coef_x0", "edm_target_coef_eps"):
        assert torch.isfinite(tab[k]).all(), k
    ends = (float(tab["edm_c_skip"][last]), float(tab["edm_c_out"][last]), float(tab["edm_c_in"][last]))
    assert ends == (0.0, sd, 1.0)
    x0 = torch.randn(2, 1, 3, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([last, last])
    x_t = d.q_sample(x0, t, eps)
    torch.testing.assert_close(x_t, eps)
    torch.testing.assert_close(d.target(x0, eps, t), x0 / sd)  # F* = x0 / sd at ab = 0
    p = d.p_mean_variance(d.target(x0, eps, t), x_t, t)
    assert all(torch.isfinite(v).all() for v in (p.mean, p.variance, p.pred_x0, p.pred_eps))
    torch.testing.assert_close(p.pred_x0, x0)
    den = GaussianDataDenoiser(d, 0.2, 0.7)
    loss = d.training_loss(den, x0, t=torch.tensor([last, 0]))
    assert torch.isfinite(loss).all()
    out = samplers.ddim_sample(den, d, torch.randn(3, 1, 5, dtype=torch.float64), 10, spacing="trailing")
    assert torch.isfinite(out).all()


def test_learned_range_with_edm(sched):
    """With learned_range the first C channels are F, the rest the variance interpolation."""
    d = GaussianDiffusion(sched, prediction="edm", variance="learned_range", sigma_data=0.5)
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(3, 2, 7, generator=g, dtype=torch.float64), torch.randn(3, 2, 7, generator=g,
                                                                                    dtype=torch.float64)
    t = torch.tensor([0, 200, 900])
    x_t = d.q_sample(x0, t, eps)
    out = torch.cat([d.target(x0, eps, t), torch.ones_like(x0)], dim=1)
    p = d.p_mean_variance(out, x_t, t)
    torch.testing.assert_close(p.pred_x0, x0)
    torch.testing.assert_close(p.log_variance, d.coef("log_betas", t, x0).expand_as(x0))
    den = lambda x, tt, c: torch.cat([d.target(x0, eps, tt), torch.ones_like(x)], dim=1)  # noqa: E731
    loss = d.training_loss(den, x0, t=t, noise=eps)
    vb = d.vb_term(out, x0, x_t, t)
    torch.testing.assert_close(loss, d.hybrid_lambda * d.num_timesteps * vb)  # the F-MSE part is 0


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


@pytest.mark.parametrize(("pred", "sd"), [("eps", 1.0), ("x0", 1.0), ("v", 1.0), ("edm", 1.0), ("edm", 2.0)])
@pytest.mark.parametrize("shape", [(4096, 1, 3), (2048, 1, 2, 3)])
def test_training_loss_of_the_exact_denoiser_is_the_posterior_variance(sched, pred, sd, shape):
    """At fixed t the exact denoiser's expected eps-MSE is Var[eps | x_t] = ab s^2 / (ab s^2 + 1 - ab)."""
    diff = GaussianDiffusion(sched, prediction=pred, sigma_data=sd)
    s = 0.7
    den = GaussianDataDenoiser(diff, mean=0.3, std=s)
    torch.manual_seed(0)
    x0 = 0.3 + s * torch.randn(shape, dtype=torch.float64)
    t = torch.full((shape[0],), 200)
    loss = diff.training_loss(den, x0, t=t)
    assert loss.shape == (shape[0],)
    ab = float(sched.alphas_cumprod[200])
    var_eps = ab * s**2 / (ab * s**2 + 1 - ab)
    # target-space MSE = (d target / d eps)^2-scaled Var[eps | x_t]; edm: F - F* = (x0^ - x0) / c_out
    c_out2 = sd**2 * (1 - ab) / (1 - ab + ab * sd**2)
    scale = {"eps": 1.0, "x0": (1 - ab) / ab, "v": 1 / ab, "edm": (1 - ab) / (ab * c_out2)}[pred]
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
    # edm: the effective x0-weight of the F-MSE is 1/c_out^2, so the weight is min(SNR, g) c_out^2
    ab = sched.alphas_cumprod[t]
    for sd in (0.5, 1.0, 2.0):
        d = GaussianDiffusion(sched, prediction="edm", sigma_data=sd, loss_weighting="min_snr", min_snr_gamma=gamma)
        c_out2 = sd**2 * (1 - ab) / (1 - ab + ab * sd**2)
        torch.testing.assert_close(d.loss_weight(t, x).flatten(), torch.minimum(snr, torch.tensor(gamma)) * c_out2)
    v = GaussianDiffusion(sched, prediction="v", loss_weighting="min_snr", min_snr_gamma=gamma)
    edm1 = GaussianDiffusion(sched, prediction="edm", loss_weighting="min_snr", min_snr_gamma=gamma)
    torch.testing.assert_close(edm1.loss_weight(t, x), v.loss_weight(t, x))  # sd = 1: F = -v


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
    with pytest.raises(ValueError, match="timestep_sampling: unknown value 'logit_normal'"):
        GaussianDiffusion(sched, timestep_sampling="logit_normal")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma_data must be a finite number > 0"):
            GaussianDiffusion(sched, prediction="edm", sigma_data=bad)
    with pytest.raises(ValueError, match="lognormal_std"):
        GaussianDiffusion(sched, timestep_sampling="lognormal", lognormal_std=0.0)
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


# ------------------------------------------------------------ training noise levels
def _lognormal_bin_masses(diff):
    """P(nearest ln sigma_t is t's) under N(mean, std^2): the normal mass between the
    midpoints of neighbouring ln sigma_t (-inf / +inf at the ends)."""
    ls = diff._tables64["log_sigma"]
    mid = 0.5 * (ls[1:] + ls[:-1])
    inf = torch.tensor([math.inf], dtype=torch.float64)
    edges = torch.cat([-inf, mid, inf])
    cdf = torch.special.ndtr((edges - diff.lognormal_mean) / diff.lognormal_std)
    return cdf[1:] - cdf[:-1]


@pytest.mark.parametrize(("name", "ztsnr", "mean", "std"), [("linear", False, -1.2, 1.2), ("cosine", False, -1.2, 1.2),
                                                           ("cosine", True, 0.5, 2.0)])
def test_lognormal_timesteps_follow_the_lognormal_per_bin(name, ztsnr, mean, std):
    """Histogram of N = 400k drawn timesteps against the lognormal's mass per discrete bin:
    every bin within 5 binomial standard errors (+ 1/N), and chi-square over the bins with an
    expected count >= 5 below df + 5 sqrt(2 df)."""
    diff = GaussianDiffusion(NoiseSchedule.from_name(name, num_timesteps=1000, zero_terminal_snr=ztsnr),
                             prediction="v", timestep_sampling="lognormal", lognormal_mean=mean, lognormal_std=std)
    n = 400_000
    t = diff.sample_timesteps(n, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (n,) and 0 <= int(t.min()) and int(t.max()) < 1000
    freq = torch.bincount(t, minlength=1000).to(torch.float64) / n
    p = _lognormal_bin_masses(diff)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool(((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1 / n).all())
    big = p * n >= 5
    chi2 = float(((freq[big] - p[big]) ** 2 / p[big]).sum() * n)
    df = int(big.sum()) - 1
    assert chi2 < df + 5 * math.sqrt(2 * df), (chi2, df)
    if ztsnr:  # sigma = inf at the last step: never the nearest level
        assert float(p[-1]) == 0.0 and int(t.max()) < 999
    # the drawn ln sigma_t have about the lognormal's mean (discretisation aside)
    assert float(diff._tables64["log_sigma"][t].mean()) == pytest.approx(mean, abs=0.05)


def test_timestep_sampling_is_deterministic_given_a_generator(sched):
    logn = GaussianDiffusion(sched, prediction="edm", timestep_sampling="lognormal")
    a = logn.sample_timesteps(64, "cpu", generator=torch.Generator().manual_seed(7))
    b = logn.sample_timesteps(64, "cpu", generator=torch.Generator().manual_seed(7))
    c = logn.sample_timesteps(64, "cpu", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the nearest level in ln sigma: a lognormal concentrated just either side of the midpoint of
    # two levels' ln sigma picks the level on its side (and the ends catch everything beyond)
    ls = logn._tables64["log_sigma"]
    mid = float(0.5 * (ls[400] + ls[401]))
    for offset, want in ((-1e-4, 400), (1e-4, 401), (-50.0, 0), (50.0, 999)):
        d = GaussianDiffusion(sched, timestep_sampling="lognormal", lognormal_mean=mid + offset, lognormal_std=1e-7)
        assert d.sample_timesteps(32, "cpu").unique().tolist() == [want]
    # uniform draws are unchanged: the same numbers as torch.randint from the same generator
    uni = GaussianDiffusion(sched).sample_timesteps(64, "cpu", generator=torch.Generator().manual_seed(7))
    assert torch.equal(uni, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(7)))
    # training_loss draws its timesteps with sample_timesteps when t is None
    seen = []

    def spy(x, t, cond):
        seen.append(t)
        return torch.zeros_like(x)

    x0 = torch.zeros(16, 1, 3, dtype=torch.float64)
    torch.manual_seed(3)
    logn.training_loss(spy, x0, noise=torch.zeros_like(x0))
    torch.manual_seed(3)
    assert torch.equal(seen[0], logn.sample_timesteps(16, "cpu"))


# -------------------------------------------------------------- error amplification
@pytest.mark.parametrize("pred", ["eps", "x0", "v", "edm"])
def test_error_amplification_is_the_gain_of_the_reverse_mean(pred):
    """The factor is max_t |d mu_theta / d output| (DDPM eq. 11), checked by autograd."""
    sch = NoiseSchedule.from_name("linear", num_timesteps=300)
    d = GaussianDiffusion(sch, prediction=pred, sigma_data=0.6)
    factor, step = d.error_amplification()
    x_t = torch.randn(1, 1, 4, dtype=torch.float64)
    t = torch.tensor([step])
    out = torch.zeros_like(x_t, requires_grad=True)
    (grad,) = torch.autograd.grad(d.p_mean_variance(out, x_t, t).mean[0, 0, 0], out)
    assert float(grad.abs().max()) == pytest.approx(factor, rel=1e-12)
    gains = d._tables64["posterior_mean_coef1"] * d.output_gain()
    assert float(gains.max()) == factor and 0 <= step < 300
    if pred == "eps":  # beta_t / (sqrt(a_t) sqrt(1 - ab_t))
        beta, ab = sch.betas, sch.alphas_cumprod
        torch.testing.assert_close(gains, beta / ((1 - beta).sqrt() * (1 - ab).sqrt()), rtol=1e-12, atol=0)


def test_eps_on_the_clipped_cosine_schedule_warns():
    """eps + cosine (beta clipped at 0.999 at t = T-1): 31.6 at t = 999; the DDPM linear
    schedule gives 0.0202; v, edm and x0 stay below the limit on the cosine schedule."""
    cosine = NoiseSchedule.from_name("cosine", num_timesteps=1000)
    message = r"31\.6 at timestep 999.*DDIM.*trailing.*prediction='v' or 'edm'"
    with pytest.warns(ErrorAmplificationWarning, match=message):
        d = GaussianDiffusion(cosine)
    factor, step = d.error_amplification()
    assert factor == pytest.approx(31.59, abs=0.01) and step == 999 and factor > AMPLIFICATION_LIMIT
    with warnings.catch_warnings():
        warnings.simplefilter("error", ErrorAmplificationWarning)
        linear = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=1000))
        assert linear.error_amplification() == (pytest.approx(0.0202, abs=1e-4), 999)
        for pred in ("x0", "v", "edm"):
            assert GaussianDiffusion(cosine, prediction=pred).error_amplification()[0] <= 1.0 + 1e-9

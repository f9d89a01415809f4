"""Reference math against hand-derived float64 formulas and against diffusers' schedulers."""
import itertools
import math

import pytest
import torch

from fastddpm import Schedule, diffusion
from formulas import f64, ho_step64, song_step64

SHAPE = (5, 3, 7, 9)


def rel_close(a, b, tol):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1.0)
    assert err <= tol * scale, f"max abs err {err:.3g} > {tol} * {scale:.3g}"


@pytest.fixture(params=["linear", "cosine", "respaced"])
def sched(request):
    if request.param == "linear":
        return Schedule.linear(1000)
    if request.param == "cosine":
        return Schedule.cosine(1000)
    return Schedule.linear(1000).respace(50, "trailing")


def mixed_t(s, B):
    t = torch.randint(0, s.num_steps, (B,))
    t[0], t[1], t[-1] = 0, 1, s.num_steps - 1
    return t


@pytest.mark.parametrize("prediction,variance,clip", list(itertools.product(
    ["eps", "x0", "v"], ["fixed_small", "fixed_large", "learned_range"], [None, 1.0])))
def test_ddpm_step_matches_ho_formulas(sched, prediction, variance, clip):
    x = torch.randn(SHAPE)
    t = mixed_t(sched, SHAPE[0])
    C = 6 if variance == "learned_range" else 3
    mo = torch.randn(SHAPE[0], C, *SHAPE[2:])
    if variance == "learned_range":
        mo[:, 3:] = torch.rand(SHAPE[0], 3, *SHAPE[2:]) * 2 - 1
    z = torch.randn(SHAPE)
    got = diffusion.ddpm_step(sched, x, t, mo, z, prediction=prediction, variance=variance, clip=clip)
    assert got.dtype == torch.float32 and got.shape == SHAPE
    rel_close(got, ho_step64(sched, x, t, mo, z, prediction, variance, clip), 1e-5)


@pytest.mark.parametrize("prediction,clip,eta,use_clipped", list(itertools.product(
    ["eps", "x0", "v"], [None, 1.0], [0.0, 0.5, 1.0], [False, True])))
def test_ddim_step_matches_song_eq12(sched, prediction, clip, eta, use_clipped):
    x, mo, z = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    t = mixed_t(sched, SHAPE[0])
    got = diffusion.ddim_step(sched, x, t, mo, z, eta=eta, prediction=prediction, clip=clip,
                              use_clipped_model_output=use_clipped)
    rel_close(got, song_step64(sched, x, t, mo, z, eta, prediction, clip, use_clipped), 1e-5)


def test_use_clipped_model_output_changes_only_clipped_elements():
    """Where x0 is not clipped, the re-derived eps is the raw eps; where it is, the step differs."""
    s = Schedule.linear(1000).respace(50)
    x, mo = torch.randn(SHAPE) * 3, torch.randn(SHAPE)
    t = mixed_t(s, SHAPE[0])
    raw, x0 = diffusion.ddim_step(s, x, t, mo, return_x0=True)
    rederived = diffusion.ddim_step(s, x, t, mo, use_clipped_model_output=True)
    inside = (x0.abs() < 1).expand_as(x) & (t > 0).view(-1, 1, 1, 1)
    clipped = (x0.abs() == 1).expand_as(x) & (t > 0).view(-1, 1, 1, 1)
    assert inside.any() and clipped.any()
    torch.testing.assert_close(rederived[inside], raw[inside], rtol=1e-5, atol=1e-5)
    assert (rederived - raw)[clipped].abs().mean() > 1e-2


def improved_diffusion_ddim_step(s, x, t, mo, noise, eta, prediction, dtype=torch.float32):
    """improved-diffusion's GaussianDiffusion.ddim_sample (openai/improved-diffusion,
    gaussian_diffusion.py), written out from its source: float64 numpy tables gathered and cast
    to float32 (`_extract_into_tensor`), pred_xstart clipped to [-1, 1] (`p_mean_variance`), eps
    re-derived from it (`_predict_eps_from_xstart`), then eq. 12 in float32. It has eps (EPSILON)
    and x0 (START_X) models only. dtype=float64 evaluates the same code in float64."""
    x, mo, noise = x.to(dtype), mo.to(dtype), noise.to(dtype)

    def extract(arr, shape):
        return arr[t].to(dtype).view(-1, *([1] * (len(shape) - 1)))

    abar64 = s.alphas_cumprod
    sqrt_recip = (1.0 / abar64).sqrt()
    sqrt_recipm1 = (1.0 / abar64 - 1).sqrt()
    if prediction == "eps":
        pred_xstart = extract(sqrt_recip, x.shape) * x - extract(sqrt_recipm1, x.shape) * mo
    else:
        pred_xstart = mo
    pred_xstart = pred_xstart.clamp(-1, 1)
    eps = (extract(sqrt_recip, x.shape) * x - pred_xstart) / extract(sqrt_recipm1, x.shape)
    alpha_bar = extract(abar64, x.shape)
    alpha_bar_prev = extract(s.alphas_cumprod_prev, x.shape)
    sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
    mean_pred = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
    return mean_pred + nonzero_mask * sigma * noise


@pytest.mark.parametrize("prediction,eta", list(itertools.product(["eps", "x0"], [0.0, 1.0])))
def test_use_clipped_model_output_equals_improved_diffusion_ddim(sched, prediction, eta):
    x, mo, z = torch.randn(SHAPE) * 2, torch.randn(SHAPE), torch.randn(SHAPE)
    t = mixed_t(sched, SHAPE[0])
    got = diffusion.ddim_step(sched, x, t, mo, z, eta=eta, prediction=prediction, clip=1.0,
                              use_clipped_model_output=True)
    rel_close(got, improved_diffusion_ddim_step(sched, x, t, mo, z, eta, prediction, torch.float64), 1e-5)
    # as written it takes 1 - abar_prev in float32: ~1e-4 relative near t = 0 (DESIGN.md, Numerics),
    # amplified where a large x_t meets a clipped x0 (the re-derived eps is then large)
    rel_close(got, improved_diffusion_ddim_step(sched, x, t, mo, z, eta, prediction), 5e-4)
    raw = diffusion.ddim_step(sched, x, t, mo, z, eta=eta, prediction=prediction, clip=1.0)
    assert (got - raw).abs().max() > 1e-2  # the option is what makes them agree


def test_scalar_t_equals_per_sample_t():
    s = Schedule.cosine(100)
    x, mo, z = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    for t in (0, 1, 50, 99):
        tt = torch.full((SHAPE[0],), t)
        torch.testing.assert_close(diffusion.ddpm_step(s, x, t, mo, z), diffusion.ddpm_step(s, x, tt, mo, z))
        torch.testing.assert_close(diffusion.ddim_step(s, x, t, mo, z, eta=0.7),
                                   diffusion.ddim_step(s, x, tt, mo, z, eta=0.7))
    assert diffusion.ddpm_step(s, x, torch.tensor(5), mo, z).shape == SHAPE  # 0-d tensor t


def test_step_zero_adds_no_noise():
    s = Schedule.linear(1000)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    nan_noise = torch.full(SHAPE, float("nan"))
    for variance in ("fixed_small", "fixed_large"):
        out = diffusion.ddpm_step(s, x, 0, mo, nan_noise, variance=variance)
        assert torch.isfinite(out).all()
        t = torch.tensor([0, 5, 0, 9, 0])
        out = diffusion.ddpm_step(s, x, t, mo, nan_noise, variance=variance)
        assert torch.isfinite(out[t == 0]).all() and torch.isnan(out[t > 0]).all()
    assert torch.isfinite(diffusion.ddim_step(s, x, 0, mo, nan_noise, eta=1.0)).all()
    assert torch.isfinite(diffusion.ddpm_step(s, x, 0, mo, None)).all()  # no noise needed at step 0


def test_learned_range_endpoints():
    s = Schedule.linear(1000)
    x, z = torch.randn(SHAPE), torch.randn(SHAPE)
    eps = torch.randn(SHAPE)
    t = 300
    for v, variance in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        mo = torch.cat([eps, torch.full(SHAPE, v)], dim=1)
        got = diffusion.ddpm_step(s, x, t, mo, z, variance="learned_range")
        want = diffusion.ddpm_step(s, x, t, eps, z, variance=variance)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ddim_eta1_has_ddpm_fixed_small_variance():
    s = Schedule.linear(1000).respace(100)
    x, mo, z = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    t = 40
    zero = torch.zeros(SHAPE)
    d_noise = diffusion.ddim_step(s, x, t, mo, z, eta=1.0) - diffusion.ddim_step(s, x, t, mo, zero, eta=1.0)
    p_noise = diffusion.ddpm_step(s, x, t, mo, z) - diffusion.ddpm_step(s, x, t, mo, zero)
    torch.testing.assert_close(d_noise, p_noise, rtol=1e-5, atol=1e-6)


def test_q_sample_closed_form_and_marginals():
    s = Schedule.cosine(1000)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = mixed_t(s, SHAPE[0])
    want = f64(s, "abar", t).sqrt() * x0.double() + (1 - f64(s, "abar", t)).sqrt() * noise.double()
    rel_close(diffusion.q_sample(s, x0, t, noise), want, 1e-6)
    # marginal statistics with stream noise: x0 = 0.7 everywhere, 200k draws at t = 300
    n, tt = 200_000, 300
    x0 = torch.full((n, 1), 0.7)
    xt, eps = diffusion.q_sample(s, x0, tt, seed=11)
    abar = s.alphas_cumprod[tt].item()
    se = math.sqrt((1 - abar) / n)
    assert abs(xt.mean().item() - math.sqrt(abar) * 0.7) < 5 * se
    assert abs(xt.std().item() - math.sqrt(1 - abar)) < 5 * math.sqrt(1 - abar) / math.sqrt(2 * n)
    torch.testing.assert_close(xt, diffusion.q_sample(s, x0, tt, eps))


def test_training_target_v_round_trip():
    s = Schedule.linear(1000)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = mixed_t(s, SHAPE[0])
    xt = diffusion.q_sample(s, x0, t, noise)
    v = diffusion.training_target(s, x0, t, noise, "v")
    torch.testing.assert_close(diffusion.predict_x0(s, xt, t, v, "v"), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(diffusion.predict_eps(s, xt, t, v, "v"), noise, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ diffusers parity
def _diffusers_noise(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


DIFFUSERS_PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


@pytest.mark.parametrize("num_steps", [1000, 50])
@pytest.mark.parametrize("prediction,variance,clip", list(itertools.product(
    ["eps", "x0", "v"], ["fixed_small", "fixed_large", "learned_range"], [None, 1.0])))
def test_ddpm_step_agrees_with_diffusers(num_steps, prediction, variance, clip):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=DIFFUSERS_PRED[prediction],
                                    variance_type=variance, clip_sample=clip is not None,
                                    clip_sample_range=clip or 1.0)
    if num_steps != 1000:
        sched.set_timesteps(num_steps)
    s = Schedule.from_diffusers(sched)
    C = 6 if variance == "learned_range" else 3
    for i in (s.num_steps - 1, s.num_steps // 2, 2, 1):
        x, mo = torch.randn(SHAPE), torch.randn(SHAPE[0], C, *SHAPE[2:])
        if variance == "learned_range":
            mo[:, 3:] = torch.rand(SHAPE[0], 3, *SHAPE[2:]) * 2 - 1
        ts = int(s.timesteps[i])
        want = sched.step(mo, ts, x, generator=torch.Generator().manual_seed(i)).prev_sample
        got = diffusion.ddpm_step(s, x, i, mo, _diffusers_noise(i, SHAPE), prediction=prediction,
                                  variance=variance, clip=clip)
        # diffusers computes its coefficients in float32: ~2e-4 relative near t = 0 (DESIGN.md, Numerics)
        rel_close(got, want, 5e-4)


@pytest.mark.parametrize("num_steps,spacing", [(1000, "leading"), (50, "leading"), (50, "trailing")])
@pytest.mark.parametrize("prediction,clip,eta,use_clipped", list(itertools.product(
    ["eps", "x0", "v"], [None, 1.0], [0.0, 1.0], [False, True])))
def test_ddim_step_agrees_with_diffusers(num_steps, spacing, prediction, clip, eta, use_clipped):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, prediction_type=DIFFUSERS_PRED[prediction],
                                    clip_sample=clip is not None, clip_sample_range=clip or 1.0,
                                    timestep_spacing=spacing)
    sched.set_timesteps(num_steps)
    s = Schedule.from_diffusers(sched)
    for i in (s.num_steps - 1, s.num_steps // 2, 1):
        x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
        ts = int(s.timesteps[i])
        want = sched.step(mo, ts, x, eta=eta, generator=torch.Generator().manual_seed(i),
                          use_clipped_model_output=use_clipped).prev_sample
        got = diffusion.ddim_step(s, x, i, mo, _diffusers_noise(i, SHAPE), eta=eta, prediction=prediction, clip=clip,
                                  use_clipped_model_output=use_clipped)
        rel_close(got, want, 5e-4)


# ------------------------------------------------------------------------------------ argument errors
def test_argument_errors():
    s = Schedule.linear(100)
    x, mo, z = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    cases = [
        (lambda: diffusion.ddpm_step(s, x[0, 0, 0], 3, mo, z), ValueError, "x_t"),
        (lambda: diffusion.ddpm_step(s, x, 3, mo[:, :2], z), ValueError, "model_output"),
        (lambda: diffusion.ddpm_step(s, x, 3, mo, z, variance="learned_range"), ValueError, "2C"),
        (lambda: diffusion.ddpm_step(s, x, 100, mo, z), ValueError, r"t must be a step index in 0\.\.99"),
        (lambda: diffusion.ddpm_step(s, x, torch.tensor([0, 1, 2, 3, 100]), mo, z), ValueError, "0..99"),
        (lambda: diffusion.ddpm_step(s, x, torch.zeros(4, dtype=torch.long), mo, z), ValueError, "shape"),
        (lambda: diffusion.ddpm_step(s, x, torch.zeros(5), mo, z), TypeError, "integer dtype"),
        (lambda: diffusion.ddpm_step(s, x, 3, mo, z, prediction="noise"), ValueError, "prediction"),
        (lambda: diffusion.ddpm_step(s, x, 3, mo, z, variance="small"), ValueError, "variance"),
        (lambda: diffusion.ddpm_step(s, x, 3, mo, z, clip=-1.0), ValueError, "clip"),
        (lambda: diffusion.ddpm_step(s, x, 3, mo, None), ValueError, "noise is required"),
        (lambda: diffusion.ddpm_step(s, x, 3, mo, z[:2]), ValueError, "noise"),
        (lambda: diffusion.ddpm_step(s, x, 3, mo, z, seed=1), ValueError, "not both"),
        (lambda: diffusion.ddpm_step(s, x, 3, mo, seed=-1), ValueError, "seed"),
        (lambda: diffusion.ddim_step(s, x, 3, mo, z, eta=-0.5), ValueError, "eta"),
        (lambda: diffusion.ddim_step(s, x, 3, mo, None, eta=0.5), ValueError, "noise is required"),
        (lambda: diffusion.ddim_step(s, x, 3, mo, use_clipped_model_output=1), TypeError,
         "use_clipped_model_output must be True or False; got 1"),
        (lambda: diffusion.ddpm_step("s", x, 3, mo, z), TypeError, "Schedule"),
        (lambda: diffusion.ddpm_step(s, x, torch.zeros(5, dtype=torch.long, device="meta"), mo, z), ValueError,
         "device"),
        (lambda: diffusion.ddpm_step(s, x, 3, mo.to("meta"), z), ValueError, "model_output is on"),
        (lambda: diffusion.q_sample(s, x.long(), 3, z), TypeError, "x0"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
    assert diffusion.ddim_step(s, x, 3, mo, None, eta=0.0).shape == SHAPE  # eta=0 needs no noise

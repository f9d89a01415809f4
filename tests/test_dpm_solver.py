"""DPM-Solver++ (2M) and SDE-DPM-Solver++: reference step against the paper's formulas in float64,
respacing and whole loops against diffusers' DPMSolverMultistepScheduler, refused options."""
import math

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import Schedule, compat, diffusers_schedule
from fastddpm.diffusion import dpm_solver_step
from fastddpm.dpm_solver import dpm_indices
from fastddpm.testing import GaussianDataModel

PREDS = ("eps", "x0", "v")


def lu_step64(s, x, i, mo, x0_prev, z, *, method, order, solver_type, prediction, clip):
    """Lu et al. 2022 (DPM-Solver++) written out in float64 from abar: eq. 8 (first order),
    Algorithm 2 (multistep second order, midpoint) and its heun variant, and the SDE variant
    (diffusers' sde-dpmsolver++). Step i goes from abar[i] to abar[i-1] (1 after step 0)."""
    x, mo, z = x.double(), mo.double(), z.double()
    abar = s.alphas_cumprod
    a_s = float(abar[i])
    a_t = float(abar[i - 1]) if i > 0 else 1.0
    alpha_s, sigma_s = math.sqrt(a_s), math.sqrt(1 - a_s)
    alpha_t, sigma_t = math.sqrt(a_t), math.sqrt(1 - a_t)
    x0 = {"eps": (x - sigma_s * mo) / alpha_s, "x0": mo, "v": alpha_s * x - sigma_s * mo}[prediction]
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    if i == 0:  # sigma_t = 0: lambda_t = inf, e^-h = 0, the step lands on x0 (first order, both variants)
        return x0, x0
    lam = lambda a: 0.5 * math.log(a / (1 - a))  # noqa: E731
    h = lam(a_t) - lam(a_s)
    second = order == 2 and i < s.num_steps - 1
    if second:
        r0 = (lam(a_s) - lam(float(abar[i + 1]))) / h
        D1 = (x0 - x0_prev.double()) / r0
    if method == "dpmsolver++":
        out = sigma_t / sigma_s * x + alpha_t * (1 - math.exp(-h)) * x0
        if second:
            out = out + (0.5 * alpha_t * (1 - math.exp(-h)) if solver_type == "midpoint"
                         else alpha_t * ((math.exp(-h) - 1) / h + 1)) * D1
    else:
        out = (sigma_t / sigma_s * math.exp(-h) * x + alpha_t * (1 - math.exp(-2 * h)) * x0
               + sigma_t * math.sqrt(1 - math.exp(-2 * h)) * z)
        if second:
            out = out + (0.5 * alpha_t * (1 - math.exp(-2 * h)) if solver_type == "midpoint"
                         else alpha_t * ((1 - math.exp(-2 * h)) / (-2 * h) + 1)) * D1
    return out, x0


@pytest.mark.parametrize("method", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("order,solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun")])
@pytest.mark.parametrize("prediction", PREDS)
def test_reference_step_equals_the_papers_formulas_in_float64(method, order, solver_type, prediction):
    s = Schedule.linear(1000).select(dpm_indices(1000, 12, "linspace"))
    shape = (3, 3, 17, 29)
    clip = 1.0 if prediction == "x0" else None
    for i in (11, 10, 6, 1, 0):  # first step, second-order steps, the step to sigma 0
        x, mo, prev, z = (torch.randn(shape) for _ in range(4))
        prev = prev.clamp(-1, 1)
        want, want_x0 = lu_step64(s, x, i, mo, prev, z, method=method, order=order, solver_type=solver_type,
                                  prediction=prediction, clip=clip)
        got, got_x0 = dpm_solver_step(s, x, i, mo, prev, z, method=method, order=order, solver_type=solver_type,
                                      prediction=prediction, clip=clip)
        assert got.dtype == got_x0.dtype == torch.float32
        # float32 rounding of x0 = (x - sigma eps) / alpha scales with 1 / alpha (~160 at the first step)
        scale = max(1.0, float(want_x0.abs().max()))
        torch.testing.assert_close(got.double(), want, atol=1e-5 * scale, rtol=1e-5)
        torch.testing.assert_close(got_x0.double(), want_x0, atol=1e-5 * scale, rtol=1e-5)


def test_per_sample_steps_and_seed_noise():
    """t as a (B,) tensor equals the per-sample int calls; seed= draws the stream's noise at tag t."""
    s = Schedule.linear(1000).select(dpm_indices(1000, 8, "trailing"))
    x, mo, prev = (torch.randn(4, 2, 5, 7) for _ in range(3))
    t = torch.tensor([7, 3, 0, 1])
    got, got_x0 = dpm_solver_step(s, x, t, mo, prev, method="sde-dpmsolver++", seed=5, sample_offset=2)
    for b in range(4):
        z = fastddpm.rng.normal_like(x[b:b + 1], 5, 2 + b, int(t[b]))
        want, want_x0 = dpm_solver_step(s, x[b:b + 1], int(t[b]), mo[b:b + 1], prev[b:b + 1], z,
                                        method="sde-dpmsolver++")
        torch.testing.assert_close(got[b:b + 1], want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got_x0[b:b + 1], want_x0)


def test_first_order_steps_ignore_a_nan_prev_x0():
    s = Schedule.linear(1000).select(dpm_indices(1000, 6))
    x, mo = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    nan = torch.full_like(x, float("nan"))
    for i in (5, 0):
        a, _ = dpm_solver_step(s, x, i, mo, nan)
        b, _ = dpm_solver_step(s, x, i, mo, None)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_bad_arguments_are_named():
    s = Schedule.linear(1000).select(dpm_indices(1000, 6))
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="prev_x0 is required"):
        dpm_solver_step(s, x, 3, x, None)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        dpm_solver_step(s, x, 3, x, x, order=3)
    with pytest.raises(ValueError, match="solver_type must be one of"):
        dpm_solver_step(s, x, 3, x, x, solver_type="bh2")
    with pytest.raises(ValueError, match="noise is required"):
        dpm_solver_step(s, x, 3, x, x, method="sde-dpmsolver++")
    with pytest.raises(ValueError, match="prev_x0 must have shape"):
        dpm_solver_step(s, x, 3, x, x[:1])
    with pytest.raises(ValueError, match="order applies to"):
        fastddpm.sample(lambda x, t: x, 1, shape=(1, 2, 2), steps=5, order=1)
    with pytest.raises(ValueError, match=r"the stochastic variant is method='sde-dpmsolver\+\+'"):
        fastddpm.sample(lambda x, t: x, 1, shape=(1, 2, 2), steps=5, method="dpmsolver++", eta=1.0)
    with pytest.raises(ValueError, match="variance applies"):
        fastddpm.sample(lambda x, t: x, 1, shape=(1, 2, 2), steps=5, method="dpmsolver++", variance="fixed_large")
    with pytest.raises(ValueError, match="repeat or leave the schedule"):
        dpm_indices(10, 10, "leading")


# ------------------------------------------------------------------------------ against diffusers
diffusers = pytest.importorskip("diffusers")


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 16), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@torch.no_grad()
def diffusers_loop(model, sched, n, gen, shape=(3, 8, 8)):
    x = torch.randn((n, *shape), generator=gen)
    for t in sched.timesteps:
        out = model(x, t)
        x = sched.step(out.sample if hasattr(out, "sample") else out, t, x, generator=gen).prev_sample
    return x


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


def dpm_scheduler(spacing="linspace", steps=10, **kw):
    sched = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing,
                                                  steps_offset=1 if spacing == "leading" else 0, **kw)
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("steps", [7, 10, 20, 25])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_respacing_equals_diffusers_set_timesteps(spacing, steps):
    sched = dpm_scheduler(spacing, steps)
    want = np.sort(sched.timesteps.numpy())
    np.testing.assert_array_equal(dpm_indices(1000, steps, spacing, 1 if spacing == "leading" else 0), want)
    np.testing.assert_array_equal(Schedule.from_diffusers(sched).timesteps.numpy(), want)


@pytest.mark.parametrize("order,solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun")])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_sde_loop_equals_diffusers_on_a_random_unet(order, solver_type, spacing, pt):
    unet = tiny_unet()
    sched = dpm_scheduler(spacing, algorithm_type="sde-dpmsolver++", solver_order=order, solver_type=solver_type,
                          prediction_type=pt)
    want = diffusers_loop(unet, sched, 2, torch.Generator().manual_seed(1))
    got = fastddpm.sample(unet, 2, **compat.sample_kwargs(sched), generator=torch.Generator().manual_seed(1))
    assert rel_l2(got, want) < 1e-4


@pytest.mark.parametrize("order,solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun")])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("pred", ["eps", "v"])
def test_ode_loop_equals_diffusers_on_the_exact_gaussian_model(order, solver_type, spacing, pred):
    base = Schedule.linear(1000)
    shape = (2, 3, 3)
    model = GaussianDataModel(base, torch.linspace(-0.5, 0.5, 18).reshape(shape),
                              torch.linspace(0.2, 0.9, 18).reshape(shape), prediction=pred)
    sched = dpm_scheduler(spacing, 15, solver_order=order, solver_type=solver_type,
                          prediction_type={"eps": "epsilon", "v": "v_prediction"}[pred],
                          lower_order_final=order == 2, euler_at_final=spacing == "trailing")
    want = diffusers_loop(model, sched, 16, torch.Generator().manual_seed(6), shape=shape)
    got = fastddpm.sample(model, 16, shape=shape, **compat.sample_kwargs(sched),
                          generator=torch.Generator().manual_seed(6))
    assert rel_l2(got, want) < 1e-4


def test_sample_steps_respaces_like_diffusers_default():
    """fastddpm.sample(steps=k, method='dpmsolver++') uses DPMSolverMultistepScheduler's default spacing."""
    unet = tiny_unet()
    sched = dpm_scheduler("linspace", 12)
    want = diffusers_loop(unet, sched, 2, torch.Generator().manual_seed(2))
    got = fastddpm.sample(unet, 2, schedule=Schedule.linear(1000), steps=12, method="dpmsolver++",
                          generator=torch.Generator().manual_seed(2))
    assert rel_l2(got, want) < 1e-4


def test_seed_mode_is_the_same_images_for_any_batch_size():
    unet = tiny_unet()
    kw = dict(schedule=Schedule.linear(1000), steps=8, method="sde-dpmsolver++", seed=3)
    a = fastddpm.sample(unet, 5, batch_size=5, **kw)
    b = fastddpm.sample(unet, 5, batch_size=2, **kw)
    assert rel_l2(b, a) < 1e-4
    assert rel_l2(a, fastddpm.sample(unet, 5, **{**kw, "seed": 4})) > 0.1


@pytest.mark.parametrize("cfg,match", [
    (dict(thresholding=True), "thresholding"),
    (dict(use_exponential_sigmas=True), "use_exponential_sigmas"),
    (dict(use_lu_lambdas=True), "use_lu_lambdas"),
    (dict(final_sigmas_type="sigma_min"), "final_sigmas_type"),
    (dict(lambda_min_clipped=-5.1), "lambda_min_clipped"),
    (dict(variance_type="learned_range"), "variance_type"),
    (dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), "final_sigmas_type"),
    (dict(solver_order=3), "solver_order=3"),
    (dict(prediction_type="flow_prediction"), "prediction_type"),
])
def test_options_fastddpm_cannot_honour_are_refused(cfg, match):
    sched = dpm_scheduler(**cfg)
    with pytest.raises(NotImplementedError, match=match):
        compat.sample_kwargs(sched)


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("spacing,steps", [(sp, k) for sp in ("linspace", "leading", "trailing")
                                           for k in (100, 500, 990, 998, 999)
                                           if (sp, k) not in (("leading", 999), ("trailing", 998))])  # t = T, -1
def test_plain_configurations_at_many_steps_are_followed(beta_schedule, spacing, steps):
    """diffusers' float32 sigmas (up to 2.6e-4 off the float64 noise levels near t = 0) are its
    timesteps' noise levels: followed at any step count, never refused for their rounding."""
    sched = dpm_scheduler(spacing, steps, beta_schedule=beta_schedule)
    s = compat.sample_kwargs(sched)["schedule"]
    assert s.timesteps.tolist() == sorted(sched.timesteps.tolist()) and s.num_steps == steps
    levels = ((1 - s.alphas_cumprod) / s.alphas_cumprod).sqrt().flip(0)  # float64, in diffusers' order
    rel = ((sched.sigmas[:-1].double() - levels).abs() / levels).max()
    assert rel <= diffusers_schedule.SIGMA_RTOL


def test_the_issues_999_linspace_steps_give_diffusers_images():
    """Refused before (issue 25): 999 "linspace" steps on a 1000-step schedule, whose sigmas near
    t = 0 are 7.6e-5 off in float32. On the exact Gaussian model, the same images as diffusers."""
    base = Schedule.linear(1000)
    shape = (2, 3, 3)
    model = GaussianDataModel(base, torch.linspace(-0.5, 0.5, 18).reshape(shape),
                              torch.linspace(0.2, 0.9, 18).reshape(shape))
    sched = dpm_scheduler("linspace", 999)
    levels = ((1 - base.alphas_cumprod[sched.timesteps.long()]) / base.alphas_cumprod[sched.timesteps.long()]).sqrt()
    assert ((sched.sigmas[:-1].double() - levels).abs() / levels).max() > 1e-5  # what the old check refused
    want = diffusers_loop(model, sched, 16, torch.Generator().manual_seed(6), shape=shape)
    got = fastddpm.sample(model, 16, shape=shape, **compat.sample_kwargs(sched),
                          generator=torch.Generator().manual_seed(6))
    assert rel_l2(got, want) < 1e-4


def test_other_noise_levels_and_timesteps_outside_training_are_refused():
    sched = dpm_scheduler("linspace", 50)
    sched.sigmas[:-1] *= 1 + 1e-4  # rounding-sized: followed
    compat.sample_kwargs(sched)
    sched.sigmas[:-1] *= 1 + 3e-3  # another family of noise levels
    with pytest.raises(NotImplementedError, match="sigmas are not the noise levels of its timesteps followed by 0"):
        compat.sample_kwargs(sched)
    with pytest.raises(NotImplementedError, match=r"timesteps run from 999 down to -1, outside the 1000 training "
                                                  r"timesteps 0..999 \(timestep_spacing='trailing'"):
        compat.sample_kwargs(dpm_scheduler("trailing", 998))
    with pytest.raises(NotImplementedError, match=r"timesteps run from 1000 down to 2, outside"):  # t = T
        compat.sample_kwargs(dpm_scheduler("leading", 999))  # steps_offset=1
    with pytest.raises(NotImplementedError, match=r"repeats timesteps \[\d+\] \(1000 steps"):
        compat.sample_kwargs(dpm_scheduler("linspace", 1000))


def test_sample_kwargs_and_contradictions():
    sched = dpm_scheduler("trailing", algorithm_type="sde-dpmsolver++", solver_order=1, prediction_type="v_prediction")
    kw = compat.sample_kwargs(sched)
    assert {k: v for k, v in kw.items() if k != "schedule"} == dict(
        prediction="v", clip=None, method="sde-dpmsolver++", order=1, solver_type="midpoint")
    with pytest.raises(ValueError, match="order=2 contradicts"):
        fastddpm.sample(tiny_unet(), 1, **{**kw, "order": 2})
    with pytest.raises(ValueError, match="clip=1.0 contradicts"):
        fastddpm.sample(tiny_unet(), 1, **{**kw, "clip": 1.0})

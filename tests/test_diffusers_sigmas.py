"""diffusers' k-diffusion-style schedulers through fastddpm.compat (fastddpm.diffusers_sigmas):
Euler, EulerAncestral, Heun, KDPM2, LMS and DPMSolverMultistep with Karras sigmas.

- parity with the installed diffusers itself: a hand-written diffusers loop (as its pipelines:
  latents = randn * init_noise_sigma, scale_model_input, unet, step with the generator) on a small
  random UNet2DModel against fastddpm.sample(unet, n, **compat.sample_kwargs(scheduler),
  generator=...) on the reference and the fused backends: 1e-4 relative L2 on the final images,
  and the model called with exactly the scheduler's timesteps, evaluation by evaluation;
- what cannot be honoured is refused with the exact message.
"""
import inspect
import re

import pytest
import torch

import fastddpm
from fastddpm import Schedule, compat, karras, methods
from fastddpm.diffusers_sigmas import RECORD

diffusers = pytest.importorskip("diffusers")


class Recorder(torch.nn.Module):
    """A small random UNet2DModel that records the timestep of every call (its first element)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                          block_out_channels=(16, 16), norm_num_groups=8,
                                          down_block_types=("DownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "UpBlock2D")).eval()
        self.config = self.unet.config
        self.seen = []

    def forward(self, x, t):
        t = torch.as_tensor(t)
        self.seen.append(t.reshape(-1)[0].clone())
        return self.unet(x, t)


@torch.no_grad()
def diffusers_loop(model, sched, n, gen, shape=(3, 8, 8)):
    """A diffusers pipeline's loop (StableDiffusionPipeline's, without guidance): the generator goes to
    step() where it takes one (prepare_extra_step_kwargs)."""
    takes_gen = "generator" in inspect.signature(sched.step).parameters
    x = torch.randn((n, *shape), generator=gen) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t).sample
        x = sched.step(out, t, x, **({"generator": gen} if takes_gen else {})).prev_sample
    return x


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


E, EA, HEUN, KDPM2, LMS, DPM = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                                "KDPM2DiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler")
KARRAS = dict(use_karras_sigmas=True)
CASES = [  # (scheduler, config, steps, the fastddpm method it maps to)
    (E, {}, 6, "euler"),
    (E, dict(timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"), 5, "euler"),
    (E, dict(use_karras_sigmas=True, timestep_spacing="trailing"), 4, "euler"),
    (E, dict(timestep_type="continuous", prediction_type="v_prediction"), 4, "euler"),
    (EA, {}, 6, "euler_ancestral"),
    (EA, dict(timestep_spacing="leading", prediction_type="v_prediction"), 5, "euler_ancestral"),
    (HEUN, {}, 4, "heun"),
    (HEUN, dict(use_karras_sigmas=True, prediction_type="v_prediction", clip_sample=True), 4, "heun"),
    (KDPM2, {}, 4, "dpm_2"),
    (KDPM2, dict(use_karras_sigmas=True, timestep_spacing="leading", prediction_type="v_prediction"), 4, "dpm_2"),
    (LMS, {}, 6, "lms"),
    (LMS, dict(prediction_type="sample", timestep_spacing="trailing", use_exponential_sigmas=True), 5, "lms"),
    (DPM, KARRAS, 6, "dpmpp_2m"),
    (DPM, dict(KARRAS, prediction_type="v_prediction", solver_type="heun"), 5, "dpmpp_2m_sde"),
    (DPM, dict(KARRAS, algorithm_type="sde-dpmsolver++"), 6, "dpmpp_2m_sde"),
    (DPM, dict(KARRAS, algorithm_type="sde-dpmsolver++", solver_type="heun", prediction_type="v_prediction"), 5,
     "dpmpp_2m_sde"),
    (DPM, dict(KARRAS, solver_order=1), 4, "euler"),
    (DPM, dict(KARRAS, solver_order=1, algorithm_type="sde-dpmsolver++"), 4, "euler_ancestral"),
]


@pytest.mark.parametrize("kind,cfg,steps,method", CASES, ids=[f"{c[0][:-9]}-{i}" for i, c in enumerate(CASES)])
def test_matches_the_diffusers_loop(kind, cfg, steps, method):
    model = Recorder()
    sched = getattr(diffusers, kind)(**cfg)
    sched.set_timesteps(steps)
    want = diffusers_loop(model, sched, 2, torch.Generator().manual_seed(5))
    want_t = torch.stack(model.seen)
    kw = compat.sample_kwargs(sched)
    assert kw["method"] == method
    assert kw["schedule"].num_steps == sched.config.num_train_timesteps  # the training schedule
    for backend in ("reference", "fused"):
        model.seen = []
        got = fastddpm.sample(model, 2, **kw, generator=torch.Generator().manual_seed(5), backend=backend)
        assert rel_l2(got, want) < 1e-4, backend
        # the model saw exactly the scheduler's timesteps (np.interp / rounded / KDPM2's midpoints), integers
        # as integers; floats as float32 (KDPM2 with Karras sigmas passes float64, which UNet2DModel's time
        # embedding rounds to float32 first)
        seen = torch.stack(model.seen)
        assert seen.is_floating_point() == want_t.is_floating_point(), (seen.dtype, want_t.dtype)
        assert torch.equal(seen.float(), want_t.float()), (backend, seen, want_t)
    # a different seed gives different images: the noise is the generator's
    other = fastddpm.sample(model, 2, **kw, generator=torch.Generator().manual_seed(6), backend="reference")
    assert rel_l2(other, want) > 0.1


def test_the_mapping():
    sched = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++",
                                                  solver_type="heun", prediction_type="v_prediction")
    sched.set_timesteps(5)
    kw = compat.sample_kwargs(sched)
    assert {k: v for k, v in kw.items() if k not in ("schedule", "sigmas")} == dict(
        method="dpmpp_2m_sde", eta=1.0, solver_type="heun", prediction="v", clip=None, quantize=True)
    assert torch.equal(kw["sigmas"], sched.sigmas.double())
    heun = diffusers.HeunDiscreteScheduler(clip_sample=True, clip_sample_range=2.0)
    heun.set_timesteps(3)
    kw = compat.sample_kwargs(heun)
    assert (kw["method"], kw["clip"], kw["prediction"]) == ("heun", 2.0, "eps")
    assert torch.equal(kw["sigmas"], torch.cat([heun.sigmas[:1], heun.sigmas[1::2]]).double())
    lms = diffusers.LMSDiscreteScheduler()
    lms.set_timesteps(4)
    assert compat.sample_kwargs(lms)["order"] == 4
    # Schedule.from_diffusers gives the training schedule, with the record once set_timesteps was called
    s = Schedule.from_diffusers(diffusers.EulerDiscreteScheduler())
    assert s.num_steps == 1000 and RECORD not in s.source_options
    assert s.source_options == {"method": "euler", "prediction": "eps", "clip": None}


def test_recorded_timesteps_apply_only_to_the_recorded_evaluations():
    """With s_churn > 0 (sigma_hat is not a level diffusers evaluates at) or another method, the
    plan falls back to k-diffusion's sigma_to_t and k-diffusion's initial noise."""
    sched = diffusers.EulerDiscreteScheduler(timestep_spacing="leading")
    sched.set_timesteps(5)
    kw = compat.sample_kwargs(sched)
    s, sig = kw["schedule"], kw["sigmas"]

    def plan(method, **given):
        return karras.build_plan(method, sig, s, "eps", methods.resolve(method, **given))

    p = plan("euler")
    assert torch.equal(p.timestep.float(), sched.timesteps)
    assert p.init_std == pytest.approx(float(sched.init_noise_sigma) / float((sig[0] ** 2 + 1).sqrt()), rel=1e-12)
    for p in (plan("euler", s_churn=1.0), plan("heun")):
        assert torch.equal(p.timestep, fastddpm.sigmas.sigma_to_t(p.sigma, s))
        assert p.init_std == pytest.approx(float(sig[0]) / float((p.sigma[0] ** 2 + 1).sqrt()), rel=1e-12)
    # the default path (no record) is k-diffusion's
    bare = karras.build_plan("euler", sig, Schedule.from_betas(s.betas), "eps", methods.resolve("euler"))
    assert torch.equal(bare.timestep, fastddpm.sigmas.sigma_to_t(bare.sigma, s))


@pytest.mark.parametrize("kind,cfg,exc,message", [
    (E, dict(final_sigmas_type="sigma_min"), NotImplementedError,
     "EulerDiscreteScheduler has final_sigmas_type='sigma_min' (the last step stops at sigma_min without denoising; "
     "fastddpm's sigma samplers end at sigma 0); fastddpm supports final_sigmas_type='zero' only"),
    (E, dict(interpolation_type="log_linear"), NotImplementedError,
     "EulerDiscreteScheduler has interpolation_type='log_linear' (it makes k + 1 noise levels for k timesteps, so "
     "diffusers' loop stops one level above 0 without denoising); fastddpm supports interpolation_type='linear' only"),
    (E, dict(rescale_betas_zero_snr=True), NotImplementedError,
     "EulerDiscreteScheduler has rescale_betas_zero_snr=True (zero-terminal-SNR betas: the training schedule reaches "
     "alphas_cumprod 0, an infinite noise level); fastddpm supports rescale_betas_zero_snr=False only"),
    (EA, dict(prediction_type="sample"), NotImplementedError,
     "EulerAncestralDiscreteScheduler prediction_type='sample' is not supported (diffusers' "
     "EulerAncestralDiscreteScheduler implements ['epsilon', 'v_prediction']); supported: ['epsilon', "
     "'v_prediction']"),
    (KDPM2, dict(prediction_type="sample"), NotImplementedError, "KDPM2DiscreteScheduler prediction_type='sample'"),
    (LMS, dict(prediction_type="flow_prediction"), NotImplementedError,
     "LMSDiscreteScheduler prediction_type='flow_prediction' is not supported (diffusers' LMSDiscreteScheduler "
     "implements ['epsilon', 'sample', 'v_prediction']); supported: ['epsilon', 'sample', 'v_prediction']"),
    (DPM, dict(KARRAS, solver_order=3), NotImplementedError,
     "DPMSolverMultistepScheduler has solver_order=3; supported: 1, 2"),
    (DPM, dict(KARRAS, variance_type="learned_range"), NotImplementedError,
     "DPMSolverMultistepScheduler has variance_type='learned_range' (a learned variance output); fastddpm supports "
     "variance_type=None only"),
    (DPM, dict(KARRAS, thresholding=True), NotImplementedError,
     "DPMSolverMultistepScheduler has thresholding=True (dynamic thresholding; fastddpm supports fixed clipping "
     "only (clip=)); fastddpm supports thresholding=False only"),
    (DPM, dict(KARRAS, final_sigmas_type="sigma_min"), NotImplementedError,
     "DPMSolverMultistepScheduler has final_sigmas_type='sigma_min' (the last step to sigma_min; fastddpm's last "
     "step goes to sigma 0); fastddpm supports final_sigmas_type='zero' only"),
    (DPM, dict(use_exponential_sigmas=True), NotImplementedError,
     "DPMSolverMultistepScheduler has use_exponential_sigmas=True"),
])
def test_what_cannot_be_honoured_is_refused(kind, cfg, exc, message):
    sched = getattr(diffusers, kind)(**cfg)
    sched.set_timesteps(4)
    with pytest.raises(exc, match=re.escape(message)):
        compat.sample_kwargs(sched)


def test_bad_use_is_refused():
    with pytest.raises(ValueError, match=re.escape(
            "EulerDiscreteScheduler: call scheduler.set_timesteps(num_inference_steps) before "
            "fastddpm.compat.sample_kwargs(scheduler): its noise levels depend on the number of steps")):
        compat.sample_kwargs(diffusers.EulerDiscreteScheduler())
    sched = diffusers.EulerDiscreteScheduler()
    sched.set_timesteps(sigmas=[10.0, 1.0, 0.1])  # a custom list without the final 0: diffusers stops at 0.1
    with pytest.raises(NotImplementedError, match="are not k strictly decreasing positive levels followed by 0"):
        compat.sample_kwargs(sched)
    sched = diffusers.LMSDiscreteScheduler(prediction_type="v_prediction")
    sched.set_timesteps(4)
    kw = compat.sample_kwargs(sched)
    model = Recorder()
    with pytest.raises(ValueError, match=re.escape("prediction='eps' contradicts the diffusers scheduler")):
        fastddpm.sample(model, 1, **{**kw, "prediction": "eps"})
    with pytest.raises(ValueError, match="s_churn applies to method='euler' / 'heun' / 'dpm_2' only"):
        fastddpm.sample(model, 1, **kw, s_churn=1.0)
    assert model.seen == []  # refused before any model call

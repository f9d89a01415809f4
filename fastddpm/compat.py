"""Bridges to diffusers: schedulers, sampler options, and diffusers-format weights.

`Schedule.from_diffusers(scheduler)` honours the betas as configured (beta_schedule linear
/ scaled_linear / squaredcos_cap_v2, or trained_betas: read from `scheduler.betas`),
num_train_timesteps, and `set_timesteps` respacing (timestep_spacing, steps_offset: the
schedule is respaced to exactly `scheduler.timesteps`). It also records the scheduler's
prediction_type, variance_type and clip_sample / clip_sample_range; `fastddpm.sample`
refuses arguments that contradict them, and `sample_kwargs(scheduler)` returns them
ready to pass:

    x = fastddpm.sample(pipe.unet, 16, **fastddpm.compat.sample_kwargs(pipe.scheduler),
                        generator=torch.Generator().manual_seed(0))

DPMSolverMultistepScheduler maps algorithm_type ("dpmsolver++" / "sde-dpmsolver++"),
solver_order (1, 2), solver_type, timestep_spacing / steps_offset (through its timesteps),
prediction_type, lower_order_final and euler_at_final (no-ops with final_sigmas_type="zero").

Euler / EulerAncestral / Heun / KDPM2 / LMS DiscreteScheduler and DPMSolverMultistepScheduler
with use_karras_sigmas=True map to k-diffusion's samplers on the scheduler's own noise levels and
timesteps (after set_timesteps): see fastddpm.diffusers_sigmas.

Refused with an error, never silently changed: dynamic thresholding, zero-terminal-SNR
rescaling, DDIM's set_alpha_to_one=False, variance_type="learned" (a raw log variance),
DPM-Solver's exponential / beta / Lu / flow sigmas, final_sigmas_type="sigma_min",
lambda_min_clipped, a variance_type, algorithm_type "dpmsolver" / "sde-dpmsolver", solver_order 3,
and DDIM respacings whose `t - T // k` previous timestep is not the previous kept step.

The one place where diffusers differs from the papers: DDPMScheduler adds noise at the
final step whenever its timestep is above 0 (with "trailing" spacing the last timestep is
T/k - 1). With variance_type="fixed_large" that noise is sqrt(beta_t) z, a visible amount;
with "fixed_small" it is ~1e-10. fastddpm never adds noise at the final step (Ho et al.
Algorithm 2); in generator mode it still draws that last noise, so every earlier draw,
and every earlier step, matches diffusers exactly.

denoising-diffusion-pytorch (lucidrains): `sample_kwargs(diffusion)` also takes its
`GaussianDiffusion` / `LearnedGaussianDiffusion` (duck-typed, the package is not imported):

    x = fastddpm.sample(diffusion.model, 16, **fastddpm.compat.sample_kwargs(diffusion),
                        generator=torch.Generator().manual_seed(0))
    images = diffusion.unnormalize(x)   # what diffusion.sample(16) returns after torch.manual_seed(0)

See `gaussian_diffusion_kwargs` for what is mapped and what is refused.

Its classifier-free guidance GaussianDiffusion (denoising_diffusion_pytorch.classifier_free_guidance)
maps with its sample() options, cond_scale=6 and rescaled_phi=0.7 by default:

    x = fastddpm.sample(diffusion.model, n, class_labels=classes,
                        **fastddpm.compat.sample_kwargs(diffusion, cond_scale=6.0, rescaled_phi=0.7),
                        generator=torch.Generator().manual_seed(0))
    images = (x + 1) * 0.5   # what diffusion.sample(classes) returns after torch.manual_seed(0)

See `cfg_gaussian_diffusion_kwargs`.
"""
from __future__ import annotations

import os

import torch

from .diffusers_schedule import (PREDICTION_FROM_DIFFUSERS, VARIANCE_FROM_DIFFUSERS, sampler_options,  # noqa: F401
                                 schedule_from_diffusers)
from .diffusers_sigmas import is_sigma_scheduler, sigma_sample_kwargs
from .schedule import Schedule


def sample_kwargs(scheduler, **guidance) -> dict:
    """Keyword arguments for `fastddpm.sample` that reproduce a diffusers scheduler:
    schedule (betas + respacing), method, prediction, clip, (DDPM) variance and (DPM-Solver++)
    order and solver_type; for Euler / EulerAncestral / Heun / KDPM2 / LMS and DPM-Solver with
    Karras sigmas (after set_timesteps) the training schedule, a sigma method, its options and
    the scheduler's noise levels (fastddpm.diffusers_sigmas); or a denoising-diffusion-pytorch
    GaussianDiffusion (see `gaussian_diffusion_kwargs`), or its classifier-free guidance
    GaussianDiffusion, whose sample() options cond_scale= / rescaled_phi= are taken here (see
    `cfg_gaussian_diffusion_kwargs`)."""
    if is_cfg_gaussian_diffusion(scheduler):
        return cfg_gaussian_diffusion_kwargs(scheduler, **guidance)
    if guidance:
        raise TypeError(f"sample_kwargs: {', '.join(sorted(guidance))} apply to denoising-diffusion-pytorch's "
                        "classifier_free_guidance.GaussianDiffusion only (its sample() options); for a "
                        f"{type(scheduler).__name__} pass guidance_scale= / guidance_rescale= to fastddpm.sample")
    if is_gaussian_diffusion(scheduler):
        return gaussian_diffusion_kwargs(scheduler)
    if is_sigma_scheduler(scheduler):
        return sigma_sample_kwargs(Schedule, scheduler)

    s = Schedule.from_diffusers(scheduler)
    return {"schedule": s, **s.source_options}


def load_diffusers_unet(folder: str, device="cpu", dtype=None):
    """A diffusers UNet2DModel from a local folder (config.json + diffusion_pytorch_model.safetensors),
    offline (no hub access). Needs diffusers installed."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder!r} has no config.json: not a diffusers model folder")
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise ImportError("load_diffusers_unet needs diffusers: pip install diffusers") from e
    model = UNet2DModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    return model.to(device=device, dtype=dtype).eval()


# ------------------------------------------------------------------ denoising-diffusion-pytorch
OBJECTIVE_FROM_DDPM_PYTORCH = {"pred_noise": "eps", "pred_x0": "x0", "pred_v": "v"}
# the methods its sampling runs through: all must be the package's own (a subclass that
# overrides one, e.g. WeightedObjectiveGaussianDiffusion's p_mean_variance, samples differently)
_DDPM_PYTORCH_SAMPLING = ("model_predictions", "p_mean_variance", "p_sample", "p_sample_loop", "ddim_sample",
                          "sample", "q_posterior", "predict_start_from_noise", "predict_noise_from_start",
                          "predict_start_from_v")
_DDPM_PYTORCH_CLASSES = ("GaussianDiffusion", "LearnedGaussianDiffusion")


def is_gaussian_diffusion(obj) -> bool:
    """Whether obj looks like denoising-diffusion-pytorch's GaussianDiffusion (duck-typed)."""
    return all(hasattr(obj, a) for a in ("objective", "num_timesteps", "sampling_timesteps", "betas", "model",
                                         "image_size", "channels", "self_condition", "ddim_sampling_eta"))


def _ddpm_pytorch_betas(T: int, schedule: str) -> torch.Tensor:
    """The package's beta schedules (linear_beta_schedule, cosine_beta_schedule,
    sigmoid_beta_schedule with their default arguments), in float64 as it computes them."""
    import math

    if schedule == "linear":
        scale = 1000 / T
        return torch.linspace(scale * 0.0001, scale * 0.02, T, dtype=torch.float64)
    t = torch.linspace(0, T, T + 1, dtype=torch.float64) / T
    if schedule == "cosine":
        abar = torch.cos((t + 0.008) / (1 + 0.008) * math.pi * 0.5) ** 2
    else:  # sigmoid, start=-3, end=3, tau=1
        v_start, v_end = torch.tensor(-3.0).sigmoid(), torch.tensor(3.0).sigmoid()
        abar = (-((t * 6 - 3) / 1).sigmoid() + v_end) / (v_end - v_start)
    abar = abar / abar[0]
    return torch.clip(1 - abar[1:] / abar[:-1], 0, 0.999)


def _betas_float64(diffusion) -> torch.Tensor:
    """float64 betas: the package keeps only float32 buffers, so its float64 betas are
    recomputed when one of its named schedules rounds to exactly that buffer; otherwise (custom
    schedule_fn_kwargs) the float32 betas are used, ~1e-7 relative off in every coefficient."""
    b32 = diffusion.betas.detach().to("cpu", torch.float32)
    for name in ("linear", "cosine", "sigmoid"):
        b64 = _ddpm_pytorch_betas(b32.numel(), name)
        if torch.equal(b64.float(), b32):
            return b64
    return b32.double()


def ddim_timesteps(num_timesteps: int, sampling_timesteps: int) -> list:
    """The training timesteps the package's ddim_sample visits, ascending:
    linspace(-1, T - 1, S + 1) truncated to int, without the final -1."""
    times = torch.linspace(-1, num_timesteps - 1, steps=sampling_timesteps + 1).int().tolist()
    return [t for t in times if t >= 0]


def _check_ddpm_pytorch_class(diffusion):
    kind = type(diffusion).__name__
    for name in _DDPM_PYTORCH_SAMPLING:
        fn = getattr(type(diffusion), name, None)
        owner = getattr(fn, "__qualname__", "").split(".")[0]
        module = getattr(fn, "__module__", "") or ""
        if not module.startswith("denoising_diffusion_pytorch") or owner not in _DDPM_PYTORCH_CLASSES:
            raise NotImplementedError(
                f"{kind}.{name} is not denoising-diffusion-pytorch's GaussianDiffusion / LearnedGaussianDiffusion "
                f"code (it comes from {module or '?'}.{owner or '?'}); fastddpm reproduces those two classes' "
                "sampling only")


def gaussian_diffusion_kwargs(diffusion) -> dict:
    """`fastddpm.sample` keyword arguments reproducing `diffusion.sample()` of denoising-diffusion-pytorch
    (2.x) for a GaussianDiffusion / LearnedGaussianDiffusion:

    - schedule: its betas in float64 (see `_betas_float64`); when sampling_timesteps <
      timesteps, respaced to the DDIM timesteps of its ddim_sample (`ddim_timesteps`);
    - method "ddim" (eta = ddim_sampling_eta, use_clipped_model_output=True: its DDIM
      re-derives the noise from the clipped x0) or "ddpm" (its p_sample_loop);
    - prediction from objective (pred_noise eps, pred_x0 x0, pred_v v); clip 1.0 (it always
      clips x0 to [-1, 1] while sampling); variance "fixed_small" (its posterior variance with
      the log clamped at 1e-20, as ours), or "learned_range" for LearnedGaussianDiffusion,
      whose p_mean_variance reads the first half of the output as noise whatever objective
      says (and whose loss trains it on noise): prediction "eps";
    - shape (channels, *image_size); self_condition (the model's).

    fastddpm returns samples in model space ([-1, 1]); `diffusion.unnormalize` maps them to
    what the package returns: (x + 1) / 2 with auto_normalize=True (no clamp), else x itself.
    Training-only options (offset_noise_strength, immiscible, min_snr_loss_weight) do not
    change sampling. Refused: classes whose sampling code is not the package's own, and
    LearnedGaussianDiffusion with DDIM (its 2C-channel output; fastddpm's DDIM takes C).
    """
    _check_ddpm_pytorch_class(diffusion)
    kind = type(diffusion).__name__
    objective = diffusion.objective
    if objective not in OBJECTIVE_FROM_DDPM_PYTORCH:
        raise NotImplementedError(f"{kind} objective={objective!r} is not supported; supported: "
                                  f"{sorted(OBJECTIVE_FROM_DDPM_PYTORCH)}")
    learned = type(diffusion).p_mean_variance.__qualname__.startswith("LearnedGaussianDiffusion.")
    T, S = int(diffusion.num_timesteps), int(diffusion.sampling_timesteps)
    ddim = bool(getattr(diffusion, "is_ddim_sampling", S < T))
    if learned and ddim:
        raise NotImplementedError(
            f"{kind} with DDIM sampling (sampling_timesteps={S} < timesteps={T}): the model returns 2C channels "
            "(noise and variance) and fastddpm's DDIM takes C; sample with sampling_timesteps=timesteps (DDPM), "
            f"or pass model=lambda x, t: diffusion.model(x, t)[:, :{int(diffusion.channels)}] with method='ddim'")
    s, ddim = _ddpm_pytorch_schedule(diffusion)
    h, w = diffusion.image_size if isinstance(diffusion.image_size, (tuple, list)) else (diffusion.image_size,) * 2
    return {
        "schedule": s,
        "method": "ddim" if ddim else "ddpm",
        "eta": float(diffusion.ddim_sampling_eta) if ddim else 0.0,
        "prediction": "eps" if learned else OBJECTIVE_FROM_DDPM_PYTORCH[objective],
        "variance": "learned_range" if learned else "fixed_small",
        "clip": 1.0,
        "shape": (int(diffusion.channels), int(h), int(w)),
        "use_clipped_model_output": ddim,
        "self_condition": bool(diffusion.self_condition),
    }


def _ddpm_pytorch_schedule(diffusion):
    """(schedule, ddim): the package's betas in float64, respaced to its DDIM timesteps when
    sampling_timesteps < timesteps (its ddim_sample), else all of them (its p_sample_loop)."""
    kind = type(diffusion).__name__
    T, S = int(diffusion.num_timesteps), int(diffusion.sampling_timesteps)
    ddim = bool(getattr(diffusion, "is_ddim_sampling", S < T))
    s = Schedule.from_betas(_betas_float64(diffusion))
    if ddim:
        idx = ddim_timesteps(T, S)
        if len(set(idx)) != len(idx):
            raise NotImplementedError(f"{kind}: sampling_timesteps={S} of {T} repeats DDIM timesteps {idx[:6]}...")
        s = s.select(idx)
    return s, ddim


# -------------------------------------------- denoising-diffusion-pytorch's classifier-free guidance
_CFG_MODULE = "denoising_diffusion_pytorch.classifier_free_guidance"
_CFG_SAMPLING = ("model_predictions", "p_mean_variance", "p_sample", "p_sample_loop", "ddim_sample", "sample",
                 "q_posterior", "predict_start_from_noise", "predict_noise_from_start", "predict_start_from_v")
_CFG_UNET = ("forward_with_cond_scale", "forward")


def is_cfg_gaussian_diffusion(obj) -> bool:
    """Whether obj looks like denoising-diffusion-pytorch's classifier_free_guidance.GaussianDiffusion:
    a GaussianDiffusion (no self-conditioning) whose model has forward_with_cond_scale (duck-typed)."""
    return all(hasattr(obj, a) for a in ("objective", "num_timesteps", "sampling_timesteps", "betas", "model",
                                         "image_size", "channels", "ddim_sampling_eta", "use_cfg_plus_plus")) \
        and hasattr(obj.model, "forward_with_cond_scale")


def _check_code(obj, names, owner_name, what):
    for name in names:
        fn = getattr(type(obj), name, None)
        owner = getattr(fn, "__qualname__", "").split(".")[0]
        module = getattr(fn, "__module__", "") or ""
        if module != _CFG_MODULE or owner != owner_name:
            raise NotImplementedError(
                f"{type(obj).__name__}.{name} is not {_CFG_MODULE}.{owner_name}'s code (it comes from "
                f"{module or '?'}.{owner or '?'}); fastddpm reproduces that {what}'s guided sampling only")


def cfg_gaussian_diffusion_kwargs(diffusion, cond_scale=6.0, rescaled_phi=0.7) -> dict:
    """`fastddpm.sample` keyword arguments reproducing `diffusion.sample(classes, cond_scale,
    rescaled_phi)` of denoising-diffusion-pytorch (2.x)'s classifier_free_guidance.GaussianDiffusion
    (defaults: its own, cond_scale=6, rescaled_phi=0.7):

        kw = fastddpm.compat.sample_kwargs(diffusion)                  # or cond_scale=..., rescaled_phi=...
        x = fastddpm.sample(diffusion.model, n, class_labels=classes, **kw,
                            generator=torch.Generator().manual_seed(0))
        images = (x + 1) * 0.5   # what diffusion.sample(classes) returns after torch.manual_seed(0)

    Its sample() always maps to [0, 1] with (x + 1) * 0.5, without a clamp (it has no
    `unnormalize` method and no auto_normalize option); fastddpm returns model space [-1, 1].

    - schedule and method as for its unconditional GaussianDiffusion (`gaussian_diffusion_kwargs`):
      p_sample_loop is "ddpm", ddim_sample (sampling_timesteps < timesteps) is "ddim" with
      eta = ddim_sampling_eta; prediction from objective; clip 1.0; variance "fixed_small";
    - DDIM's noise direction: for pred_noise its ddim_sample uses the guided model output itself
      (use_clipped_model_output=False), for pred_x0 / pred_v the noise derived from the clipped x0
      (use_clipped_model_output=True);
    - the guidance of its Unet.forward_with_cond_scale: two model calls per step (cond_drop_prob
      0, then 1: its null is a learned embedding, chosen per call; fastddpm.guidance.class_keyword
      supplies those keywords for its Unet), guidance_scale = cond_scale, guidance_parallel = 0
      (remove_parallel_component=True, keep_parallel_frac=0: the part of the guidance direction
      parallel to the conditional output is removed), guidance_rescale = rescaled_phi.

    Refused: cond_scale=1 (its forward_with_cond_scale then returns one tensor, which
    model_predictions unpacks as a pair: the package fails, or with 2 images mixes them up; for
    conditional sampling without guidance pass class_labels= and guidance_scale=1 to
    fastddpm.sample yourself); rescaled_phi outside [0, 1]; use_cfg_plus_plus=True with DDIM
    sampling (CFG++: the noise direction from the unconditional output; with DDPM sampling it
    changes nothing, the package's p_sample reads x0 only, and is accepted); a learned-variance
    Unet; classes or a Unet whose sampling code is not the package's own.
    """
    from . import guidance as guidance_mod

    kind = type(diffusion).__name__
    _check_code(diffusion, _CFG_SAMPLING, "GaussianDiffusion", "GaussianDiffusion")
    _check_code(diffusion.model, _CFG_UNET, "Unet", "Unet")
    objective = diffusion.objective
    if objective not in OBJECTIVE_FROM_DDPM_PYTORCH:
        raise NotImplementedError(f"{kind} objective={objective!r} is not supported; supported: "
                                  f"{sorted(OBJECTIVE_FROM_DDPM_PYTORCH)}")
    if int(getattr(diffusion.model, "out_dim", diffusion.channels)) != int(diffusion.channels):
        raise NotImplementedError(f"{kind}: a Unet with learned variance (out_dim={diffusion.model.out_dim} for "
                                  f"{diffusion.channels} channels) is not supported (the package's "
                                  "classifier-free guidance GaussianDiffusion samples C channels)")
    w = guidance_mod.check_scale(cond_scale, "cond_scale")
    if isinstance(w, torch.Tensor):
        raise TypeError("cond_scale must be a number")
    if w == 1:
        raise ValueError(f"{kind}.sample(classes, cond_scale=1) does not run in denoising-diffusion-pytorch "
                         "(forward_with_cond_scale returns one tensor that model_predictions unpacks as a pair), so "
                         "there is nothing to reproduce; for conditional sampling without guidance call "
                         "fastddpm.sample(diffusion.model, n, class_labels=classes, guidance_scale=1, ...) with the "
                         "other keywords of sample_kwargs(diffusion)")
    phi = guidance_mod.check_unit(rescaled_phi, "rescaled_phi", "fastddpm's guidance_rescale; the package's "
                                  "default 0.7")
    s, ddim = _ddpm_pytorch_schedule(diffusion)
    if ddim and diffusion.use_cfg_plus_plus:
        raise NotImplementedError(f"{kind}(use_cfg_plus_plus=True) with DDIM sampling (sampling_timesteps="
                                  f"{diffusion.sampling_timesteps} < timesteps={diffusion.num_timesteps}): CFG++ (the "
                                  "noise direction from the unconditional output) is not supported")
    h, w_ = diffusion.image_size if isinstance(diffusion.image_size, (tuple, list)) else (diffusion.image_size,) * 2
    return {
        "schedule": s,
        "method": "ddim" if ddim else "ddpm",
        "eta": float(diffusion.ddim_sampling_eta) if ddim else 0.0,
        "prediction": OBJECTIVE_FROM_DDPM_PYTORCH[objective],
        "variance": "fixed_small",
        "clip": 1.0,
        "shape": (int(diffusion.channels), int(h), int(w_)),
        "use_clipped_model_output": ddim and objective != "pred_noise",
        "guidance_scale": float(w),
        "guidance_rescale": phi,
        "guidance_parallel": 0.0,
    }

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
"""
from __future__ import annotations

import os

import torch

from .diffusers_schedule import (PREDICTION_FROM_DIFFUSERS, VARIANCE_FROM_DIFFUSERS, sampler_options,  # noqa: F401
                                 schedule_from_diffusers)
from .diffusers_sigmas import is_sigma_scheduler, sigma_sample_kwargs
from .schedule import Schedule


def sample_kwargs(scheduler) -> dict:
    """Keyword arguments for `fastddpm.sample` that reproduce a diffusers scheduler:
    schedule (betas + respacing), method, prediction, clip, (DDPM) variance and (DPM-Solver++)
    order and solver_type; for Euler / EulerAncestral / Heun / KDPM2 / LMS and DPM-Solver with
    Karras sigmas (after set_timesteps) the training schedule, a sigma method, its options and
    the scheduler's noise levels (fastddpm.diffusers_sigmas); or a denoising-diffusion-pytorch
    GaussianDiffusion (see `gaussian_diffusion_kwargs`)."""
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
    s = Schedule.from_betas(_betas_float64(diffusion))
    if ddim:
        idx = ddim_timesteps(T, S)
        if len(set(idx)) != len(idx):
            raise NotImplementedError(f"{kind}: sampling_timesteps={S} of {T} repeats DDIM timesteps {idx[:6]}...")
        s = s.select(idx)
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

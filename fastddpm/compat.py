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

Refused with an error, never silently changed: dynamic thresholding, zero-terminal-SNR
rescaling, DDIM's set_alpha_to_one=False, variance_type="learned" (a raw log variance),
and DDIM respacings whose `t - T // k` previous timestep is not the previous kept step.

The one place where diffusers differs from the papers: DDPMScheduler adds noise at the
final step whenever its timestep is above 0 (with "trailing" spacing the last timestep is
T/k - 1). With variance_type="fixed_large" that noise is sqrt(beta_t) z, a visible amount;
with "fixed_small" it is ~1e-10. fastddpm never adds noise at the final step (Ho et al.
Algorithm 2); in generator mode it still draws that last noise, so every earlier draw,
and every earlier step, matches diffusers exactly.
"""
from __future__ import annotations

import os

import torch

PREDICTION_FROM_DIFFUSERS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCE_FROM_DIFFUSERS = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                           "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
                           "learned_range": "learned_range"}


def _cfg(scheduler, name, default=None):
    cfg = getattr(scheduler, "config", None)
    if cfg is None:
        return default
    return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)


def schedule_from_diffusers(cls, scheduler):
    kind = type(scheduler).__name__
    betas = getattr(scheduler, "betas", None)
    T = _cfg(scheduler, "num_train_timesteps")
    if betas is None or T is None:
        raise TypeError(f"scheduler must be a diffusers DDPMScheduler or DDIMScheduler; got {kind}")
    if _cfg(scheduler, "thresholding", False):
        raise NotImplementedError(f"{kind} has thresholding=True (dynamic thresholding); fastddpm supports "
                                  "fixed clipping only (clip=)")
    if _cfg(scheduler, "rescale_betas_zero_snr", False):
        raise NotImplementedError(f"{kind} has rescale_betas_zero_snr=True (alphas_cumprod reaches 0); "
                                  "not supported")
    is_ddim = "DDIM" in kind
    if is_ddim and not _cfg(scheduler, "set_alpha_to_one", True):
        raise NotImplementedError("DDIMScheduler has set_alpha_to_one=False (the last step's abar_prev is "
                                  "alphas_cumprod[0], not 1); fastddpm's step 0 always uses abar_prev = 1")
    options = sampler_options(scheduler)
    base = cls.from_betas(torch.as_tensor(betas).double(), num_train_timesteps=int(T))
    base.source_options = options
    if getattr(scheduler, "num_inference_steps", None) is None:
        return base
    ts = torch.as_tensor(scheduler.timesteps).long().cpu()
    idx = torch.sort(ts).values
    k = idx.numel()
    if is_ddim:
        prev = idx[1:] - int(T) // k
        if not torch.equal(prev, idx[:-1]) or int(idx[0]) - int(T) // k >= 0:
            raise NotImplementedError(
                f"DDIMScheduler steps {idx[:4].tolist()}... are not uniformly spaced by T // k = {int(T) // k} "
                f"down to t < 0 (timestep_spacing={_cfg(scheduler, 'timestep_spacing')!r}); diffusers' DDIM would "
                "step between timesteps that are not its kept ones. Use 'leading' or 'trailing' spacing")
    s = base.select(idx)
    s.source_options = options
    return s


def sampler_options(scheduler) -> dict:
    """prediction / variance / clip / method of a diffusers scheduler, in fastddpm's terms."""
    kind = type(scheduler).__name__
    pt = _cfg(scheduler, "prediction_type", "epsilon")
    if pt not in PREDICTION_FROM_DIFFUSERS:
        raise NotImplementedError(f"{kind} prediction_type={pt!r} is not supported; "
                                  f"supported: {sorted(PREDICTION_FROM_DIFFUSERS)}")
    opts = {"prediction": PREDICTION_FROM_DIFFUSERS[pt],
            "clip": float(_cfg(scheduler, "clip_sample_range", 1.0)) if _cfg(scheduler, "clip_sample", True) else None,
            "method": "ddim" if "DDIM" in kind else "ddpm"}
    if opts["method"] == "ddpm":
        vt = _cfg(scheduler, "variance_type", "fixed_small") or "fixed_small"
        if vt not in VARIANCE_FROM_DIFFUSERS:
            raise NotImplementedError(f"{kind} variance_type={vt!r} is not supported; supported: "
                                      f"{sorted(VARIANCE_FROM_DIFFUSERS)}")
        opts["variance"] = VARIANCE_FROM_DIFFUSERS[vt]
    return opts


def sample_kwargs(scheduler) -> dict:
    """Keyword arguments for `fastddpm.sample` that reproduce a diffusers scheduler:
    schedule (betas + respacing), method, prediction, clip and (DDPM) variance."""
    from .schedule import Schedule

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

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

from .diffusers_schedule import (PREDICTION_FROM_DIFFUSERS, VARIANCE_FROM_DIFFUSERS, sampler_options,  # noqa: F401
                                 schedule_from_diffusers)
from .schedule import Schedule


def sample_kwargs(scheduler) -> dict:
    """Keyword arguments for `fastddpm.sample` that reproduce a diffusers scheduler:
    schedule (betas + respacing), method, prediction, clip and (DDPM) variance."""
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

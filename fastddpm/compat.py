"""Bridges to diffusers: schedules from DDPMScheduler / DDIMScheduler objects.

Honoured: the betas as configured (beta_schedule linear / scaled_linear /
squaredcos_cap_v2, or trained_betas: read from `scheduler.betas`), num_train_timesteps,
and `set_timesteps` respacing (timestep_spacing, steps_offset): the schedule is
respaced to exactly `scheduler.timesteps`. Options that would silently change the
numbers are refused with an error: dynamic thresholding, zero-terminal-SNR rescaling,
DDIM's set_alpha_to_one=False, and DDIM respacings whose `t - T // k` previous
timestep is not the previous kept step.
"""
from __future__ import annotations

import torch


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
    base = cls.from_betas(torch.as_tensor(betas).double(), num_train_timesteps=int(T))
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
    return base.select(idx)

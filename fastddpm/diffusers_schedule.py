"""Reading a diffusers scheduler's configuration: its betas and respacing (for
`Schedule.from_diffusers`) and its sampler options in fastddpm's terms.

This module sits below `fastddpm.schedule` (it imports only diffusers_config and, for the
k-diffusion-style schedulers, diffusers_sigmas; the Schedule class is passed in), so data flows
one way: diffusers_config -> diffusers_sigmas -> diffusers_schedule -> schedule -> compat.
`fastddpm.compat` re-exports these names; see its docstring for what is honoured and refused.
"""
from __future__ import annotations

import torch

from .diffusers_config import (_DPM_REFUSED, PREDICTION_FROM_DIFFUSERS, VARIANCE_FROM_DIFFUSERS,  # noqa: F401
                               _cfg, dpm_solver_options)


def schedule_from_diffusers(cls, scheduler):
    kind = type(scheduler).__name__
    from .diffusers_sigmas import is_sigma_scheduler, sigma_schedule

    if is_sigma_scheduler(scheduler):  # Euler, Heun, ..., DPM-Solver with Karras sigmas: the training schedule
        return sigma_schedule(cls, scheduler)
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
    if kind == "DPMSolverMultistepScheduler":
        _check_dpm_sigmas(scheduler, base.alphas_cumprod)
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
    from .diffusers_sigmas import is_sigma_scheduler, sigma_options

    if is_sigma_scheduler(scheduler):
        return sigma_options(scheduler)
    if kind == "DPMSolverMultistepScheduler":
        return dpm_solver_options(scheduler)
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


SIGMA_RTOL = 1e-3  # diffusers' float32 sigmas against float64 noise levels: up to 2.6e-4 (cosine schedule, t = 0)


def _check_dpm_sigmas(scheduler, abar):
    """The scheduler's sigmas must be the noise levels of its kept training timesteps, then 0.

    diffusers computes them in float32, sqrt((1 - abar) / abar) on its float32 alphas_cumprod:
    against fastddpm's float64 levels that is up to 2.6e-4 relative near t = 0 (any plain
    configuration, any step count), rounding that changes nothing fastddpm computes. So they
    are compared to SIGMA_RTOL; another family of noise levels (between the timesteps: Karras,
    exponential, ...) differs by far more there and is refused, as are timesteps outside
    training's (diffusers' trailing / leading spacing at nearly T steps gives -1 or T)."""
    kind = type(scheduler).__name__
    T = abar.numel()
    ts = torch.as_tensor(scheduler.timesteps).long().cpu()
    if ts.numel() and (int(ts.min()) < 0 or int(ts.max()) >= T):
        raise NotImplementedError(
            f"{kind}'s timesteps run from {int(ts.max())} down to {int(ts.min())}, outside the {T} training "
            f"timesteps 0..{T - 1} (timestep_spacing={_cfg(scheduler, 'timestep_spacing')!r}, steps_offset="
            f"{_cfg(scheduler, 'steps_offset', 0)}, {ts.numel()} steps); the model was never trained there: use "
            "fewer steps")
    sig = torch.as_tensor(scheduler.sigmas, dtype=torch.float64).cpu()
    want = ((1 - abar[ts]) / abar[ts]).sqrt()
    if sig.numel() != ts.numel() + 1 or float(sig[-1]) != 0.0 or \
            not torch.allclose(sig[:-1], want, rtol=SIGMA_RTOL, atol=0):
        raise NotImplementedError(f"{kind}'s sigmas are not the noise levels of its timesteps followed by 0; "
                                  "fastddpm cannot follow this configuration")
    values, counts = torch.unique(ts, return_counts=True)
    if (counts > 1).any():
        raise NotImplementedError(f"{kind} repeats timesteps {values[counts > 1].tolist()[:8]} ({ts.numel()} steps, "
                                  f"timestep_spacing={_cfg(scheduler, 'timestep_spacing')!r}); use fewer steps")

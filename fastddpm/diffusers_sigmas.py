"""diffusers' k-diffusion-style schedulers as fastddpm's sigma methods (fastddpm.karras).

    EulerDiscreteScheduler                       -> method "euler"
    EulerAncestralDiscreteScheduler              -> "euler_ancestral" (eta 1)
    HeunDiscreteScheduler                        -> "heun" (clip_sample -> clip on the denoised D)
    KDPM2DiscreteScheduler                       -> "dpm_2"
    LMSDiscreteScheduler                         -> "lms" (order 4, the default of its step)
    DPMSolverMultistepScheduler(use_karras_sigmas=True):
        dpmsolver++ order 2 midpoint             -> "dpmpp_2m"
        dpmsolver++ order 2 heun                 -> "dpmpp_2m_sde" with eta 0, solver_type "heun"
        dpmsolver++ order 1                      -> "euler" (first-order DPM-Solver++ is Euler in sigma)
        sde-dpmsolver++ order 2                  -> "dpmpp_2m_sde" with eta 1 and its solver_type
        sde-dpmsolver++ order 1                  -> "euler_ancestral" with eta 1 (the same update)

After `scheduler.set_timesteps(k)` the noise levels are the scheduler's own (`scheduler.sigmas`,
whatever produced them: timestep_spacing, steps_offset, interpolation, use_karras_sigmas /
use_exponential_sigmas / use_beta_sigmas, sigma_min / sigma_max, custom timesteps or sigmas),
passed to `fastddpm.sample` as a tensor. The model must see the scheduler's own timesteps, not
k-diffusion's log-sigma interpolation: diffusers interpolates sigma LINEARLY in t (np.interp) for
its default sigmas, rounds for DPM-Solver's Karras sigmas, and interpolates KDPM2's midpoints
in log sigma. So the training Schedule returned records, under source_options[RECORD], the
noise levels, the sigma each model evaluation is scaled by, the timestep it is called with, and
the initial noise std; `fastddpm.sigmas.recorded_timesteps` hands them to the plan when the
plan samples exactly those noise levels with those evaluations (otherwise k-diffusion's
sigma_to_t applies, e.g. with s_churn > 0, whose sigma_hat diffusers does not evaluate at).

The initial noise is diffusers' `init_noise_sigma`: sigma_max for timestep_spacing "linspace" /
"trailing", but sqrt(sigma_max^2 + 1) for "leading" (its choice, not k-diffusion's; reproduced).
DPM-Solver starts from standard normal noise in DDPM space, sqrt(sigma_max^2 + 1) in sigma space.

Step keyword arguments (a pipeline passes them to scheduler.step, which sample_kwargs cannot
see): Euler's s_churn / s_tmin / s_tmax / s_noise default to no churn, as here. With s_churn > 0
diffusers scales the model input and picks the timestep by sigma, not by the churned sigma_hat
(k-diffusion, fastddpm), and draws noise only where gamma > 0: not reproduced; pass s_churn= to
fastddpm.sample for Karras et al.'s churn. LMS's `order` (default 4): pass order= to
fastddpm.sample.

Timesteps reach the model as diffusers passes them: float32 (integers for DPM-Solver's rounded
Karras timesteps); KDPM2 with Karras sigmas passes float64, which UNet2DModel's time embedding
rounds to float32 first, as fastddpm passes them.

Refused (NotImplementedError naming the option): final_sigmas_type="sigma_min" (diffusers stops
at sigma_min without denoising), interpolation_type="log_linear" (k + 1 levels for k timesteps:
the same), rescale_betas_zero_snr, prediction_type="sample" for EulerAncestral and KDPM2 (their
step raises), noise levels that are not strictly decreasing and end in 0 (e.g. a custom sigmas=
list without the 0), and for DPM-Solver with Karras sigmas every refusal of
diffusers_config.dpm_solver_options (thresholding, solver_order 3, algorithm_type "dpmsolver" /
"sde-dpmsolver", variance_type, lambda_min_clipped, the other sigma families).
"""
from __future__ import annotations

import torch

from .diffusers_config import PREDICTION_FROM_DIFFUSERS, _cfg, dpm_solver_options

__all__ = ["SIGMA_SCHEDULERS", "RECORD", "is_sigma_scheduler", "sigma_options", "sigma_schedule",
           "sigma_sample_kwargs"]

SIGMA_SCHEDULERS = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_ancestral",
                    "HeunDiscreteScheduler": "heun", "KDPM2DiscreteScheduler": "dpm_2",
                    "LMSDiscreteScheduler": "lms"}
RECORD = "sigma_timesteps"  # the source_options key fastddpm.sigmas.recorded_timesteps reads
_NO_SAMPLE_PREDICTION = ("EulerAncestralDiscreteScheduler", "KDPM2DiscreteScheduler")  # their step raises
_TWO_EVALS = ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler")


def is_sigma_scheduler(scheduler) -> bool:
    """Whether `scheduler` is one of the schedulers this module maps (DPM-Solver with Karras sigmas)."""
    kind = type(scheduler).__name__
    return kind in SIGMA_SCHEDULERS or (kind == "DPMSolverMultistepScheduler"
                                        and bool(_cfg(scheduler, "use_karras_sigmas", False)))


def _refuse(kind, name, got, why, allowed):
    raise NotImplementedError(f"{kind} has {name}={got!r} ({why}); fastddpm supports {name}={allowed!r} only")


def sigma_options(scheduler) -> dict:
    """method, prediction, clip and the method's options of a scheduler this module maps."""
    kind = type(scheduler).__name__
    if kind == "DPMSolverMultistepScheduler":

        o = dpm_solver_options(scheduler)  # its other refusals (thresholding, sigma_min, solver_order 3, ...)
        sde = o["method"] == "sde-dpmsolver++"
        if o["order"] == 1:
            method = {"method": "euler_ancestral", "eta": 1.0} if sde else {"method": "euler"}
        elif sde:
            method = {"method": "dpmpp_2m_sde", "eta": 1.0, "solver_type": o["solver_type"]}
        elif o["solver_type"] == "heun":
            method = {"method": "dpmpp_2m_sde", "eta": 0.0, "solver_type": "heun"}
        else:
            method = {"method": "dpmpp_2m"}
        # diffusers rounds the timesteps of Karras sigmas (except for squaredcos_cap_v2 betas)
        quantize = _cfg(scheduler, "beta_schedule", "linear") != "squaredcos_cap_v2"
        return {**method, "prediction": o["prediction"], "clip": None, "quantize": quantize}
    if kind not in SIGMA_SCHEDULERS:
        raise TypeError(f"scheduler must be one of {sorted(SIGMA_SCHEDULERS)} or a DPMSolverMultistepScheduler with "
                        f"use_karras_sigmas=True; got {kind}")
    pt = _cfg(scheduler, "prediction_type", "epsilon")
    allowed = sorted(p for p in PREDICTION_FROM_DIFFUSERS if not (p == "sample" and kind in _NO_SAMPLE_PREDICTION))
    if pt not in allowed:
        raise NotImplementedError(f"{kind} prediction_type={pt!r} is not supported (diffusers' {kind} implements "
                                  f"{allowed}); supported: {allowed}")
    if _cfg(scheduler, "rescale_betas_zero_snr", False):
        _refuse(kind, "rescale_betas_zero_snr", True, "zero-terminal-SNR betas: the training schedule reaches "
                "alphas_cumprod 0, an infinite noise level", False)
    fst = _cfg(scheduler, "final_sigmas_type", "zero")
    if fst != "zero":
        _refuse(kind, "final_sigmas_type", fst, "the last step stops at sigma_min without denoising; fastddpm's "
                "sigma samplers end at sigma 0", "zero")
    it = _cfg(scheduler, "interpolation_type", "linear")
    if it != "linear":
        _refuse(kind, "interpolation_type", it, "it makes k + 1 noise levels for k timesteps, so diffusers' loop "
                "stops one level above 0 without denoising", "linear")
    clip = None
    if kind == "HeunDiscreteScheduler" and _cfg(scheduler, "clip_sample", False):
        clip = float(_cfg(scheduler, "clip_sample_range", 1.0))
    out = {"method": SIGMA_SCHEDULERS[kind], "prediction": PREDICTION_FROM_DIFFUSERS[pt], "clip": clip}
    if kind == "EulerAncestralDiscreteScheduler":
        out["eta"] = 1.0
    if kind == "LMSDiscreteScheduler":
        out["order"] = 4
    return out


def _levels_and_evaluations(scheduler):
    """(the k + 1 noise levels, ending in 0; the sigma each of the scheduler's model evaluations is
    scaled by), float64, from a scheduler whose set_timesteps was called."""
    kind = type(scheduler).__name__
    sig = torch.as_tensor(scheduler.sigmas).detach().to("cpu", torch.float64)
    ts = torch.as_tensor(scheduler.timesteps).detach().cpu()
    if kind == "HeunDiscreteScheduler":  # [s0, s1, s1, ..., s_{k-1}, s_{k-1}, 0]: each inner level twice
        levels, evals = torch.cat([sig[:1], sig[1::2]]), sig[:-1]
    elif kind == "KDPM2DiscreteScheduler":  # [s0, s1, s1, ..., s_{k-1}, s_{k-1}, 0, 0, 0]
        levels = torch.cat([sig[:1], sig[1:-1:2]])
        # even evaluations at the levels, odd ones at the log-midpoints sigmas_interpol (same layout)
        interp = torch.as_tensor(scheduler.sigmas_interpol).detach().to("cpu", torch.float64)
        evals = sig[:max(2 * levels.numel() - 3, 0)].clone()
        evals[1::2] = interp[1::2][:evals[1::2].numel()]
    else:
        levels, evals = sig, sig[:-1]
    k = levels.numel() - 1
    want = 2 * k - 1 if kind in _TWO_EVALS else k
    body = levels[:-1]
    if k < 1 or float(levels[-1]) != 0 or ts.numel() != want or evals.numel() != want or (body <= 0).any() \
            or (body[1:] >= body[:-1]).any():
        raise NotImplementedError(
            f"{kind}'s noise levels after set_timesteps ({sig.tolist()[:6]}{'...' if sig.numel() > 6 else ''}, "
            f"{ts.numel()} timesteps) are not k strictly decreasing positive levels followed by 0 with one model "
            f"evaluation per timestep; fastddpm cannot follow this configuration")
    return levels, evals, ts


def sigma_schedule(cls, scheduler):
    """The model's training Schedule (cls = fastddpm.Schedule) with source_options: sigma_options,
    and (after set_timesteps) the record of the scheduler's noise levels and timesteps."""
    kind = type(scheduler).__name__
    options = sigma_options(scheduler)
    betas, T = getattr(scheduler, "betas", None), _cfg(scheduler, "num_train_timesteps")
    if betas is None or T is None:
        raise TypeError(f"scheduler must be a diffusers scheduler with betas and num_train_timesteps; got {kind}")
    s = cls.from_betas(torch.as_tensor(betas).double(), num_train_timesteps=int(T))
    if getattr(scheduler, "num_inference_steps", None) is not None:
        levels, evals, ts = _levels_and_evaluations(scheduler)
        if kind == "DPMSolverMultistepScheduler":  # x_t = z in DDPM space (init_noise_sigma 1) = z / c_in
            init = float((levels[0] ** 2 + 1).sqrt())
        else:
            init = float(scheduler.init_noise_sigma)
        timesteps = ts.long() if not ts.is_floating_point() else ts.to(torch.float64)
        options[RECORD] = {"sigmas": levels, "stage_sigmas": evals, "timesteps": timesteps, "init_sigma": init}
    s.source_options = options
    return s


def sigma_sample_kwargs(cls, scheduler) -> dict:
    """fastddpm.sample keyword arguments reproducing the diffusers loop of `scheduler` (after its
    set_timesteps): the training schedule, method and options, and its noise levels as sigmas=."""
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError(f"{type(scheduler).__name__}: call scheduler.set_timesteps(num_inference_steps) before "
                         "fastddpm.compat.sample_kwargs(scheduler): its noise levels depend on the number of steps")
    s = sigma_schedule(cls, scheduler)
    opts = {k: v for k, v in s.source_options.items() if k != RECORD}
    return {"schedule": s, "sigmas": s.source_options[RECORD]["sigmas"].clone(), **opts}

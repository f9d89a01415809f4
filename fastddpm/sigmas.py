"""Continuous noise levels (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"; Katherine Crowson's k-diffusion): the sigma families, and how a model
trained on a discrete DDPM schedule is evaluated at any sigma.

A DDPM state x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is, divided by sqrt(abar), the
variance-exploding state x = x0 + sigma eps with sigma = sqrt((1 - abar) / abar). The
k-diffusion samplers integrate in that space; the model is called as k-diffusion's
`DiscreteEpsDDPMDenoiser` / `DiscreteVDDPMDenoiser` call it:

    input     c_in x,  c_in = 1 / sqrt(sigma^2 + 1)        (= the DDPM state x_t)
    timestep  sigma_to_t(sigma): the training timestep interpolated linearly in log sigma
              between the two neighbouring training sigmas (a float; rounded to the nearest
              training timestep in log sigma with quantize=True)
    denoised  D = c_skip x + c_out model_output:
              eps: c_skip = 1,                c_out = -sigma
              v:   c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1)
              x0:  c_skip = 0,                c_out = 1

Sigma families (k-diffusion's `get_sigmas_*`, computed here in float64; a final 0 appended):
    karras          (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  rho = 7
    exponential     exp(linspace(log sigma_max, log sigma_min, n))
    polyexponential exp(linspace(1, 0, n)^rho (log sigma_max - log sigma_min) + log sigma_min),  rho = 1
    vp              sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), t = linspace(1, 1e-3, n)   (beta_d 19.9, beta_min 0.1)
    discrete        the training sigmas at t = linspace(T - 1, 0, n), interpolated in log sigma
                    (k-diffusion's DiscreteSchedule.get_sigmas)
sigma_min / sigma_max default to the training schedule's (its first and last sigma).
"""
from __future__ import annotations

import math

import torch

__all__ = ["SIGMA_KINDS", "training_sigmas", "get_sigmas", "sigma_to_t", "recorded_timesteps", "denoiser_scalings",
           "ancestral_step"]

SIGMA_KINDS = ("karras", "exponential", "polyexponential", "vp", "discrete")
DEFAULT_RHO = {"karras": 7.0, "polyexponential": 1.0}


def training_sigmas(s) -> torch.Tensor:
    """The training schedule's sigmas sqrt((1 - abar) / abar), float64 (T,), ascending in t."""
    abar = s.alphas_cumprod
    return ((1 - abar) / abar).sqrt()


def _positive_float(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite float; got {v!r}")
    return float(v)


def get_sigmas(kind, n: int, s, sigma_min=None, sigma_max=None, rho=None) -> torch.Tensor:
    """The n noise levels of family `kind` followed by 0: float64 (n + 1,), decreasing.

    s: the model's training Schedule (un-respaced; it gives the default sigma_min / sigma_max and
    the "discrete" family). rho applies to karras (default 7) and polyexponential (default 1);
    sigma_min / sigma_max to every family but "vp" and "discrete"."""
    if kind not in SIGMA_KINDS:
        raise ValueError(f"sigmas must be one of {SIGMA_KINDS} or a 1-D tensor of noise levels; got {kind!r}")
    if rho is not None and kind not in DEFAULT_RHO:
        raise ValueError(f"rho applies to sigmas='karras' / 'polyexponential' only; got rho={rho!r} with "
                         f"sigmas={kind!r}")
    if kind in ("vp", "discrete") and (sigma_min is not None or sigma_max is not None):
        raise ValueError(f"sigma_min / sigma_max do not apply to sigmas={kind!r} (its noise levels are fixed); "
                         f"got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
    train = training_sigmas(s)
    lo = float(train[0]) if sigma_min is None else _positive_float(sigma_min, "sigma_min")
    hi = float(train[-1]) if sigma_max is None else _positive_float(sigma_max, "sigma_max")
    if lo >= hi:
        raise ValueError(f"sigma_min must be below sigma_max; got sigma_min={lo!r}, sigma_max={hi!r}")
    r = DEFAULT_RHO.get(kind) if rho is None else _positive_float(rho, "rho")
    f64 = torch.float64
    if kind == "karras":
        ramp = torch.linspace(0, 1, n, dtype=f64)
        sig = (hi ** (1 / r) + ramp * (lo ** (1 / r) - hi ** (1 / r))) ** r
    elif kind == "exponential":
        sig = torch.linspace(math.log(hi), math.log(lo), n, dtype=f64).exp()
    elif kind == "polyexponential":
        ramp = torch.linspace(1, 0, n, dtype=f64) ** r
        sig = torch.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo))
    elif kind == "vp":
        t = torch.linspace(1, 1e-3, n, dtype=f64)
        sig = torch.sqrt(torch.exp(19.9 * t ** 2 / 2 + 0.1 * t) - 1)
    else:  # discrete: DiscreteSchedule.get_sigmas(n), t_to_sigma of linspace(T - 1, 0, n)
        log_train = train.log()
        t = torch.linspace(len(train) - 1, 0, n, dtype=f64)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        sig = ((1 - w) * log_train[low] + w * log_train[high]).exp()
    return torch.cat([sig, sig.new_zeros(1)])


def sigma_to_t(sigma: torch.Tensor, s, quantize: bool = False) -> torch.Tensor:
    """k-diffusion's DiscreteSchedule.sigma_to_t in float64: the training timestep of each sigma,
    interpolated linearly in log sigma (clamped to [0, T - 1]); quantize=True: the training
    timestep nearest in log sigma (a LongTensor)."""
    log_sigmas = training_sigmas(s).log()
    log_sigma = sigma.to(torch.float64).log()
    dists = log_sigma - log_sigmas[:, None]
    if quantize:
        return dists.abs().argmin(dim=0).view(sigma.shape)
    low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)


def recorded_timesteps(stage_sigma: torch.Tensor, sigmas: torch.Tensor, s):
    """(timesteps, initial sigma) recorded from a peer's scheduler in s.source_options["sigma_timesteps"]
    (fastddpm.diffusers_sigmas), when a plan over `sigmas` (its noise levels) evaluates the model at
    the recorded sigmas (stage_sigma, to 1e-5: KDPM2's midpoints are float32 there); else None,
    and sigma_to_t applies. diffusers' timesteps are not k-diffusion's sigma_to_t: np.interp
    (linear in sigma) for its default noise levels, rounded for DPM-Solver's Karras sigmas."""
    rec = (getattr(s, "source_options", None) or {}).get("sigma_timesteps")
    if rec is None:
        return None
    levels, at = rec["sigmas"], rec["stage_sigmas"]
    if levels.shape != sigmas.shape or not torch.equal(levels, sigmas.to(torch.float64)) or \
            at.shape != stage_sigma.shape or not torch.allclose(stage_sigma.to(torch.float64), at, rtol=1e-5, atol=0):
        return None
    return rec["timesteps"].clone(), float(rec["init_sigma"])


def denoiser_scalings(prediction: str, sigma: float) -> tuple[float, float, float]:
    """(c_skip, c_out, c_in) of the denoiser D = c_skip x + c_out model(c_in x, t) at noise level
    sigma, for a model predicting eps, v or x0 (float64 scalars)."""
    c_in = 1 / math.sqrt(sigma * sigma + 1)
    if prediction == "eps":
        return 1.0, -sigma, c_in
    if prediction == "v":
        return 1 / (sigma * sigma + 1), -sigma * c_in, c_in
    return 0.0, 1.0, c_in


def ancestral_step(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """k-diffusion's get_ancestral_step: (sigma_down, sigma_up), the noise level an ancestral step
    steps down to and the noise it adds back; sigma_up is capped at sigma_to."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    sigma_down = math.sqrt(sigma_to ** 2 - sigma_up ** 2)
    return sigma_down, sigma_up

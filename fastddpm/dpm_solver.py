"""DPM-Solver++ (2M) and SDE-DPM-Solver++: few-step multistep samplers on the data prediction.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models" (arXiv 2211.01095), with diffusers' `DPMSolverMultistepScheduler` semantics. With
alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) (half the log-SNR),
a step goes from noise level s (this step's timestep) to t (the next kept timestep; sigma 0
after the last step), h = lambda_t - lambda_s, and x0 = the data prediction of this step:

  first order (eq. 8 with k = 1; DDIM):   x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^-h) x0
  2M, multistep second order (Alg. 2):    D1 = (x0 - x0_prev) / r0,  r0 = h_prev / h
      midpoint: x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^-h) (x0 + D1 / 2)
      heun:     ... + alpha_t (1 - e^-h) x0 + alpha_t ((e^-h - 1)/h + 1) D1
  SDE-DPM-Solver++ (Lu et al. 2022 eq. 12 discretised, Gonzalez-style; diffusers' sde-dpmsolver++):
      first:    x_t = (sigma_t/sigma_s) e^-h x_s + alpha_t (1 - e^-2h) x0 + sigma_t sqrt(1 - e^-2h) z
      midpoint: adds alpha_t (1 - e^-2h) D1 / 2;   heun: adds alpha_t ((1 - e^-2h)/(-2h) + 1) D1

Every step is therefore x_t = a x_s + b x0 + d (x0 - x0_prev) + std z with per-step scalars
(a, b, d, std), computed here in float64 from abar and only then stored as float32 device
rows. The first step and the last (which goes to sigma 0: e^-h = 0, x_t = x0) are first
order (d = 0), as diffusers does with final_sigmas_type="zero" (lower_order_final and
euler_at_final change nothing then). e^-h is computed as the ratio of the VE sigmas
sqrt((1-abar)/abar), so sigma_t = 0 needs no infinities.

Step indices follow fastddpm's convention: step i of a Schedule runs at timestep
timesteps[i] and goes to abar_prev[i] (abar[i-1], or 1 for i = 0); the previous model
evaluation (x0_prev) was at step i + 1. Respacing for these methods follows diffusers'
DPMSolverMultistepScheduler.set_timesteps (`dpm_indices`), which differs from DDPM/DDIM's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import _checks as C


__all__ = ["DPM_METHODS", "SOLVER_TYPES", "DPM_SPACINGS", "dpm_indices", "DpmCoefficients", "dpm_coefficients",
           "check_dpm_options", "check_dpm_step_args"]

DPM_METHODS = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
DPM_SPACINGS = ("linspace", "leading", "trailing")
# rows of the float32 device table DpmCoefficients.rows(device) (the kernel reads the same)
DPM_ROW = dict(x_coef=0, x0_coef=1, d_coef=2, noise_std=3)


def dpm_indices(num_train: int, k: int, spacing: str = "linspace", steps_offset: int = 0) -> np.ndarray:
    """Ascending step indices into 0..num_train-1 that DPMSolverMultistepScheduler.set_timesteps(k)
    keeps (lambda_min_clipped = -inf; the step after the smallest goes to sigma 0):

      "linspace" (its default): round(linspace(0, T - 1, k + 1)) without the 0
      "leading":  arange(1, k + 1) * (T // (k + 1)) + steps_offset
      "trailing": round(arange(T, 0, -T / k)) - 1
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"steps must be a positive int; got {k!r}")
    if spacing == "linspace":
        idx = np.linspace(0, num_train - 1, k + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        idx = (np.arange(0, k + 1) * (num_train // (k + 1))).round()[::-1][:-1].astype(np.int64) + int(steps_offset)
    elif spacing == "trailing":
        idx = np.arange(num_train, 0, -num_train / k).round().astype(np.int64) - 1
    else:
        raise ValueError(f"spacing must be one of {DPM_SPACINGS}; got {spacing!r}")
    idx = np.sort(idx)
    if idx.min() < 0 or idx.max() >= num_train or len(np.unique(idx)) != len(idx) or len(idx) != k:
        raise ValueError(f"{k} DPM-Solver steps of {num_train} with spacing={spacing!r} and steps_offset="
                         f"{steps_offset} repeat or leave the schedule: {idx.tolist()[:8]}...; use fewer steps")
    return idx


@dataclass(frozen=True)
class DpmCoefficients:
    """Per-step coefficients of one DPM-Solver++ configuration over a Schedule's S steps.

    float64 (S,) host tensors; step i goes from noise level s = step i to t = step i - 1 (sigma 0 at i = 0):
        alpha_t, sigma_t   target alpha / sigma
        lambda_s           log(alpha_s / sigma_s) of step i
        h                  lambda_t - lambda_s (inf at i = 0)
        exp_neg_h          e^-h (0 at i = 0)
        r0                 h_prev / h of a second-order step (h_prev = lambda_s - lambda of step i + 1), else nan
        x_coef, x0_coef, d_coef, noise_std   x_t = x_coef x_s + x0_coef x0 + d_coef (x0 - x0_prev) + noise_std z
    """

    alpha_t: torch.Tensor
    sigma_t: torch.Tensor
    lambda_s: torch.Tensor
    h: torch.Tensor
    exp_neg_h: torch.Tensor
    r0: torch.Tensor
    x_coef: torch.Tensor
    x0_coef: torch.Tensor
    d_coef: torch.Tensor
    noise_std: torch.Tensor

    def rows(self, device) -> torch.Tensor:
        """(4, S) float32 device table in DPM_ROW order, rounded from float64 once."""
        tab = torch.stack([self.x_coef, self.x0_coef, self.d_coef, self.noise_std])
        return tab.to(torch.float32).to(device).contiguous()


def check_dpm_options(method, order, solver_type):
    C.one_of(method, DPM_METHODS, "method")
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(f"order must be 1 or 2 for method={method!r}; got {order!r}")
    C.one_of(solver_type, SOLVER_TYPES, "solver_type")


def check_dpm_step_args(s, x_t, t, model_output, prev_x0, noise, method, order, solver_type, prediction, clip, seed,
                        sample_offset):
    """Validate one DPM-Solver++ step's arguments (shared by the reference and the fused op);
    returns (t, clip) normalised as fastddpm._checks does."""
    C.check_schedule(s)
    C.check_float_tensor(x_t, "x_t")
    check_dpm_options(method, order, solver_type)
    C.one_of(prediction, C.PREDICTIONS, "prediction")
    clip = C.check_clip(clip)
    t = C.check_t(s, t, x_t)
    C.check_model_output(model_output, x_t, "fixed_small")
    at_zero = isinstance(t, int) and t == 0
    C.check_noise_source(noise, seed, x_t, needs_noise=method == "sde-dpmsolver++" and not at_zero)
    C.check_sample_offset(sample_offset)
    if sample_offset + x_t.shape[0] > 2**32:
        raise ValueError(f"sample_offset + batch must not exceed 2**32; got {sample_offset} + {x_t.shape[0]}")
    if prev_x0 is not None:
        C.check_like(prev_x0, x_t, "prev_x0")
    elif order == 2 and (not isinstance(t, int) or float(s.dpm_coefficients(method, order, solver_type).d_coef[t])):
        raise ValueError(f"prev_x0 is required: step t={t if isinstance(t, int) else 'tensor'} of order=2 is a "
                         "second-order step (pass the x0 the previous step returned)")
    return t, clip


def dpm_coefficients(s, method: str = "dpmsolver++", order: int = 2, solver_type: str = "midpoint"):
    """The float64 DpmCoefficients of schedule s (use s.dpm_rows(device, ...) for the cached device rows)."""
    check_dpm_options(method, order, solver_type)
    abar = s.alphas_cumprod                       # (S,) step i's noise level s
    abar_t = s.alphas_cumprod_prev                # (S,) its target; 1 at i = 0 (sigma 0)
    alpha_s, sigma_s = abar.sqrt(), (1 - abar).sqrt()
    alpha_t, sigma_t = abar_t.sqrt(), (1 - abar_t).sqrt()
    lambda_s = alpha_s.log() - sigma_s.log()
    lambda_t = alpha_t.log() - sigma_t.log()      # +inf at i = 0
    h = lambda_t - lambda_s
    ve_s, ve_t = sigma_s / alpha_s, sigma_t / alpha_t
    e1 = ve_t / ve_s                              # e^-h without infinities
    sde = method == "sde-dpmsolver++"
    if sde:
        e2 = e1 * e1                              # e^-2h
        x_coef = sigma_t / sigma_s * e1
        x0_coef = alpha_t * (1 - e2)
        noise_std = sigma_t * (1 - e2).sqrt()
    else:
        x_coef = sigma_t / sigma_s
        x0_coef = alpha_t * (1 - e1)
        noise_std = torch.zeros_like(abar)
    S = abar.numel()
    r0 = torch.full_like(abar, math.nan)
    d_coef = torch.zeros_like(abar)
    if order == 2 and S > 2:
        second = torch.zeros(S, dtype=torch.bool)
        second[1:S - 1] = True                    # not the first step (no x0_prev), not the last (sigma 0)
        lam_prev = torch.cat([lambda_s[1:], lambda_s.new_zeros(1)])  # lambda of step i + 1
        r0 = torch.where(second, (lambda_s - lam_prev) / h, r0)
        if solver_type == "midpoint":
            c1 = 0.5 * x0_coef
        elif sde:
            c1 = alpha_t * ((1 - e1 * e1) / (-2 * h) + 1)
        else:
            c1 = alpha_t * ((e1 - 1) / h + 1)
        d_coef = torch.where(second, c1 / r0, d_coef)
    return DpmCoefficients(alpha_t, sigma_t, lambda_s, h, e1, r0, x_coef, x0_coef, d_coef, noise_std)


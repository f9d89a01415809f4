"""Fused reverse step: predicted x0, clipping, posterior mean, variance and noise in ONE pass.

Per element (math in float32; coefficients are per-sample scalars read from the schedule's
float32 device table, which was computed in float64; see fastddpm/diffusion.py for the
formulas and their sources):

    x0   = sqrt(1/abar) x - sqrt(1/abar - 1) eps   |  mo  |  sqrt(abar) x - sqrt(1 - abar) v
    x0   = clamp(x0, -clip, clip)
    DDPM: out = coef_x0 x0 + coef_xt x + [t > 0] sigma z,   sigma from fixed_small / fixed_large /
          learned_range (exp(0.5 (f log beta + (1 - f) log var_small)), f = (v + 1) / 2)
    DDIM: out = sqrt(abar_prev) x0 + dir eps + [t > 0] sigma_eta z,   eps = eps_raw, or with
          USE_CLIPPED eps = (sqrt(1/abar) x - x0) / sqrt(1/abar - 1) from the clipped x0

Reads x, the model output (and v for learned_range), optionally noise; writes out and
optionally x0. Grid: (B, blocks per sample), so t[b] and every coefficient is one scalar load.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastddpm.schedule import ROW

from .guidance import dup_args, guided_output, launch_args, store_state
from .common import (NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR, Walk, as_i32, device_guard, flag_non_finite, offsets,
                     pick_layout, pixel_stride, program_coords, sample_layout, split_seed, step_noise, to_layout)

PRED = {"eps": 0, "x0": 1, "v": 2}
VAR = {"fixed_small": 0, "fixed_large": 1, "learned_range": 2}


@triton.jit
def _row(tab_ptr, row: tl.constexpr, S, t):
    return tl.load(tab_ptr + row * S + t)


@triton.jit(do_not_specialize=["t_scalar", "S", "seed_lo", "seed_hi", "sample_offset"])
def step_kernel(
    x_ptr, mo_ptr, v_ptr, z_ptr, out_ptr, x0_ptr,          # tensors (B, ...) in one layout
    sxb, sxp, smb, smp, svb, svp, szb, szp, sob, sop, s0b, s0p,  # batch and pixel strides
    mu_ptr, sub, sup, g_ptr, w_val, dup_ptr, sdb, sdp,  # guidance: out_u, (g_c, g_u) / w; 2nd state out
    tab_ptr, sig_ptr, dir_ptr, t_ptr, t_scalar, S,          # schedule table (ROWS, S); DDIM rows; t
    N, C, HW, clip, seed_lo, seed_hi, sample_offset,
    rng_ptr, flag_ptr,                                      # (seed_lo, seed_hi, offset) int64; first-bad flag
    ROW_SQRT_RECIP: tl.constexpr, ROW_SQRT_RECIPM1: tl.constexpr, ROW_SQRT_ABAR: tl.constexpr,
    ROW_SQRT_1M_ABAR: tl.constexpr, ROW_COEF_X0: tl.constexpr, ROW_COEF_XT: tl.constexpr,
    ROW_STD_SMALL: tl.constexpr, ROW_STD_LARGE: tl.constexpr, ROW_LOGVAR_SMALL: tl.constexpr,
    ROW_LOG_BETA: tl.constexpr, ROW_SQRT_ABAR_PREV: tl.constexpr,
    DDIM: tl.constexpr, PRED: tl.constexpr, VAR: tl.constexpr, CLIP: tl.constexpr, NOISE: tl.constexpr,
    PER_SAMPLE_T: tl.constexpr, WRITE_X0: tl.constexpr, LAYOUT_CL: tl.constexpr, BLOCK: tl.constexpr,
    RNG_PTR: tl.constexpr, CHECK: tl.constexpr, USE_CLIPPED: tl.constexpr, CP: tl.constexpr,
    QUAD: tl.constexpr, GUIDE: tl.constexpr,
    DUP: tl.constexpr,
):
    b, pid, t, i, c, mask = program_coords(t_ptr, t_scalar, N, C, HW, PER_SAMPLE_T, BLOCK, LAYOUT_CL, CP)

    x = tl.load(x_ptr + offsets(b, i, c, sxb, sxp, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
    mo = guided_output(mo_ptr, mu_ptr, smb, smp, sub, sup, b, i, c, mask, g_ptr, w_val, LAYOUT_CL, GUIDE)

    # predicted x0 (and the raw eps DDIM needs)
    if PRED == 0:
        x0 = _row(tab_ptr, ROW_SQRT_RECIP, S, t) * x - _row(tab_ptr, ROW_SQRT_RECIPM1, S, t) * mo
        eps = mo
    elif PRED == 1:
        x0 = mo
        eps = (x - _row(tab_ptr, ROW_SQRT_ABAR, S, t) * mo) / _row(tab_ptr, ROW_SQRT_1M_ABAR, S, t)
    else:
        sa = _row(tab_ptr, ROW_SQRT_ABAR, S, t)
        s1 = _row(tab_ptr, ROW_SQRT_1M_ABAR, S, t)
        x0 = sa * x - s1 * mo
        eps = sa * mo + s1 * x
    if CLIP:
        # NaN stays NaN, as in torch.clamp (the default min/max would return the bound)
        x0 = tl.clamp(x0, -clip, clip, propagate_nan=tl.PropagateNan.ALL)

    # mean and standard deviation of the step
    if DDIM:
        if USE_CLIPPED:  # eps re-derived from the clipped x0 (improved-diffusion, use_clipped_model_output)
            eps = (_row(tab_ptr, ROW_SQRT_RECIP, S, t) * x - x0) / _row(tab_ptr, ROW_SQRT_RECIPM1, S, t)
        out = _row(tab_ptr, ROW_SQRT_ABAR_PREV, S, t) * x0 + tl.load(dir_ptr + t) * eps
        std = tl.load(sig_ptr + t)
    else:
        out = _row(tab_ptr, ROW_COEF_X0, S, t) * x0 + _row(tab_ptr, ROW_COEF_XT, S, t) * x
        if VAR == 0:
            std = _row(tab_ptr, ROW_STD_SMALL, S, t)
        elif VAR == 1:
            std = _row(tab_ptr, ROW_STD_LARGE, S, t)
        else:
            v = tl.load(v_ptr + offsets(b, i, c, svb, svp, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
            frac = (v + 1.0) * 0.5
            log_var = frac * _row(tab_ptr, ROW_LOG_BETA, S, t) + (1.0 - frac) * _row(tab_ptr, ROW_LOGVAR_SMALL, S, t)
            std = tl.exp(0.5 * log_var)
            if CHECK:  # the variance channels are model output too
                flag_non_finite(flag_ptr, v, mask, t)

    # noise, never at step 0
    if NOISE != 0:
        if t > 0:
            z = step_noise(z_ptr, szb, szp, b, i, c, mask, pid, t, rng_ptr, seed_lo, seed_hi, sample_offset, HW,
                           NOISE, RNG_PTR, LAYOUT_CL, BLOCK, CP, QUAD)
            out = out + std * z

    store_state(out_ptr, dup_ptr, sob, sop, sdb, sdp, b, i, c, out, mask, LAYOUT_CL, DUP)
    if CHECK:  # the new state, and the model output: clipping x0 can turn an inf output into a finite state
        flag_non_finite(flag_ptr, out, mask, t)
        flag_non_finite(flag_ptr, mo, mask, t)
    if WRITE_X0:
        tl.store(x0_ptr + offsets(b, i, c, s0b, s0p, LAYOUT_CL), x0, mask=mask)


def step_forward(s, x_t, t, model_output, noise, *, ddim: bool, eta: float, prediction: str, variance: str,
                 clip, seed, sample_offset: int, return_x0: bool, out=None, rng=None, flag=None,
                 use_clipped_model_output: bool = False, x0_out=None, guidance=None, uncond_output=None,
                 coef_out=None, dup_out=None):
    """Launch the fused step. Inputs are validated by fastddpm.ops; t is an int or a contiguous
    LongTensor (B,) on x_t's device (fastddpm._checks.check_t).

    For captured loops: rng, an int64 device tensor (seed_lo, seed_hi, sample_offset), replaces
    seed and sample_offset (so one captured launch serves any seed and batch); flag, an int64
    device scalar, is raised to t (atomic max) when the new state or the model output holds a
    non-finite value;
    x0_out, a float32 buffer in x_t's layout, receives x0 when return_x0 (a static buffer).
    guidance (a fastddpm.guidance.CFG): model_output is the conditional output, uncond_output the
    unconditional one (kernels/guidance.py); coef_out a (B, 2) float32 buffer for the per-sample
    coefficients (captured loops)."""
    C = x_t.shape[1]
    x_t, layout = pick_layout(x_t)
    walk = Walk(x_t, layout)
    dev = x_t.device
    mo, v = model_output, model_output
    if variance == "learned_range" and not ddim:
        mo, v = model_output[:, :C], model_output[:, C:]
    mo, v = to_layout(mo, layout), to_layout(v, layout)
    mu, sub, sup, g, w_val, guide = launch_args(guidance, mo, uncond_output, x_t, layout, walk, coef_out)
    z = to_layout(noise, layout) if noise is not None else x_t
    user_out = out
    if out is None or sample_layout(out) != layout:  # the kernel writes in the layout it walks
        out = torch.empty_like(x_t, dtype=torch.float32)
    dup, sdb, sdp, dup_on = dup_args(dup_out, out, layout)
    if not return_x0:
        x0 = out
    elif x0_out is not None and sample_layout(x0_out) == layout:
        x0 = x0_out
    else:
        x0 = torch.empty_like(out)
    tab = s.table(dev)
    if ddim:
        rows = s.ddim_rows(dev, eta)
        sig, dir_ = rows.sigma, rows.dir_coef
        noise_mode = NOISE_NONE if eta == 0 else (NOISE_TENSOR if noise is not None else NOISE_PHILOX)
    else:
        sig = dir_ = tab
        noise_mode = NOISE_TENSOR if noise is not None else NOISE_PHILOX
    if noise_mode == NOISE_PHILOX and seed is None and rng is None:  # only reachable for step 0 without noise
        noise_mode = NOISE_NONE
    per_sample = isinstance(t, torch.Tensor)
    seed_lo, seed_hi = split_seed(seed or 0)
    with device_guard(x_t):
        step_kernel[walk.grid](
            x_t, mo, v, z, out, x0,
            x_t.stride(0), pixel_stride(x_t), mo.stride(0), pixel_stride(mo), v.stride(0), pixel_stride(v),
            z.stride(0), pixel_stride(z), out.stride(0), pixel_stride(out), x0.stride(0), pixel_stride(x0),
            mu, sub, sup, g, w_val, dup, sdb, sdp,
            tab, sig, dir_, t if per_sample else tab, 0 if per_sample else int(t), s.num_steps,
            walk.N, C, walk.HW, float(clip) if clip is not None else 0.0, seed_lo, seed_hi, as_i32(sample_offset),
            rng if rng is not None else tab, flag if flag is not None else tab,
            ROW["sqrt_recip_abar"], ROW["sqrt_recipm1_abar"], ROW["sqrt_abar"], ROW["sqrt_one_minus_abar"],
            ROW["coef_x0"], ROW["coef_xt"], ROW["std_small"], ROW["std_large"], ROW["log_var_small"],
            ROW["log_beta"], ROW["sqrt_abar_prev"],
            DDIM=ddim, PRED=PRED[prediction], VAR=VAR[variance], CLIP=clip is not None, NOISE=noise_mode,
            PER_SAMPLE_T=per_sample, WRITE_X0=return_x0, RNG_PTR=rng is not None, CHECK=flag is not None,
            USE_CLIPPED=ddim and use_clipped_model_output, GUIDE=guide, DUP=dup_on,
            **walk.meta, num_warps=walk.num_warps,
        )
    if user_out is not None and user_out is not out:
        out = user_out.copy_(out)
    if dup_out is not None and not dup_on:
        dup_out.copy_(out)
    if return_x0 and x0_out is not None and x0_out is not x0:
        x0 = x0_out.copy_(x0)
    return (out, x0) if return_x0 else out

"""Fused DPM-Solver++ step (Lu et al. 2022; fastddpm/dpm_solver.py has the formulas): ONE pass
that reads x, the model output and the previous step's x0, and writes the new x and this x0.

Per element (float32 math; per-step scalars a, b, d, std from Schedule.dpm_rows, computed in
float64; the x0 coefficients from Schedule.table):

    x0  = sqrt(1/abar) x - sqrt(1/abar - 1) eps   |  mo  |  sqrt(abar) x - sqrt(1 - abar) v
    x0  = clamp(x0, -clip, clip)                                 (only if clip is set)
    out = a x + b x0 + d (x0 - x0_prev) + std z                   (d = 0: first-order step, x0_prev unread;
                                                                   std = 0: ODE, or the step to sigma 0)

out may be x itself and the x0 buffer may be x0_prev itself: every element is read before it is
written, by the same program. Grid: (B, blocks per sample), so t[b] and every coefficient is one
scalar load.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastddpm.dpm_solver import DPM_ROW
from fastddpm.schedule import ROW

from .guidance import dup_args, guided_output, launch_args, store_state
from .common import (NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR, Walk, as_i32, device_guard, flag_non_finite, offsets,
                     pick_layout, pixel_stride, program_coords, sample_layout, split_seed, step_noise, to_layout)

PRED = {"eps": 0, "x0": 1, "v": 2}


@triton.jit(do_not_specialize=["t_scalar", "S", "seed_lo", "seed_hi", "sample_offset"])
def dpm_step_kernel(
    x_ptr, mo_ptr, prev_ptr, z_ptr, out_ptr, x0_ptr,           # tensors (B, ...) in one layout
    sxb, sxp, smb, smp, spb, spp, szb, szp, sob, sop, s0b, s0p,  # batch and pixel strides
    mu_ptr, sub, sup, g_ptr, w_val, dup_ptr, sdb, sdp,  # guidance: out_u, (g_c, g_u) / w; 2nd state out
    tab_ptr, dpm_ptr, t_ptr, t_scalar, S,                      # schedule table (ROWS, S); dpm rows (4, S); t
    N, C, HW, clip, seed_lo, seed_hi, sample_offset,
    rng_ptr, flag_ptr,                                         # (seed_lo, seed_hi, offset) int64; first-bad flag
    ROW_SQRT_RECIP: tl.constexpr, ROW_SQRT_RECIPM1: tl.constexpr, ROW_SQRT_ABAR: tl.constexpr,
    ROW_SQRT_1M_ABAR: tl.constexpr, ROW_A: tl.constexpr, ROW_B: tl.constexpr, ROW_D: tl.constexpr,
    ROW_STD: tl.constexpr,
    PRED: tl.constexpr, CLIP: tl.constexpr, SECOND: tl.constexpr, NOISE: tl.constexpr,
    PER_SAMPLE_T: tl.constexpr, LAYOUT_CL: tl.constexpr, BLOCK: tl.constexpr,
    RNG_PTR: tl.constexpr, CHECK: tl.constexpr, CP: tl.constexpr, QUAD: tl.constexpr, GUIDE: tl.constexpr,
    DUP: tl.constexpr,
):
    b, pid, t, i, c, mask = program_coords(t_ptr, t_scalar, N, C, HW, PER_SAMPLE_T, BLOCK, LAYOUT_CL, CP)

    x = tl.load(x_ptr + offsets(b, i, c, sxb, sxp, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
    mo = guided_output(mo_ptr, mu_ptr, smb, smp, sub, sup, b, i, c, mask, g_ptr, w_val, LAYOUT_CL, GUIDE)

    # data prediction x0 of this step
    if PRED == 0:
        x0 = tl.load(tab_ptr + ROW_SQRT_RECIP * S + t) * x - tl.load(tab_ptr + ROW_SQRT_RECIPM1 * S + t) * mo
    elif PRED == 1:
        x0 = mo
    else:
        x0 = tl.load(tab_ptr + ROW_SQRT_ABAR * S + t) * x - tl.load(tab_ptr + ROW_SQRT_1M_ABAR * S + t) * mo
    if CLIP:
        x0 = tl.clamp(x0, -clip, clip, propagate_nan=tl.PropagateNan.ALL)

    # first-order update: a x + b x0
    out = tl.load(dpm_ptr + ROW_A * S + t) * x + tl.load(dpm_ptr + ROW_B * S + t) * x0
    # second-order multistep correction d (x0 - x0_prev), D1 = (x0 - x0_prev) / r0 folded into d
    if SECOND:
        d = tl.load(dpm_ptr + ROW_D * S + t)
        if d != 0.0:
            prev = tl.load(prev_ptr + offsets(b, i, c, spb, spp, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
            out = out + d * (x0 - prev)
    # SDE noise sigma_t sqrt(1 - e^-2h) z (zero at the step to sigma 0)
    if NOISE != 0:
        std = tl.load(dpm_ptr + ROW_STD * S + t)
        if std != 0.0:
            z = step_noise(z_ptr, szb, szp, b, i, c, mask, pid, t, rng_ptr, seed_lo, seed_hi, sample_offset, HW,
                           NOISE, RNG_PTR, LAYOUT_CL, BLOCK, CP, QUAD)
            out = out + std * z

    store_state(out_ptr, dup_ptr, sob, sop, sdb, sdp, b, i, c, out, mask, LAYOUT_CL, DUP)
    if CHECK:  # the new state, and the model output: clipping x0 can turn an inf output into a finite state
        flag_non_finite(flag_ptr, out, mask, t)
        flag_non_finite(flag_ptr, mo, mask, t)
    tl.store(x0_ptr + offsets(b, i, c, s0b, s0p, LAYOUT_CL), x0, mask=mask)


def dpm_step_forward(s, x_t, t, model_output, prev_x0, noise, *, method: str, order: int, solver_type: str,
                     prediction: str, clip, seed, sample_offset: int, out=None, x0_out=None, rng=None, flag=None,
                     guidance=None, uncond_output=None, coef_out=None, dup_out=None):
    """Launch the fused DPM-Solver++ step; returns (new x, x0). Inputs are validated by fastddpm.ops.

    out / x0_out: float32 buffers to write (may be x_t / prev_x0 themselves). For captured loops,
    rng (int64 device (seed_lo, seed_hi, sample_offset)) replaces seed and sample_offset, and
    flag (int64 device scalar) is raised to t when the new state or the model output holds a non-finite value.
    guidance, uncond_output, coef_out: as in kernels/step.py's step_forward."""
    C = x_t.shape[1]
    x_t, layout = pick_layout(x_t)
    walk = Walk(x_t, layout)
    dev = x_t.device
    mo = to_layout(model_output, layout)
    mu, sub, sup, g, w_val, guide = launch_args(guidance, mo, uncond_output, x_t, layout, walk, coef_out)
    second = order == 2 and prev_x0 is not None
    prev = to_layout(prev_x0, layout) if second else x_t
    z = to_layout(noise, layout) if noise is not None else x_t
    user_out, user_x0 = out, x0_out
    if out is None or sample_layout(out) != layout:  # the kernel writes in the layout it walks
        out = torch.empty_like(x_t, dtype=torch.float32)
    dup, sdb, sdp, dup_on = dup_args(dup_out, out, layout)
    if x0_out is None or sample_layout(x0_out) != layout:
        x0_out = torch.empty_like(x_t, dtype=torch.float32)
    tab = s.table(dev)
    rows = s.dpm_rows(dev, method, order, solver_type)
    if method != "sde-dpmsolver++":
        noise_mode = NOISE_NONE
    elif noise is not None:
        noise_mode = NOISE_TENSOR
    else:  # seed=None and no rng only at step 0, whose noise coefficient is 0
        noise_mode = NOISE_PHILOX if (seed is not None or rng is not None) else NOISE_NONE
    per_sample = isinstance(t, torch.Tensor)
    seed_lo, seed_hi = split_seed(seed or 0)
    with device_guard(x_t):
        dpm_step_kernel[walk.grid](
            x_t, mo, prev, z, out, x0_out,
            x_t.stride(0), pixel_stride(x_t), mo.stride(0), pixel_stride(mo), prev.stride(0), pixel_stride(prev),
            z.stride(0), pixel_stride(z), out.stride(0), pixel_stride(out), x0_out.stride(0), pixel_stride(x0_out),
            mu, sub, sup, g, w_val, dup, sdb, sdp,
            tab, rows, t if per_sample else tab, 0 if per_sample else int(t), s.num_steps,
            walk.N, C, walk.HW, float(clip) if clip is not None else 0.0, seed_lo, seed_hi, as_i32(sample_offset),
            rng if rng is not None else tab, flag if flag is not None else tab,
            ROW["sqrt_recip_abar"], ROW["sqrt_recipm1_abar"], ROW["sqrt_abar"], ROW["sqrt_one_minus_abar"],
            DPM_ROW["x_coef"], DPM_ROW["x0_coef"], DPM_ROW["d_coef"], DPM_ROW["noise_std"],
            PRED=PRED[prediction], CLIP=clip is not None, SECOND=second, NOISE=noise_mode,
            PER_SAMPLE_T=per_sample, RNG_PTR=rng is not None, CHECK=flag is not None, GUIDE=guide,
            DUP=dup_on,
            **walk.meta, num_warps=walk.num_warps,
        )
    if user_out is not None and user_out is not out:
        out = user_out.copy_(out)
    if dup_out is not None and not dup_on:
        dup_out.copy_(out)
    if user_x0 is not None and user_x0 is not x0_out:
        x0_out = user_x0.copy_(x0_out)
    return out, x0_out

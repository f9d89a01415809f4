"""Fused stage update of the k-diffusion samplers (fastddpm/karras.py has the formulas): ONE pass
per model evaluation that reads the state x, the model output and the history it needs, and
writes the next state (the next model input) and the new history.

Per element (float32 math; per-stage scalars from SigmaPlan.table, computed in float64):

    D   = cs x + co mo                               (clamped to [-clip, clip] when CLIP)
    out = a x + b D + c0 h0 + c1 h1 + c2 h2 + s z    (h_j read only where c_j != 0 or it shifts)
    where p or q != 0:  h2 <- h1, h1 <- h0, h0 <- p x + q D

out may be x itself and the history is updated in place: every element is read before it is
written, by the same program. Grid: (B, blocks per sample), so k[b] and every coefficient is
one scalar load.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastddpm.karras import ROW

from .guidance import dup_args, guided_output, launch_args, store_state
from .common import (NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR, Walk, as_i32, device_guard, flag_non_finite, offsets,
                     pick_layout, pixel_stride, program_coords, sample_layout, split_seed, step_noise, to_layout)


@triton.jit
def _c(tab_ptr, row: tl.constexpr, K, k):
    return tl.load(tab_ptr + row * K + k)


@triton.jit(do_not_specialize=["k_scalar", "K", "seed_lo", "seed_hi", "sample_offset"])
def sigma_step_kernel(
    x_ptr, mo_ptr, h0_ptr, h1_ptr, h2_ptr, z_ptr, out_ptr,      # tensors (B, ...) in one layout
    sxb, sxp, smb, smp, s0b, s0p, s1b, s1p, s2b, s2p, szb, szp, sob, sop,  # batch and pixel strides
    mu_ptr, sub, sup, g_ptr, w_val, dup_ptr, sdb, sdp,  # guidance: out_u, (g_c, g_u) / w; 2nd state out
    tab_ptr, tag_ptr, k_ptr, k_scalar, K,                      # stage table (ROWS, K); tags (K,); k
    N, C, HW, clip, seed_lo, seed_hi, sample_offset,
    rng_ptr, flag_ptr,                                         # (seed_lo, seed_hi, offset) int64; first-bad flag
    R_CS: tl.constexpr, R_CO: tl.constexpr, R_A: tl.constexpr, R_B: tl.constexpr, R_C0: tl.constexpr,
    R_C1: tl.constexpr, R_C2: tl.constexpr, R_S: tl.constexpr, R_P: tl.constexpr, R_Q: tl.constexpr,
    NHIST: tl.constexpr, CLIP: tl.constexpr, NOISE: tl.constexpr, PER_SAMPLE_K: tl.constexpr,
    LAYOUT_CL: tl.constexpr, BLOCK: tl.constexpr, RNG_PTR: tl.constexpr, CHECK: tl.constexpr,
    CP: tl.constexpr, QUAD: tl.constexpr, GUIDE: tl.constexpr,
    DUP: tl.constexpr,
):
    b, pid, k, i, c, mask = program_coords(k_ptr, k_scalar, N, C, HW, PER_SAMPLE_K, BLOCK, LAYOUT_CL, CP)

    x = tl.load(x_ptr + offsets(b, i, c, sxb, sxp, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
    mo = guided_output(mo_ptr, mu_ptr, smb, smp, sub, sup, b, i, c, mask, g_ptr, w_val, LAYOUT_CL, GUIDE)

    # denoised estimate D = c_skip x + c_out mo (in state space)
    d = _c(tab_ptr, R_CS, K, k) * x + _c(tab_ptr, R_CO, K, k) * mo
    if CLIP:
        d = tl.clamp(d, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
    out = _c(tab_ptr, R_A, K, k) * x + _c(tab_ptr, R_B, K, k) * d

    # history: read where its coefficient is nonzero or where a push shifts it
    p = _c(tab_ptr, R_P, K, k)
    q = _c(tab_ptr, R_Q, K, k)
    push = (p != 0.0) | (q != 0.0)
    h0 = tl.zeros_like(x)
    h1 = tl.zeros_like(x)
    if NHIST >= 1:
        c0 = _c(tab_ptr, R_C0, K, k)
        if NHIST >= 2:
            need0 = (c0 != 0.0) | push
        else:
            need0 = c0 != 0.0
        if need0:
            h0 = tl.load(h0_ptr + offsets(b, i, c, s0b, s0p, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
            out = out + c0 * h0
    if NHIST >= 2:
        c1 = _c(tab_ptr, R_C1, K, k)
        if NHIST >= 3:
            need1 = (c1 != 0.0) | push
        else:
            need1 = c1 != 0.0
        if need1:
            h1 = tl.load(h1_ptr + offsets(b, i, c, s1b, s1p, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
            out = out + c1 * h1
    if NHIST >= 3:
        c2 = _c(tab_ptr, R_C2, K, k)
        if c2 != 0.0:
            h2 = tl.load(h2_ptr + offsets(b, i, c, s2b, s2p, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
            out = out + c2 * h2

    # noise s z (the churn noise of the next step, or the ancestral / SDE noise)
    if NOISE != 0:
        s = _c(tab_ptr, R_S, K, k)
        if s != 0.0:
            tag = tl.load(tag_ptr + k)
            z = step_noise(z_ptr, szb, szp, b, i, c, mask, pid, tag, rng_ptr, seed_lo, seed_hi, sample_offset, HW,
                           NOISE, RNG_PTR, LAYOUT_CL, BLOCK, CP, QUAD)
            out = out + s * z

    store_state(out_ptr, dup_ptr, sob, sop, sdb, sdp, b, i, c, out, mask, LAYOUT_CL, DUP)
    if CHECK:  # the flag counts stages left, so its maximum is the first bad stage
        flag_non_finite(flag_ptr, out, mask, K - 1 - k)
        flag_non_finite(flag_ptr, mo, mask, K - 1 - k)  # clipping D can hide a non-finite model output
    if NHIST >= 1:
        if push:
            if NHIST >= 3:
                tl.store(h2_ptr + offsets(b, i, c, s2b, s2p, LAYOUT_CL), h1, mask=mask)
            if NHIST >= 2:
                tl.store(h1_ptr + offsets(b, i, c, s1b, s1p, LAYOUT_CL), h0, mask=mask)
            tl.store(h0_ptr + offsets(b, i, c, s0b, s0p, LAYOUT_CL), p * x + q * d, mask=mask)


def sigma_step_forward(plan, x, k, model_output, history, noise, *, seed, sample_offset: int, out=None,
                       rng=None, flag=None, guidance=None, uncond_output=None, coef_out=None, dup_out=None):
    """Launch the fused stage update; returns (new x, history). Inputs are validated by fastddpm.ops.

    history: plan.num_history float32 tensors like x, updated IN PLACE when they are in the layout
    the kernel walks (else the updated copies are written back into them). out: a float32 buffer
    to write (may be x). For captured loops, rng (int64 device (seed_lo, seed_hi, sample_offset))
    replaces seed and sample_offset, and flag (int64 device scalar) is raised to K - 1 - k when
    the new state holds a non-finite value. guidance, uncond_output, coef_out: as in kernels/step.py."""
    C = x.shape[1]
    x, layout = pick_layout(x)
    walk = Walk(x, layout)
    dev = x.device
    mo = to_layout(model_output, layout)
    mu, sub, sup, g, w_val, guide = launch_args(guidance, mo, uncond_output, x, layout, walk, coef_out)
    hist = [to_layout(h, layout) for h in history]
    pad = hist + [x] * (3 - len(hist))
    z = to_layout(noise, layout) if noise is not None else x
    user_out = out
    if out is None or sample_layout(out) != layout:  # the kernel writes in the layout it walks
        out = torch.empty_like(x, dtype=torch.float32)
    dup, sdb, sdp, dup_on = dup_args(dup_out, out, layout)
    tab = plan.table(dev)
    stoch = bool((plan.row("s") != 0).any())
    if not stoch:
        noise_mode = NOISE_NONE
    elif noise is not None:
        noise_mode = NOISE_TENSOR
    else:
        noise_mode = NOISE_PHILOX if (seed is not None or rng is not None) else NOISE_NONE
    per_sample = isinstance(k, torch.Tensor)
    seed_lo, seed_hi = split_seed(seed or 0)
    with device_guard(x):
        sigma_step_kernel[walk.grid](
            x, mo, pad[0], pad[1], pad[2], z, out,
            x.stride(0), pixel_stride(x), mo.stride(0), pixel_stride(mo), pad[0].stride(0), pixel_stride(pad[0]),
            pad[1].stride(0), pixel_stride(pad[1]), pad[2].stride(0), pixel_stride(pad[2]),
            z.stride(0), pixel_stride(z), out.stride(0), pixel_stride(out),
            mu, sub, sup, g, w_val, dup, sdb, sdp,
            tab, plan.tags_on(dev), k if per_sample else tab, 0 if per_sample else int(k), plan.nfe,
            walk.N, C, walk.HW, float(plan.clip) if plan.clip is not None else 0.0, seed_lo, seed_hi,
            as_i32(sample_offset), rng if rng is not None else tab, flag if flag is not None else tab,
            ROW["cs"], ROW["co"], ROW["a"], ROW["b"], ROW["c0"], ROW["c1"], ROW["c2"], ROW["s"], ROW["p"], ROW["q"],
            NHIST=plan.num_history, CLIP=plan.clip is not None, NOISE=noise_mode, PER_SAMPLE_K=per_sample,
            RNG_PTR=rng is not None, CHECK=flag is not None, GUIDE=guide, DUP=dup_on,
            **walk.meta, num_warps=walk.num_warps,
        )
    if user_out is not None and user_out is not out:
        out = user_out.copy_(out)
    if dup_out is not None and not dup_on:
        dup_out.copy_(out)
    for h, mine in zip(history, hist):
        if h is not mine:
            h.copy_(mine)
    return out, tuple(history)

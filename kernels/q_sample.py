"""Fused forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020 eq. 4).

With in-kernel noise (tag TAG_Q_SAMPLE of the stream) the kernel also writes eps, the
training target, so a training step reads x0 once and writes x_t and eps once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastddpm.rng import TAG_Q_SAMPLE
from fastddpm.schedule import ROW

from .common import (Walk, as_i32, block_noise, device_guard, offsets, pick_layout, pixel_stride, program_coords,
                     split_seed, to_layout)


@triton.jit(do_not_specialize=["t_scalar", "S", "seed_lo", "seed_hi", "sample_offset", "tag"])
def q_sample_kernel(
    x0_ptr, z_ptr, out_ptr, sxb, sxp, szb, szp, sob, sop,
    tab_ptr, t_ptr, t_scalar, S, N, C, HW, seed_lo, seed_hi, sample_offset, tag,
    ROW_SQRT_ABAR: tl.constexpr, ROW_SQRT_1M_ABAR: tl.constexpr,
    DRAW: tl.constexpr, PER_SAMPLE_T: tl.constexpr, LAYOUT_CL: tl.constexpr, BLOCK: tl.constexpr,
    CP: tl.constexpr, QUAD: tl.constexpr,
):
    b, pid, t, i, c, mask = program_coords(t_ptr, t_scalar, N, C, HW, PER_SAMPLE_T, BLOCK, LAYOUT_CL, CP)
    x0 = tl.load(x0_ptr + offsets(b, i, c, sxb, sxp, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
    if DRAW:
        z = block_noise(pid, sample_offset + b, tag, seed_lo, seed_hi, HW, BLOCK, LAYOUT_CL, CP, QUAD)
        tl.store(z_ptr + offsets(b, i, c, szb, szp, LAYOUT_CL), z, mask=mask)
    else:
        z = tl.load(z_ptr + offsets(b, i, c, szb, szp, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
    sa = tl.load(tab_ptr + ROW_SQRT_ABAR * S + t)
    s1 = tl.load(tab_ptr + ROW_SQRT_1M_ABAR * S + t)
    tl.store(out_ptr + offsets(b, i, c, sob, sop, LAYOUT_CL), sa * x0 + s1 * z, mask=mask)


def q_sample_forward(s, x0, t, noise, seed, sample_offset):
    """Launch q_sample; returns x_t, or (x_t, noise) when the noise is drawn in the kernel.
    t: an int, or a contiguous int64 tensor (B,) on x0's device (fastddpm._checks.check_t)."""
    x0, layout = pick_layout(x0)
    walk = Walk(x0, layout)
    draw = noise is None
    z = torch.empty_like(x0, dtype=torch.float32) if draw else to_layout(noise, layout)
    out = torch.empty_like(x0, dtype=torch.float32)
    per_sample = isinstance(t, torch.Tensor)
    seed_lo, seed_hi = split_seed(seed or 0)
    tab = s.table(x0.device)
    with device_guard(x0):
        q_sample_kernel[walk.grid](
            x0, z, out, x0.stride(0), pixel_stride(x0), z.stride(0), pixel_stride(z), out.stride(0), pixel_stride(out),
            tab, t if per_sample else tab, 0 if per_sample else int(t), s.num_steps, walk.N, walk.C, walk.HW,
            seed_lo, seed_hi, as_i32(sample_offset), as_i32(TAG_Q_SAMPLE),
            ROW["sqrt_abar"], ROW["sqrt_one_minus_abar"],
            DRAW=draw, PER_SAMPLE_T=per_sample, **walk.meta, num_warps=walk.num_warps,
        )
    return (out, z) if draw else out

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

from .common import (block_noise, grid, launch_config, offsets, pick_layout, pixel_stride, program_coords, split_seed,
                     to_layout)


@triton.jit
def q_sample_kernel(
    x0_ptr, z_ptr, out_ptr, sxb, sxp, szb, szp, sob, sop,
    tab_ptr, t_ptr, t_scalar, S, N, C, HW, seed_lo, seed_hi, sample_offset, tag,
    ROW_SQRT_ABAR: tl.constexpr, ROW_SQRT_1M_ABAR: tl.constexpr,
    DRAW: tl.constexpr, PER_SAMPLE_T: tl.constexpr, LAYOUT_CL: tl.constexpr, BLOCK: tl.constexpr,
):
    b, pid, t, i, mask = program_coords(t_ptr, t_scalar, N, PER_SAMPLE_T, BLOCK)
    x0 = tl.load(x0_ptr + offsets(b, i, sxb, sxp, C, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
    if DRAW:
        z = block_noise(pid, sample_offset + b, tag, seed_lo, seed_hi, i, C, HW, BLOCK, LAYOUT_CL)
        tl.store(z_ptr + offsets(b, i, szb, szp, C, LAYOUT_CL), z, mask=mask)
    else:
        z = tl.load(z_ptr + offsets(b, i, szb, szp, C, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
    sa = tl.load(tab_ptr + ROW_SQRT_ABAR * S + t)
    s1 = tl.load(tab_ptr + ROW_SQRT_1M_ABAR * S + t)
    tl.store(out_ptr + offsets(b, i, sob, sop, C, LAYOUT_CL), sa * x0 + s1 * z, mask=mask)


def q_sample_forward(s, x0, t, noise, seed, sample_offset):
    """Launch q_sample; returns x_t, or (x_t, noise) when the noise is drawn in the kernel."""
    B = x0.shape[0]
    x0, layout = pick_layout(x0)
    N = x0[0].numel()
    C = x0.shape[1] if x0.ndim > 1 else 1
    draw = noise is None
    z = torch.empty_like(x0, dtype=torch.float32) if draw else to_layout(noise, layout)
    out = torch.empty_like(x0, dtype=torch.float32)
    per_sample = isinstance(t, torch.Tensor)
    seed_lo, seed_hi = split_seed(seed or 0)
    block, warps = launch_config(N)
    tab = s.table(x0.device)
    q_sample_kernel[grid(B, N, block)](
        x0, z, out, x0.stride(0), pixel_stride(x0), z.stride(0), pixel_stride(z), out.stride(0), pixel_stride(out),
        tab, t if per_sample else tab, 0 if per_sample else int(t), s.num_steps, N, C, N // C,
        seed_lo, seed_hi, sample_offset, TAG_Q_SAMPLE,
        ROW["sqrt_abar"], ROW["sqrt_one_minus_abar"],
        DRAW=draw, PER_SAMPLE_T=per_sample, LAYOUT_CL=layout == "cl", BLOCK=block, num_warps=warps,
    )
    return (out, z) if draw else out

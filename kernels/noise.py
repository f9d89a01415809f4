"""Standard normal noise from the counter-based stream (fastddpm/rng.py), written by a kernel.

Used for a sampler's initial x_T (tag TAG_INIT) inside captured loops, where the seed and
the first sample index are read from device memory so one captured launch serves any seed
and any batch of a run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (Walk, as_i32, block_noise, device_guard, offsets, pick_layout, pixel_stride, program_coords,
                     rng_args, split_seed)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "sample_offset", "tag", "tag2"])
def normal_kernel(
    out_ptr, sob, sop, N, C, HW, rng_ptr, seed_lo, seed_hi, sample_offset, tag, scale, tag2, scale2,
    TWO: tl.constexpr, RNG_PTR: tl.constexpr, LAYOUT_CL: tl.constexpr, BLOCK: tl.constexpr, CP: tl.constexpr,
    QUAD: tl.constexpr,
):
    b, pid, _, i, c, mask = program_coords(rng_ptr, 0, N, C, HW, False, BLOCK, LAYOUT_CL, CP)  # no step index
    k_lo, k_hi, first = rng_args(rng_ptr, seed_lo, seed_hi, sample_offset, RNG_PTR)
    z = block_noise(pid, first + b, tag, k_lo, k_hi, HW, BLOCK, LAYOUT_CL, CP, QUAD)
    if TWO:  # scale z(tag) + scale2 z(tag2): a sigma method's x_T and its first churn noise
        z = scale * z + scale2 * block_noise(pid, first + b, tag2, k_lo, k_hi, HW, BLOCK, LAYOUT_CL, CP, QUAD)
    tl.store(out_ptr + offsets(b, i, c, sob, sop, LAYOUT_CL), z, mask=mask)


def normal_forward(out: torch.Tensor, tag: int, *, seed: int | None = None, sample_offset: int = 0,
                   rng: torch.Tensor | None = None, scale: float = 1.0, tag2: int = 0,
                   scale2: float = 0.0) -> torch.Tensor:
    """Fill the float32 tensor out (B, ...) with stream noise of samples sample_offset .. + B - 1
    under `tag`; rng (int64 device tensor: seed_lo, seed_hi, sample_offset) replaces seed and
    sample_offset when given. out must be contiguous or channels_last inside each sample.
    With scale != 1 or scale2 != 0: out = scale z(tag) + scale2 z(tag2) (a sigma method's first
    model input, fastddpm.karras.initial_state)."""
    target, layout = pick_layout(out)
    if target is not out:
        raise ValueError("out must be contiguous or channels_last inside each sample")
    walk = Walk(out, layout)
    seed_lo, seed_hi = split_seed(seed or 0)
    two = scale != 1.0 or scale2 != 0.0
    with device_guard(out):
        normal_kernel[walk.grid](
            out, out.stride(0), pixel_stride(out), walk.N, walk.C, walk.HW, rng if rng is not None else out,
            seed_lo, seed_hi, as_i32(sample_offset), as_i32(tag), float(scale), as_i32(tag2), float(scale2),
            TWO=two, RNG_PTR=rng is not None, **walk.meta, num_warps=walk.num_warps,
        )
    return out

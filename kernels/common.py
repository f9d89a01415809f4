"""Shared pieces of the step kernels: in-kernel Philox noise and the launch-side layout logic.

The noise is "fastddpm Philox stream v1" (documented in fastddpm/rng.py, which is the
pure-PyTorch implementation of the same stream): Philox4x32-10 on the counter
(q_lo, q_hi, sample, tag) with key (seed_lo, seed_hi), q = element // 4, then float32
Box-Muller on (w0, w1) and (w2, w3) giving the 4 normals of elements 4q .. 4q+3.

Layouts. A kernel walks one sample's N elements in the memory order of x_t:
  LAYOUT_CL = False: every tensor is contiguous inside a sample (any batch stride);
                     element i sits at b * stride_b + i and is logical element i.
  LAYOUT_CL = True:  4-D channels_last-like tensors: iteration index i = hw * C + c sits
                     at b * stride_b + hw * stride_pixel + c, and is logical element c * HW + hw.
Any other layout is copied to x_t's layout by the launcher (the only copy ever made).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds (Salmon et al. 2011). All operands uint32."""
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0  # hi(B * c2) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1  # hi(A * c0) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57                      # lo(B * c2)
        c3 = _c0 * 0xD2511F53                      # lo(A * c0)
        k0 = k0 + 0x9E3779B9                       # key schedule (Weyl sequence)
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def box_muller(wa, wb):
    """Two uint32 words -> two float32 standard normals (u_a in (0, 1], u_b in [0, 1))."""
    u_a = ((wa >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
    u_b = (wb >> 8).to(tl.float32) * 5.9604644775390625e-08
    r = tl.sqrt(-2.0 * tl.log(u_a))
    th = 6.2831855 * u_b
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def stream_normal4(q, sample, tag, seed_lo, seed_hi):
    """The 4 normals of stream counters q (int64 tensor): elements 4q .. 4q+3 of `sample`.

    Scalars go through tl.to_tensor: a kernel argument equal to 1 is specialised into a
    constexpr by Triton's JIT, and a constexpr has no .to() (triton-lang/triton#2939)."""
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + tl.to_tensor(sample).to(tl.uint32)
    c3 = tl.zeros_like(c0) + tl.to_tensor(tag).to(tl.uint32)
    k0 = tl.to_tensor(seed_lo).to(tl.uint32)
    k1 = tl.to_tensor(seed_hi).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    z0, z1 = box_muller(w0, w1)
    z2, z3 = box_muller(w2, w3)
    return z0, z1, z2, z3


@triton.jit
def block_noise(pid, sample, tag, seed_lo, seed_hi, i, C, HW,
                BLOCK: tl.constexpr, LAYOUT_CL: tl.constexpr):
    """Stream noise for iteration indices i = pid * BLOCK + arange(BLOCK) of one sample."""
    if LAYOUT_CL:
        # logical element of each memory position; 4x Philox work, channels_last only
        e = (i % C) * HW + i // C
        z0, z1, z2, z3 = stream_normal4(e >> 2, sample, tag, seed_lo, seed_hi)
        r = e & 3
        z = tl.where(r == 0, z0, tl.where(r == 1, z1, tl.where(r == 2, z2, z3)))
    else:
        # one counter per 4 consecutive elements: compute once, interleave to element order
        q = pid.to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        z0, z1, z2, z3 = stream_normal4(q, sample, tag, seed_lo, seed_hi)
        z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (BLOCK,))  # [4q + r] = z_r
    return z


@triton.jit
def rng_args(rng_ptr, seed_lo, seed_hi, sample_offset, RNG_PTR: tl.constexpr):
    """(seed_lo, seed_hi, first sample index) of the noise stream: read from device memory
    (int64 rng_ptr[0..2]) in captured loops, so a replay can change them; else the arguments."""
    if RNG_PTR:
        return tl.load(rng_ptr), tl.load(rng_ptr + 1), tl.load(rng_ptr + 2)
    else:
        return seed_lo, seed_hi, sample_offset


@triton.jit
def flag_non_finite(flag_ptr, out, mask, t):
    """Raise the int64 flag at flag_ptr to step t (atomic max) if out holds a NaN or an inf.
    A loop runs t downwards, so the flag ends as the FIRST step that went bad."""
    bad = ((out != out) | (tl.abs(out) > 3.4028234663852886e38)) & mask
    if tl.max(bad.to(tl.int32), axis=0) > 0:
        tl.atomic_max(flag_ptr, t.to(tl.int64))


@triton.jit
def program_coords(t_ptr, t_scalar, N, PER_SAMPLE_T: tl.constexpr, BLOCK: tl.constexpr):
    """(b, pid, t, i, mask) of a program in the (sample, block) grid: sample b (int64), block pid,
    its step index t (read per sample, or the scalar), iteration indices i and their mask."""
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    if PER_SAMPLE_T:
        t = tl.load(t_ptr + b)
    else:
        t = t_scalar + 0 * b  # an int64 scalar either way
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return b, pid, t, i, i < N


@triton.jit
def offsets(b, i, stride_b, stride_pix, C, LAYOUT_CL: tl.constexpr):
    """Memory offsets (int64) of iteration indices i of sample b for one tensor."""
    if LAYOUT_CL:
        return b * stride_b + (i // C) * stride_pix + i % C
    return b * stride_b + i


# ---------------------------------------------------------------------------- launch side
def sample_layout(t: torch.Tensor):
    """'contig' if each sample is contiguous (any batch stride), 'cl' if a 4-D tensor is
    channels_last inside each sample (channel stride 1, width stride = pixel stride P >= C,
    height stride = W * P), else None."""
    shape, strides = t.shape[1:], t.stride()[1:]
    expected = 1
    ok = True
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1 and stride != expected:
            ok = False
            break
        expected *= size
    if ok:
        return "contig"
    if t.ndim == 4:
        C, H, W = shape
        sc, sh, sw = strides
        if (C == 1 or sc == 1) and sw >= C and (H == 1 or sh == W * sw):
            return "cl"
    return None


def pixel_stride(t: torch.Tensor) -> int:
    return t.stride(3) if t.ndim == 4 else 0


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t itself if it already has `layout`, else a copy in that layout."""
    if sample_layout(t) == layout:
        return t
    if layout == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def pick_layout(x: torch.Tensor):
    """The layout the kernel walks: x's own when supported (channels_last only for 4-D
    tensors whose pixel stride is exactly C, i.e. dense), else contiguous."""
    lay = sample_layout(x)
    if lay == "cl" and x.stride(3) != x.shape[1]:
        lay = None
    if lay is None:
        return x.contiguous(), "contig"
    return x, lay


def launch_config(n_per_sample: int):
    """BLOCK and num_warps: small samples (latency-bound) take short blocks so the grid
    still fills the GPU; large ones take 4096-element blocks (16 KB of float32 per operand)."""
    block = 4096 if n_per_sample > 8192 else max(128, min(1024, triton.next_power_of_2(n_per_sample)))
    return block, (8 if block >= 4096 else 4)


def grid(B: int, n_per_sample: int, block: int):
    blocks = math.ceil(n_per_sample / block)
    if blocks > 65535:
        raise ValueError(f"one sample has {n_per_sample} elements, more than the kernels' limit of "
                         f"{65535 * block}")
    return (B, blocks)


def split_seed(seed: int):
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF

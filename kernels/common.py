"""Shared pieces of the step kernels: in-kernel Philox noise and the launch-side layout logic.

The noise is "fastddpm Philox stream v1" (documented in fastddpm/rng.py, which is the
pure-PyTorch implementation of the same stream): Philox4x32-10 on the counter
(q_lo, q_hi, sample, tag) with key (seed_lo, seed_hi), q = element // 4, then float32
Box-Muller on (w0, w1) and (w2, w3) giving the 4 normals of elements 4q .. 4q+3.

Layouts. Every tensor a kernel touches is contiguous inside each sample (any batch stride)
or 4-D channels_last-like; the launcher copies anything else (the only copy ever made):
  LAYOUT_CL = False: contiguous. A program walks BLOCK consecutive elements i (logical element
                     i, at b * stride_b + i): coalesced, 128-bit loads when strides allow.
  LAYOUT_CL = True:  channels_last (channel stride 1, pixel stride P >= C; x_t's own P is C).
                     A program walks a (CP, PIX) tile, channels c < C (CP = C rounded up to a
                     power of two) x PIX pixels hw, at b * stride_b + hw * P + c; logical
                     element c * HW + hw.
In-kernel noise: with HW % 4 == 0 (e.g. even height and width) a channels_last tile draws one
Philox counter per run of 4 pixels of one channel, q = (c * HW + hw) / 4, and uses all 4 of
its outputs, as the contiguous walk does. Otherwise the 4 elements of a counter straddle
channels, and each element computes its own counter (4x the Philox work).

Per-call integers (step index, seed halves, first sample index, tag, S) are passed
unspecialised (`do_not_specialize`) and as 32-bit patterns (`as_i32`), so a sampling run
compiles a handful of kernels instead of one per value; the kernels read them back as uint32.
"""
from __future__ import annotations

import contextlib
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
    sample, tag, seed_lo, seed_hi: int32 bit patterns or int64 scalars; their low 32 bits count."""
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + sample.to(tl.uint32)
    c3 = tl.zeros_like(c0) + tag.to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))
    z0, z1 = box_muller(w0, w1)
    z2, z3 = box_muller(w2, w3)
    return z0, z1, z2, z3


@triton.jit
def block_noise(pid, sample, tag, seed_lo, seed_hi, HW,
                BLOCK: tl.constexpr, LAYOUT_CL: tl.constexpr, CP: tl.constexpr, QUAD: tl.constexpr):
    """Stream noise of one program's elements, shaped like its walk (see program_coords)."""
    if LAYOUT_CL:
        PIX: tl.constexpr = BLOCK // CP
        c = tl.arange(0, CP)
        if QUAD:  # HW % 4 == 0
            # a run of 4 pixels of channel c is one counter: (CP, PIX / 4) Philox calls, all 4 outputs used
            q0 = (c.to(tl.int64) * HW + pid.to(tl.int64) * PIX) >> 2
            q = q0[:, None] + tl.arange(0, PIX // 4)[None, :]
            z0, z1, z2, z3 = stream_normal4(q, sample, tag, seed_lo, seed_hi)
            z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (CP, PIX))  # [c, 4j + r] = z_r[c, j]
        else:
            # odd HW: a counter's 4 elements straddle channels; each element computes its own counter
            hw = pid.to(tl.int64) * PIX + tl.arange(0, PIX)
            e = c.to(tl.int64)[:, None] * HW + hw[None, :]
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


NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2  # a step kernel's NOISE: none, a tensor, the stream


@triton.jit
def step_noise(z_ptr, szb, szp, b, i, c, mask, pid, tag, rng_ptr, seed_lo, seed_hi, sample_offset, HW,
               NOISE: tl.constexpr, RNG_PTR: tl.constexpr, LAYOUT_CL: tl.constexpr, BLOCK: tl.constexpr,
               CP: tl.constexpr, QUAD: tl.constexpr):
    """The standard normal noise a step adds, shaped like its walk: read from the noise tensor
    (NOISE == 1), or drawn from the stream under `tag` (NOISE == 2; seed and first sample from
    rng_ptr in captured loops, see rng_args). Shared by every step kernel."""
    if NOISE == 1:
        z = tl.load(z_ptr + offsets(b, i, c, szb, szp, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
    else:
        k_lo, k_hi, first = rng_args(rng_ptr, seed_lo, seed_hi, sample_offset, RNG_PTR)
        z = block_noise(pid, first + b, tag, k_lo, k_hi, HW, BLOCK, LAYOUT_CL, CP, QUAD)
    return z


@triton.jit
def flag_non_finite(flag_ptr, out, mask, t):
    """Raise the int64 flag at flag_ptr to step t (atomic max) if out holds a NaN or an inf.
    A loop runs t downwards, so the flag ends as the FIRST step that went bad. The step kernels
    call it on the new state and on the model output (clipping can make an inf output's state finite)."""
    bad = ((out != out) | (tl.abs(out) > 3.4028234663852886e38)) & mask
    if tl.max(bad.to(tl.int32)) > 0:
        tl.atomic_max(flag_ptr, t.to(tl.int64))


@triton.jit
def program_coords(t_ptr, t_scalar, N, C, HW, PER_SAMPLE_T: tl.constexpr, BLOCK: tl.constexpr,
                   LAYOUT_CL: tl.constexpr, CP: tl.constexpr):
    """(b, pid, t, i, c, mask) of a program in the (sample, block) grid: sample b (int64), block
    pid, its step index t (read per sample, or the scalar), and what it walks: BLOCK consecutive
    elements i (int64; c unused), or for channels_last a (CP, BLOCK // CP) tile of channels
    c (CP,) x pixels i (BLOCK // CP,). mask has the walk's shape."""
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    if PER_SAMPLE_T:
        t = tl.load(t_ptr + b)
    else:
        t = t_scalar + 0 * b  # an int64 scalar either way
    if LAYOUT_CL:
        i = pid.to(tl.int64) * (BLOCK // CP) + tl.arange(0, BLOCK // CP)
        c = tl.arange(0, CP)
        mask = (c < C)[:, None] & (i < HW)[None, :]
    else:
        i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        c = tl.arange(0, 1)
        mask = i < N
    return b, pid, t, i, c, mask


@triton.jit
def offsets(b, i, c, stride_b, stride_pix, LAYOUT_CL: tl.constexpr):
    """Memory offsets (int64) of one tensor at a program's walk (see program_coords)."""
    if LAYOUT_CL:
        off = b * stride_b + i[None, :] * stride_pix + c[:, None]  # (CP, PIX)
    else:
        off = b * stride_b + i
    return off


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


MAX_CL_CHANNELS = 256  # a channels_last tile holds all channels of its pixels


def pick_layout(x: torch.Tensor):
    """(x or a contiguous copy, layout): the layout the kernel walks is x's own when supported
    (channels_last for dense 4-D tensors, pixel stride exactly C, of at most MAX_CL_CHANNELS
    channels), else contiguous."""
    lay = sample_layout(x)
    if lay == "cl" and (x.stride(3) != x.shape[1] or x.shape[1] > MAX_CL_CHANNELS):
        lay = None
    if lay is None:
        return x.contiguous(), "contig"
    return x, lay


MAX_REGISTERS = 255  # maxnreg of every launch: a thread's whole share of the register file (see launch_config)


def launch_config(n_per_sample: int):
    """BLOCK and num_warps: small samples (latency-bound) take short blocks so the grid
    still fills the GPU; large ones take 4096-element blocks (16 KB of float32 per operand).
    At least 4 elements a thread, so float32 operands load 128 bits at a time.

    Registers: every launch passes maxnreg=MAX_REGISTERS (Walk.meta). Without it ptxas picks a
    register budget that keeps 2 to 4 blocks of 8 warps resident (128, 80, 64 registers) and
    the register-heavy variants (in-kernel noise, channels_last learned_range, half-precision
    inputs) spilled 4-20 bytes a thread: 15 variants on Triton 3.9, 1 on 3.6; 16 warps (8
    elements a thread) moved the spills to 5 others at 64. With the whole budget none spills
    (tests/kernel_compile_check.py); no GPU has timed either configuration yet."""
    block = 4096 if n_per_sample > 8192 else max(128, min(1024, triton.next_power_of_2(n_per_sample)))
    return block, min(8, block // 128)


class Walk:
    """How a kernel walks x (B, ...) in `layout`: its constexprs (BLOCK, LAYOUT_CL, CP, QUAD) and
    the maxnreg launch option (meta, passed as **walk.meta), num_warps and grid, and the shape
    arguments N (per sample), C, HW."""

    def __init__(self, x: torch.Tensor, layout: str):
        B, self.N = x.shape[0], x[0].numel()
        self.C = x.shape[1] if x.ndim > 1 else 1
        self.HW = self.N // self.C
        block, self.num_warps = launch_config(self.N)
        cl = layout == "cl"
        cp = triton.next_power_of_2(self.C) if cl else 1
        block = max(block, 4 * cp)  # at least 4 pixels a tile: a run of 4 shares a Philox counter
        per_block = block // cp if cl else block
        total = self.HW if cl else self.N
        blocks = math.ceil(total / per_block)
        if blocks > 65535:
            raise ValueError(f"one sample has {self.N} elements, more than the kernels' limit of "
                             f"{65535 * per_block * (self.C if cl else 1)}")
        self.grid = (B, blocks)
        self.meta = dict(BLOCK=block, LAYOUT_CL=cl, CP=cp, QUAD=self.HW % 4 == 0, maxnreg=MAX_REGISTERS)


def as_i32(v: int) -> int:
    """The int32 with v's low 32 bits: per-call integers travel as one kernel type (i32)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def split_seed(seed: int):
    """(seed_lo, seed_hi) as int32 bit patterns."""
    return as_i32(seed), as_i32(seed >> 32)


def device_guard(x: torch.Tensor):
    """Make x's CUDA device current for a launch (Triton launches on the current device);
    nothing to do for CPU tensors (the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()

"""Counter-based noise: the exact stream the Triton kernels draw, in plain PyTorch.

The stream ("fastddpm Philox stream v1") is a pure function of
(seed, sample index, tag, element index), so sample i gets the same noise whatever
batch it is in, whatever backend, process count or device draws it:

    key      = (seed & 0xFFFFFFFF, seed >> 32)                 seed: int in [0, 2**64)
    q        = e // 4                                          e: element index inside one sample,
                                                                  row-major over (C, H, W)
    counter  = (q & 0xFFFFFFFF, q >> 32, sample & 0xFFFFFFFF, tag)
    w0..w3   = Philox4x32-10(counter, key)                      (Salmon et al. 2011; Random123 constants)
    u_a      = ((w0 >> 8) + 1) * 2**-24   in (0, 1]           exact in float32
    u_b      = (w1 >> 8) * 2**-24         in [0, 1)
    r        = sqrt(-2 log u_a);  z0 = r cos(2 pi u_b);  z1 = r sin(2 pi u_b)
    (w2, w3) give z2, z3 the same way;  noise[e] = z_(e % 4)   (float32 Box-Muller)

Tags: a sampling step draws with tag = its step index (0..S-1); the initial x_T uses
TAG_INIT; q_sample uses TAG_Q_SAMPLE. The integer part is bit-exact between this file
and the kernels; the float part agrees to float32 rounding of log/sqrt/cos (~1e-6).
"""
from __future__ import annotations

import math

import torch

__all__ = ["philox4x32", "normal", "check_seed", "TAG_INIT", "TAG_Q_SAMPLE", "PHILOX_ROUNDS"]

TAG_INIT = 0xFFFFFFFF
TAG_Q_SAMPLE = 0xFFFFFFFE
PHILOX_ROUNDS = 10
M32 = 0xFFFFFFFF
# Random123 Philox4x32 constants.
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
TWO_PI_F32 = 6.2831855  # float32(2 pi)


def check_seed(seed, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be an int in [0, 2**64); got {seed!r}")
    return seed


def _mul_hi_lo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a constant a < 2**32 and b (int64 holding uint32).

    The product is < 2**64, so the wrapped int64 product holds exactly its 64 bits."""
    p = a * b
    return (p >> 32) & M32, p & M32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; returns 4 such tensors."""
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & M32, (k1 + KEY_B) & M32
    return c0, c1, c2, c3


def _box_muller(wa: torch.Tensor, wb: torch.Tensor):
    u_a = ((wa >> 8) + 1).to(torch.float32) * (2.0**-24)
    u_b = (wb >> 8).to(torch.float32) * (2.0**-24)
    r = torch.sqrt(-2.0 * torch.log(u_a))
    th = TWO_PI_F32 * u_b
    return r * torch.cos(th), r * torch.sin(th)


def normal(seed: int, sample_index, tag, numel: int, device=None) -> torch.Tensor:
    """Noise of the stream above: (B, numel) float32 for global sample indices `sample_index`.

    sample_index: LongTensor (B,) (or int); tag: int or LongTensor (B,) (the step index of
    each sample). Pure PyTorch, any device.
    """
    check_seed(seed)
    sample_index = torch.as_tensor(sample_index, dtype=torch.long, device=device).reshape(-1, 1)
    device = sample_index.device
    tag = torch.as_tensor(tag, dtype=torch.long, device=device).reshape(-1, 1) & M32
    nq = (numel + 3) // 4
    q = torch.arange(nq, dtype=torch.long, device=device).reshape(1, -1)
    B = sample_index.shape[0]
    c0 = (q & M32).expand(B, nq)
    c1 = (q >> 32).expand(B, nq)
    c2 = (sample_index & M32).expand(B, nq)
    c3 = tag.expand(B, nq)
    w0, w1, w2, w3 = philox4x32(c0, c1, c2, c3, seed & M32, (seed >> 32) & M32)
    z0, z1 = _box_muller(w0, w1)
    z2, z3 = _box_muller(w2, w3)
    z = torch.stack([z0, z1, z2, z3], dim=-1).reshape(B, 4 * nq)  # element e = 4 q + r
    return z[:, :numel].contiguous()


def normal_like(x: torch.Tensor, seed: int, sample_offset: int, tag) -> torch.Tensor:
    """Stream noise shaped like x (B, ...), for samples sample_offset .. sample_offset + B - 1."""
    B = x.shape[0]
    idx = torch.arange(sample_offset, sample_offset + B, device=x.device)
    n = math.prod(x.shape[1:])
    return normal(seed, idx, tag, n, device=x.device).reshape(x.shape)

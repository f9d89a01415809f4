"""Classifier-free guidance inside the step kernels (fastddpm/guidance.py has the formulas).

A guided step kernel reads BOTH halves of the model output, the conditional out_c at row b and
the unconditional out_u (row B + b of the doubled batch, or a second tensor), and uses
g_c out_c + g_u out_u in place of the model output, in the same single launch:

    GUIDE = 0: no guidance
    GUIDE = 1: (g_c, g_u) = (w, 1 - w), w a launch argument
    GUIDE = 2: (g_c, g_u) = (w, 1 - w), w read from device memory (captured loops: one capture
               serves every scale)
    GUIDE = 3: per-sample (g_c, g_u) read from a (B, 2) float32 buffer, written by
               `coef_kernel` for guidance_rescale / guidance_parallel

coef_kernel: one program per sample reads its guided channels of out_c and out_u once, sums
c, u, c^2, u^2 and c u in float64 and turns them into (g_c, g_u)
(fastddpm.guidance.coefficients_from_moments is the same computation in PyTorch).

The state can also be stored twice (`store_state`, DUP): into x and into the second half of
the doubled model input buffer of a guided captured loop, so no concatenation precedes the
next doubled call.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastddpm.guidance import CFG

from .common import Walk, device_guard, offsets, pixel_stride, to_layout

GUIDE_NONE, GUIDE_SCALAR, GUIDE_DEVICE, GUIDE_PER_SAMPLE = 0, 1, 2, 3


@triton.jit
def guided_output(mo_ptr, mu_ptr, smb, smp, sub, sup, b, i, c, mask, g_ptr, w_val,
                  LAYOUT_CL: tl.constexpr, GUIDE: tl.constexpr):
    """The model output a step uses at a program's walk: out_c, or with guidance g_c out_c + g_u out_u."""
    mo = tl.load(mo_ptr + offsets(b, i, c, smb, smp, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
    if GUIDE != 0:
        mu = tl.load(mu_ptr + offsets(b, i, c, sub, sup, LAYOUT_CL), mask=mask, other=0.0).to(tl.float32)
        if GUIDE == 1:
            gc = w_val
            gu = 1.0 - w_val
        elif GUIDE == 2:
            gc = tl.load(g_ptr)
            gu = 1.0 - gc
        else:
            gc = tl.load(g_ptr + 2 * b)
            gu = tl.load(g_ptr + 2 * b + 1)
        mo = gc * mo + gu * mu
    return mo


@triton.jit
def store_state(out_ptr, dup_ptr, sob, sop, sdb, sdp, b, i, c, out, mask, LAYOUT_CL: tl.constexpr,
                DUP: tl.constexpr):
    """Store the new state; with DUP also into the second half of the doubled model input, so a
    guided loop's next model call reads cat([x, x]) without a concatenation."""
    tl.store(out_ptr + offsets(b, i, c, sob, sop, LAYOUT_CL), out, mask=mask)
    if DUP:
        tl.store(dup_ptr + offsets(b, i, c, sdb, sdp, LAYOUT_CL), out, mask=mask)


@triton.jit
def _sum_all(v, LAYOUT_CL: tl.constexpr):
    if LAYOUT_CL:
        return tl.sum(tl.sum(v, axis=1), axis=0)
    else:
        return tl.sum(v, axis=0)


@triton.jit
def coef_kernel(mc_ptr, mu_ptr, smb, smp, sub, sup, g_ptr, w_ptr, w_val, rescale, parallel, N, C, HW,
                NBLK: tl.constexpr,  # blocks per sample: constexpr (Triton 3.6's interpreter cannot range() an arg)
                W_PTR: tl.constexpr, RESCALE: tl.constexpr, PARALLEL: tl.constexpr, LAYOUT_CL: tl.constexpr,
                BLOCK: tl.constexpr, CP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    s_c = tl.zeros((), tl.float64)
    s_u = tl.zeros((), tl.float64)
    s_cc = tl.zeros((), tl.float64)
    s_uu = tl.zeros((), tl.float64)
    s_cu = tl.zeros((), tl.float64)
    for blk in range(0, NBLK):
        if LAYOUT_CL:
            i = blk * (BLOCK // CP) + tl.arange(0, BLOCK // CP)
            c = tl.arange(0, CP)
            mask = (c < C)[:, None] & (i < HW)[None, :]
        else:
            i = tl.max_contiguous(tl.multiple_of(blk * BLOCK + tl.arange(0, BLOCK), BLOCK), BLOCK)
            c = tl.arange(0, 1)
            mask = i < N
        vc = tl.load(mc_ptr + offsets(b, i, c, smb, smp, LAYOUT_CL), mask=mask, other=0.0).to(tl.float64)
        vu = tl.load(mu_ptr + offsets(b, i, c, sub, sup, LAYOUT_CL), mask=mask, other=0.0).to(tl.float64)
        s_c += _sum_all(vc, LAYOUT_CL)
        s_u += _sum_all(vu, LAYOUT_CL)
        s_cc += _sum_all(vc * vc, LAYOUT_CL)
        s_uu += _sum_all(vu * vu, LAYOUT_CL)
        s_cu += _sum_all(vc * vu, LAYOUT_CL)
    zero = tl.zeros((), tl.float64)  # scalars promoted to float64 by adding it (the interpreter passes Python floats)
    if W_PTR:
        w = tl.load(w_ptr).to(tl.float64)
    else:
        w = w_val + zero
    a = w
    bu = 1.0 - w
    if PARALLEL:  # d' = d - (1 - k) (d.c / c.c) c; out = c + (w - 1) d'
        alpha = (s_cc - s_cu) / tl.maximum(s_cc, 1e-24)
        a = a - (w - 1.0) * (1.0 - (parallel + zero)) * alpha
    if RESCALE:  # phi std(c) / std(a c + b u) + 1 - phi
        n = N + zero
        var_c = s_cc - s_c * s_c / n
        so = a * s_c + bu * s_u
        var_o = a * a * s_cc + 2.0 * a * bu * s_cu + bu * bu * s_uu - so * so / n
        phi = rescale + zero
        f = phi * tl.sqrt(var_c / var_o) + (1.0 - phi)
        a = a * f
        bu = bu * f
    tl.store(g_ptr + 2 * b, a.to(tl.float32))
    tl.store(g_ptr + 2 * b + 1, bu.to(tl.float32))


def dup_args(dup_out, out, layout):
    """(dup tensor, its batch and pixel strides, DUP) for a launch writing `out`: dup_out when it is in
    the kernel's layout (else the launcher copies after the launch)."""
    if dup_out is not None and to_layout(dup_out, layout) is dup_out:
        return dup_out, dup_out.stride(0), pixel_stride(dup_out), True
    return out, 0, 0, False


def launch_args(cfg: CFG | None, mo_c: torch.Tensor, mo_u: torch.Tensor | None, x: torch.Tensor, layout: str,
                walk: Walk, g_out: torch.Tensor | None = None):
    """(mu, sub, sup, g, w_val, GUIDE) for a step kernel walking x in `layout`: the unconditional
    output in the kernel's layout and the coefficients (launching coef_kernel when the options need
    per-sample ones; g_out: a (B, 2) float32 buffer to write them into, for captured loops)."""
    if cfg is None:
        return mo_c, 0, 0, mo_c, 0.0, GUIDE_NONE
    mu = to_layout(mo_u[:, :x.shape[1]] if mo_u.shape[1] != x.shape[1] else mo_u, layout)
    w = cfg.scale
    if not cfg.needs_reduction:
        if isinstance(w, torch.Tensor):
            return mu, mu.stride(0), pixel_stride(mu), w, 0.0, GUIDE_DEVICE
        return mu, mu.stride(0), pixel_stride(mu), mu, float(w), GUIDE_SCALAR
    B = x.shape[0]
    g = g_out if g_out is not None else torch.empty((B, 2), dtype=torch.float32, device=x.device)
    mc = to_layout(mo_c[:, :x.shape[1]], layout) if mo_c.shape[1] != x.shape[1] else mo_c
    w_ptr = w if isinstance(w, torch.Tensor) else g
    with device_guard(x):
        coef_kernel[(B,)](
            mc, mu, mc.stride(0), pixel_stride(mc), mu.stride(0), pixel_stride(mu), g, w_ptr,
            0.0 if isinstance(w, torch.Tensor) else float(w), float(cfg.rescale), float(cfg.parallel),
            walk.N, walk.C, walk.HW, walk.grid[1],
            W_PTR=isinstance(w, torch.Tensor), RESCALE=cfg.rescale != 0, PARALLEL=cfg.parallel != 1,
            LAYOUT_CL=walk.meta["LAYOUT_CL"], BLOCK=walk.meta["BLOCK"], CP=walk.meta["CP"],
            maxnreg=walk.meta["maxnreg"], num_warps=walk.num_warps,
        )
    return mu, mu.stride(0), pixel_stride(mu), g, 0.0, GUIDE_PER_SAMPLE

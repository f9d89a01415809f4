"""Fused ops: drop-in replacements for `fastddpm.diffusion`'s q_sample / ddpm_step / ddim_step /
dpm_solver_step and `fastddpm.karras.sigma_step` (the k-diffusion samplers' stage update).

Same signatures, same results (within float32 rounding), one kernel launch each:

    from fastddpm import ops
    x_prev = ops.ddpm_step(s, x_t, t, eps, noise)                  # explicit noise
    x_prev = ops.ddpm_step(s, x_t, t, eps, seed=7, sample_offset=0) # noise drawn in the kernel
    x_t, eps = ops.q_sample(s, x0, t, seed=7)                       # training: x_t and its target

Where they run: CUDA tensors -> compiled Triton kernels. CPU tensors with TRITON_INTERPRET=1
set before fastddpm.ops first launched a kernel -> the same kernels under Triton's
interpreter (how CI tests them). Otherwise -> the reference math, with a one-time notice.

Extras over the reference: `out=` (a float32 buffer shaped like x_t to write into; it may
be x_t itself, but not partly overlap an input: refused) for allocation-free loops. An empty
batch returns empty results, as the reference does. t may be a device LongTensor (B,): no host sync
happens inside while a CUDA graph is being captured.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import _checks as C
from . import diffusion, dpm_solver
from . import guidance as guidance_mod

__all__ = ["q_sample", "ddpm_step", "ddim_step", "dpm_solver_step", "sigma_step", "kernels_available", "backend_for"]

_kernels = None
_notified = False


def _load_kernels():
    global _kernels
    if _kernels is None:
        from fastddpm.kernels import q_sample as q_mod
        from fastddpm.kernels import step as step_mod

        _kernels = (q_mod, step_mod)
    return _kernels


def kernels_available() -> tuple[bool, str]:
    """(ok, why): whether Triton can be imported here."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton cannot be imported ({type(e).__name__}: {e})"
    return True, ""


def backend_for(x: torch.Tensor) -> str:
    """'triton' (compiled), 'interpreter' or 'reference' for a tensor on x's device."""
    ok, _ = kernels_available()
    if not ok:
        return "reference"
    if x.is_cuda:
        return "triton"
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter"
    return "reference"


def _use_kernels(x: torch.Tensor) -> bool:
    global _notified
    backend = backend_for(x)
    if backend != "reference":
        return True
    if not _notified:
        _notified = True
        ok, why = kernels_available()
        reason = why if not ok else (f"tensors are on {x.device}; set TRITON_INTERPRET=1 before the first "
                                     "fastddpm.ops call to run the kernels under Triton's interpreter")
        warnings.warn(f"fastddpm.ops: fused kernels unavailable ({reason}); using the reference math "
                      "(same results, not fused)", RuntimeWarning, stacklevel=3)
    return False


def _check_out(out, x, inputs=None, name="out", outputs=None):
    """out: a float32 buffer like x, apart from every input (a dict name -> tensor) or one of them itself, and
    apart from the other outputs (C.check_no_partial_overlap)."""
    if out is None:
        return
    C.check_like(out, x, name)
    if out.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (the sampler state's dtype); got {out.dtype}")
    C.check_no_partial_overlap(out, name, inputs or {}, outputs)


def _empty_result(x, return_x0=False, out=None):
    """What the reference returns for an empty batch: empty float32 tensors (out itself when given)."""
    res = out if out is not None else torch.empty_like(x, dtype=torch.float32)
    return (res, torch.empty_like(x, dtype=torch.float32)) if return_x0 else res


def q_sample(s, x0: torch.Tensor, t, noise: torch.Tensor | None = None, *, seed: int | None = None,
             sample_offset: int = 0):
    """Fused `fastddpm.diffusion.q_sample` (same arguments and results)."""
    C.check_schedule(s)
    C.check_float_tensor(x0, "x0", min_ndim=1)
    t = C.check_t(s, t, x0)
    C.check_noise_source(noise, seed, x0, needs_noise=True)
    C.check_sample_offset(sample_offset)
    if sample_offset + x0.shape[0] > 2**32:
        raise ValueError(f"sample_offset + batch must not exceed 2**32; got {sample_offset} + {x0.shape[0]}")
    if not _use_kernels(x0) or x0.shape[0] == 0:  # an empty batch: the reference's empty result, no launch
        return diffusion.q_sample(s, x0, t, noise, seed=seed, sample_offset=sample_offset)
    q_mod, _ = _load_kernels()
    return q_mod.q_sample_forward(s, x0, t, noise, seed, sample_offset)


def _guided(guidance, model_output, x, variance="fixed_small"):
    """(cfg or None, out_c, out_u or None): a guided step's two model outputs, validated."""
    if guidance is None:
        return None, model_output, None
    cfg = guidance_mod.check_cfg(guidance)
    mo_c, mo_u = guidance_mod.split_output(model_output, x)
    C.check_model_output(mo_u, x, variance)
    if mo_u.dtype != mo_c.dtype or mo_u.device != mo_c.device:
        raise ValueError(f"model_output: the unconditional output ({mo_u.dtype}, {mo_u.device}) differs from the "
                         f"conditional one ({mo_c.dtype}, {mo_c.device})")
    if isinstance(cfg.scale, torch.Tensor) and cfg.scale.device != x.device:
        raise ValueError(f"guidance scale tensor is on {cfg.scale.device}, x on {x.device}; put it on x's device")
    return cfg, mo_c, mo_u


def _pair(mo_c, mo_u):
    return mo_c if mo_u is None else (mo_c, mo_u)


def _step(ref_fn, s, x_t, t, model_output, noise, *, ddim, eta, prediction, variance, clip, seed,
          sample_offset, return_x0, out, use_clipped_model_output=False, guidance=None):
    cfg, model_output, mo_u = _guided(guidance, model_output, x_t, variance)
    t, eta, clip = C.check_step_args(s, x_t, t, model_output, noise, ddim=ddim, eta=eta, prediction=prediction,
                                     variance=variance, clip=clip, seed=seed, sample_offset=sample_offset,
                                     use_clipped_model_output=use_clipped_model_output)
    _check_out(out, x_t, {"x_t": x_t, "model_output": model_output, "noise": noise, "uncond_output": mo_u})
    if x_t.shape[0] == 0:
        return _empty_result(x_t, return_x0, out)
    if not _use_kernels(x_t):
        kw = dict(eta=eta, use_clipped_model_output=use_clipped_model_output) if ddim else dict(variance=variance)
        res = ref_fn(s, x_t, t, _pair(model_output, mo_u), noise, prediction=prediction, clip=clip, seed=seed,
                     sample_offset=sample_offset, return_x0=return_x0, guidance=cfg, **kw)
        if out is not None:
            out.copy_(res[0] if return_x0 else res)
            res = (out, res[1]) if return_x0 else out
        return res
    _, step_mod = _load_kernels()
    return step_mod.step_forward(s, x_t, t, model_output, noise, ddim=ddim, eta=eta, prediction=prediction,
                                 variance=variance, clip=clip, seed=seed, sample_offset=sample_offset,
                                 return_x0=return_x0, out=out, use_clipped_model_output=use_clipped_model_output,
                                 guidance=cfg, uncond_output=mo_u)


def ddpm_step(s, x_t: torch.Tensor, t, model_output: torch.Tensor, noise: torch.Tensor | None = None, *,
              prediction: str = "eps", variance: str = "fixed_small", clip: float | None = 1.0,
              seed: int | None = None, sample_offset: int = 0, return_x0: bool = False,
              out: torch.Tensor | None = None, guidance=None):
    """Fused `fastddpm.diffusion.ddpm_step`: one launch for x0, clipping, posterior mean and noise.
    With guidance (w, or a fastddpm.guidance.CFG) the launch reads both halves of the doubled
    model output and applies the combine itself (one more small launch for the per-sample
    reduction of guidance rescale / parallel)."""
    return _step(diffusion.ddpm_step, s, x_t, t, model_output, noise, ddim=False, eta=0.0, prediction=prediction,
                 variance=variance, clip=clip, seed=seed, sample_offset=sample_offset, return_x0=return_x0,
                 out=out, guidance=guidance)


def ddim_step(s, x_t: torch.Tensor, t, model_output: torch.Tensor, noise: torch.Tensor | None = None, *,
              eta: float = 0.0, prediction: str = "eps", clip: float | None = 1.0, seed: int | None = None,
              sample_offset: int = 0, return_x0: bool = False, out: torch.Tensor | None = None,
              use_clipped_model_output: bool = False, guidance=None):
    """Fused `fastddpm.diffusion.ddim_step` (Song et al. 2021 eq. 12) in one launch; with
    use_clipped_model_output=True the direction term's eps is re-derived from the clipped x0.
    guidance: as in `ddpm_step`."""
    return _step(diffusion.ddim_step, s, x_t, t, model_output, noise, ddim=True, eta=eta, prediction=prediction,
                 variance="fixed_small", clip=clip, seed=seed, sample_offset=sample_offset, return_x0=return_x0,
                 out=out, use_clipped_model_output=use_clipped_model_output, guidance=guidance)


def dpm_solver_step(s, x_t: torch.Tensor, t, model_output: torch.Tensor, prev_x0: torch.Tensor | None = None,
                    noise: torch.Tensor | None = None, *, method: str = "dpmsolver++", order: int = 2,
                    solver_type: str = "midpoint", prediction: str = "eps", clip: float | None = None,
                    seed: int | None = None, sample_offset: int = 0, out: torch.Tensor | None = None,
                    x0_out: torch.Tensor | None = None, guidance=None):
    """Fused `fastddpm.diffusion.dpm_solver_step` (Lu et al. 2022): one launch reads x, the model
    output and prev_x0 and writes the new x and this step's x0; returns (x_{t-1}, x0).

    out / x0_out: float32 buffers shaped like x_t to write into; they may be x_t / prev_x0
    themselves (the loop's in-place update). guidance: as in `ddpm_step`."""
    cfg, model_output, mo_u = _guided(guidance, model_output, x_t)
    t, clip = dpm_solver.check_dpm_step_args(s, x_t, t, model_output, prev_x0, noise, method, order, solver_type,
                                             prediction, clip, seed, sample_offset)
    inputs = {"x_t": x_t, "model_output": model_output, "prev_x0": prev_x0, "noise": noise, "uncond_output": mo_u}
    _check_out(out, x_t, inputs, outputs={"x0_out": x0_out})
    _check_out(x0_out, x_t, inputs, "x0_out")
    if x_t.shape[0] == 0:
        x0 = x0_out if x0_out is not None else torch.empty_like(x_t, dtype=torch.float32)
        return _empty_result(x_t, out=out), x0
    kw = dict(method=method, order=order, solver_type=solver_type, prediction=prediction, clip=clip)
    if not _use_kernels(x_t):
        x, x0 = diffusion.dpm_solver_step(s, x_t, t, _pair(model_output, mo_u), prev_x0, noise, seed=seed,
                                           sample_offset=sample_offset, guidance=cfg, **kw)
        return (out.copy_(x) if out is not None else x), (x0_out.copy_(x0) if x0_out is not None else x0)
    from fastddpm.kernels import dpm as dpm_mod

    return dpm_mod.dpm_step_forward(s, x_t, t, model_output, prev_x0, noise, seed=seed, sample_offset=sample_offset,
                                    out=out, x0_out=x0_out, guidance=cfg, uncond_output=mo_u, **kw)


def sigma_step(plan, x: torch.Tensor, k, model_output: torch.Tensor, history=(), noise: torch.Tensor | None = None, *,
               seed: int | None = None, sample_offset: int = 0, out: torch.Tensor | None = None,
               history_out=None, guidance=None):
    """Fused `fastddpm.karras.sigma_step`: one launch reads x, the model output and the history the
    stage needs, and writes the next state and the new history; returns (x_next, history).

    out: a float32 buffer like x to write (may be x itself). history_out: float32 tensors like x
    to write the new history into (may be `history` itself: the loop's in-place update); without
    it the new history is returned in new tensors, as the reference does. guidance: as in `ddpm_step`."""
    from . import karras

    cfg, model_output, mo_u = _guided(guidance, model_output, x)
    k, history = karras.check_sigma_step_args(plan, x, k, model_output, history, noise, seed, sample_offset)
    inputs = {"x": x, "model_output": model_output, "noise": noise, "uncond_output": mo_u,
              **{f"history[{j}]": h for j, h in enumerate(history)}}
    if history_out is not None:
        history_out = tuple(history_out)
        if len(history_out) != len(history):
            raise ValueError(f"history_out must hold {len(history)} tensors like x; got {len(history_out)}")
    outs = {f"history_out[{j}]": h for j, h in enumerate(history_out or ())}
    _check_out(out, x, inputs, outputs=outs)
    for j, h in enumerate(history_out or ()):
        _check_out(h, x, inputs, f"history_out[{j}]", outputs={n: o for n, o in outs.items() if o is not h})
    if x.shape[0] == 0:  # what the reference returns for an empty batch
        return _empty_result(x, out=out), tuple(history_out or (torch.empty_like(h, dtype=torch.float32)
                                                                 for h in history))
    if not _use_kernels(x):
        x_next, hist = karras.sigma_step(plan, x, k, _pair(model_output, mo_u), history, noise, seed=seed,
                                         sample_offset=sample_offset, guidance=cfg)
        if out is not None:
            x_next = out.copy_(x_next)
        if history_out is not None:
            hist = tuple(o.copy_(h) for o, h in zip(history_out, hist))
        return x_next, hist
    from fastddpm.kernels import sigma_step as sigma_mod

    if history_out is None:
        work = tuple(h.float().clone() for h in history)
    else:
        work = history_out
        for o, h in zip(work, history):
            if o is not h:
                o.copy_(h)
    return sigma_mod.sigma_step_forward(plan, x, k, model_output, work, noise, seed=seed,
                                        sample_offset=sample_offset, out=out, guidance=cfg, uncond_output=mo_u)

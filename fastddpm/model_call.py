"""How `fastddpm.sample` calls the model: what it is called with and how.

The contract (DESIGN.md, "Public API contract"): `model(x, t[, x_self_cond])` with x
(B, C, H, W) and t a LongTensor (B,) of ORIGINAL training timesteps, returning a tensor, an
object with `.sample` (diffusers' UNet2DModel) or a tuple whose first item is the tensor.

- what: the sample shape (shape=, else the model's config: `sample_shape`, or
  `image_size` / `sample_size` with `in_channels`), the device (the parameters'), the
  model's dtype and whether autocast runs (dtype= on float32 weights), the memory layout
  the state starts in (channels_last weights -> channels_last x);
- how: `make_forward` casts x to the model's dtype (DESIGN.md, "Numerics": the sampler state
  and step math stay float32, only the model input is cast), runs autocast and no_grad and,
  with compile=True, a per-model torch.compile'd call (its own code object, so Dynamo's
  recompile limit counts per model; warned once when Dynamo runs it uncompiled).

The eager loops (`fastddpm.sampler`) and the captured loops (`fastddpm.graphs`) call the
model through the same `make_forward`.
"""
from __future__ import annotations

import collections
import threading
import types
import warnings
import weakref

import torch
from torch import nn

from . import _checks as C

__all__ = ["call_model", "make_forward", "input_layout"]


def call_model(model, x: torch.Tensor, timesteps: torch.Tensor, *cond, **kw) -> torch.Tensor:
    """model(x, t, *cond, **kw) -> tensor; accepts outputs with `.sample` (diffusers) or tuples.
    cond is (x_self_cond,) for a self-conditioned model, else empty; kw the conditioning keywords
    (class labels under the model's own name, sample()'s cond / uncond: fastddpm.guidance)."""
    out = model(x, timesteps, *cond, **kw)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model must return a tensor or an object with .sample; got {type(out).__name__}")


def _model_params(model):
    if isinstance(model, nn.Module):
        return next(model.parameters(), None)
    return None


def _infer_shape(model):
    cfg = getattr(model, "config", None)
    if getattr(cfg, "sample_shape", None) is not None:
        return tuple(cfg.sample_shape)
    size = getattr(cfg, "image_size", None) or getattr(cfg, "sample_size", None)
    chans = getattr(cfg, "in_channels", None)
    if isinstance(size, (tuple, list)):
        size = tuple(size)
    elif size is not None:
        size = (size, size)
    if chans is None or size is None:
        return None
    return (int(chans), *map(int, size))


def _resolve_shape(model, shape):
    configured = _infer_shape(model)
    if shape is None:
        if configured is None:
            raise ValueError("shape is required for this model: pass shape=(C, H, W)")
        return configured
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise ValueError(f"shape must be a tuple of positive ints (C, H, W), e.g. (3, 32, 32); got {shape!r}")
    shape = tuple(C.as_int(d) for d in shape)
    if len(shape) < 1 or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape):
        raise ValueError(f"shape must be a tuple of positive ints (C, H, W); got {shape!r}")
    if configured is not None and shape != configured:
        warnings.warn(f"shape={shape} differs from the model's configured sample shape {configured}: the model was "
                      "trained at that size, so samples at another size are not what it learned; leave shape= out "
                      "to use the configured one", UserWarning, stacklevel=3)
    return shape


def _resolve_device_dtype(model, device, dtype):
    p = _model_params(model)
    if device is None:
        device = p.device if p is not None else torch.device("cpu")
    device = C.check_device(device)
    if p is not None and (p.device.type != device.type or device.index not in (None, p.device.index)):
        raise ValueError(f"device={device} but the model's parameters are on {p.device}; move the model or "
                         f"pass device={p.device}")
    if device.index is None and device.type == "cuda":  # one name per device: "cuda" -> "cuda:<index>"
        device = p.device if p is not None else torch.device("cuda", torch.cuda.current_device())
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16, torch.bfloat16 or None; got {dtype}")
    param_dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    model_dtype = dtype or param_dtype
    autocast = dtype is not None and dtype != param_dtype and param_dtype == torch.float32
    return device, model_dtype, autocast


def _weak(model):
    """A callable returning `model`, holding it weakly when it can (caches must not keep it alive)."""
    try:
        return weakref.ref(model)
    except TypeError:
        return lambda: model


COMPILE_BACKEND = "inductor"  # compile=True's torch.compile backend (tests count compiles with a cheap one)
_compiled_calls: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_strong_compiled: "collections.OrderedDict" = collections.OrderedDict()  # id -> (model, call): not weakrefable
_compile_lock = threading.Lock()  # two threads sampling one model build one compiled call


def _compiled_call(model):
    """torch.compile (default mode: fused kernels, no CUDA graphs of its own) of the model call,
    built once per model, as a function with ITS OWN code object: Dynamo keeps its cache and its
    recompile limit (torch._dynamo.config.recompile_limit, 8) per code object, so one function
    shared by all models would spend one budget on all of them. Past the limit Dynamo runs the
    call uncompiled: the body then sees torch.compiler.is_compiling() false (Dynamo folds it to
    True in what it compiles) and warns, once per model. It reaches the model through a weak
    reference, so the cache does not keep the model alive."""
    with _compile_lock:
        return _compiled_calls_get(model) or _new_compiled_call(model)


def _compiled_calls_get(model):
    try:
        return _compiled_calls.get(model)
    except TypeError:
        return _strong_compiled.get(id(model), (None, None))[1]


def _new_compiled_call(model):
    ref, warned = _weak(model), []

    def model_call(x, t, *cond, **kw):
        if not torch.compiler.is_compiling():  # only reached when Dynamo did not compile this call
            _warn_uncompiled(ref(), warned)
        return call_model(ref(), x, t, *cond, **kw)

    name = f"fastddpm_model_call_{id(model):x}"
    code = model_call.__code__.replace(co_name=name)
    own = types.FunctionType(code, model_call.__globals__, name, None, model_call.__closure__)
    call = torch.compile(own, backend=COMPILE_BACKEND, dynamic=False)
    try:
        _compiled_calls[model] = call
    except TypeError:
        _strong_compiled[id(model)] = (model, call)
        while len(_strong_compiled) > 8:
            _strong_compiled.popitem(last=False)
    return call


def _warn_uncompiled(model, warned):
    if not warned:
        warned.append(True)
        cfg = torch._dynamo.config
        limit = getattr(cfg, "recompile_limit", getattr(cfg, "cache_size_limit", "?"))  # renamed in torch 2.7
        warnings.warn(f"fastddpm.sample(compile=True): torch.compile ran this {type(model).__name__}'s call "
                      "uncompiled (Dynamo's recompile limit, torch._dynamo.config.recompile_limit = "
                      f"{limit}, reached for this model, or Dynamo disabled); "
                      "set TORCH_LOGS=recompiles to see why it recompiled", RuntimeWarning, stacklevel=2)


def make_forward(model, model_dtype, autocast, compile=False, batch=None):
    """forward(x float32, t[, x_self_cond float32], **conditioning) -> model output: x (and x_self_cond) cast to
    the model's dtype, autocast when the weights are float32 and dtype= asked for half
    precision, no autograd.

    One autocast setting everywhere (its weight-cast cache off): the cache lives for one call
    only (the context is entered per call), must not outlive a CUDA-graph capture, and Dynamo
    guards on the flag, so a second setting would recompile a compiled model.
    compile=True: batches smaller than `batch` (a call's short last batch) are marked dynamic
    along dim 0, so every short batch of a model shares one compiled graph (Dynamo still
    specialises a batch of 1)."""
    ref = _weak(model)
    call = _compiled_call(model) if compile else (lambda x, t, *cond, **kw: call_model(ref(), x, t, *cond, **kw))

    def forward(x, t, *cond, **kw):
        xm = x.to(model_dtype)
        cm = tuple(c.to(model_dtype) for c in cond)
        if compile:
            t = t.contiguous()  # the eager loops' t is an expanded scalar: one stride for Dynamo's guards
            if batch is not None and x.shape[0] < batch:
                torch._dynamo.maybe_mark_dynamic(xm, 0)
                torch._dynamo.maybe_mark_dynamic(t, 0)
                for c in cm:
                    torch._dynamo.maybe_mark_dynamic(c, 0)
                for v in kw.values():
                    if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == x.shape[0]:
                        torch._dynamo.maybe_mark_dynamic(v, 0)
        with torch.autocast(x.device.type, dtype=model_dtype, enabled=autocast, cache_enabled=False), \
                torch.no_grad():
            return call(xm, t, *cm, **kw)

    return forward


def input_layout(model, shape) -> torch.memory_format:
    """The memory format the sampler state x starts in: channels_last when the model's conv
    weights are (model.to(memory_format=torch.channels_last)), so a compiled model sees one
    layout from its first call on; contiguous otherwise. After the first call x follows the
    output's layout (follow_layout)."""
    if len(shape) == 3 and isinstance(model, nn.Module):
        for p in model.parameters():
            if p.ndim == 4 and p.is_contiguous() != p.is_contiguous(memory_format=torch.channels_last):
                return torch.contiguous_format if p.is_contiguous() else torch.channels_last
    return torch.contiguous_format

"""`fastddpm.sample`: draw images from any noise-prediction model.

The loop (Ho et al. 2020 Algorithm 2; Song et al. 2021 for DDIM): x_{S-1} ~ N(0, I), then
for i = S-1 .. 0: out = model(x_i, timesteps[i]); x_{i-1} = step(x_i, i, out, z_i).

Noise comes from one of two sources, both deterministic:
- seed=<int> (default): the counter-based Philox stream of `fastddpm.rng`, keyed by
  (seed, global sample index, step), so sample k is the same image whatever the batch
  size or backend. x_T uses tag TAG_INIT; step i uses tag i.
- generator=<torch.Generator>: torch draws in diffusers' order (x_T, then one draw per
  step i > 0, in the model's dtype, on the generator's device), so a single batch
  (batch_size >= n) reproduces a diffusers DDPMPipeline / DDIMPipeline loop.

Backends: "reference" (plain PyTorch loop: defines the numbers), "fused" (the same loop with
one fused Triton kernel per step), "graph" (the fused loop replayed from captured CUDA
graphs, see fastddpm.graphs), "auto" (graph on CUDA, fused when capture fails or with
generator=, reference on the CPU).

No host synchronisation inside the loop: non-finite values are tracked in a device-side
flag holding the first bad step, read once per batch (once per call for graph batches).
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
from . import diffusion, dpm_solver, rng
from .layout import follow_layout
from .schedule import Schedule

__all__ = ["sample", "call_model", "resolve_backend", "make_forward"]


def call_model(model, x: torch.Tensor, timesteps: torch.Tensor, *cond) -> torch.Tensor:
    """model(x, t, *cond) -> tensor; accepts outputs with `.sample` (diffusers) or tuples.
    cond is (x_self_cond,) for a self-conditioned model, else empty."""
    out = model(x, timesteps, *cond)
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
    shape = tuple(shape)
    if len(shape) < 1 or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape):
        raise ValueError(f"shape must be a tuple of positive ints (C, H, W); got {shape!r}")
    if configured is not None and shape != configured:
        warnings.warn(f"shape={shape} differs from the model's configured sample shape {configured}: the model was "
                      "trained at that size, so samples at another size are not what it learned; leave shape= out "
                      "to use the configured one", UserWarning, stacklevel=3)
    return shape


def _resolve_schedule(model, schedule, steps, method="ddpm"):
    if schedule is None:
        schedule = getattr(model, "fastddpm_schedule", None) or Schedule.linear(1000)
    C.check_schedule(schedule)
    if steps is not None:
        if method in C.DPM_METHODS:  # DPMSolverMultistepScheduler's default "linspace" respacing
            schedule = schedule.select(dpm_solver.dpm_indices(schedule.num_steps, steps, "linspace"))
        else:
            schedule = schedule.respace(steps)
    return schedule


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


def _check_consistent(model, s, method, prediction, variance, clip, dpm=None):
    """Refuse arguments that contradict what the model was trained with or what the diffusers
    scheduler the schedule came from is configured to do: never a silent difference."""
    trained = getattr(model, "fastddpm_prediction", None)
    if trained is not None and trained != prediction:
        raise ValueError(f"prediction={prediction!r} but this model was trained to predict {trained!r}; "
                         f"pass prediction={trained!r}")
    src = s.source_options
    if not src:
        return
    given = {"prediction": prediction, "clip": clip, "variance": variance, **(dpm or {})}
    keys = ("prediction", "clip") + (("variance",) if method == "ddpm" and "variance" in src else ())
    keys += tuple(k for k in (dpm or {}) if k in src)
    for key in keys:
        if given[key] != src[key]:
            raise ValueError(f"{key}={given[key]!r} contradicts the diffusers scheduler this schedule came from "
                             f"({key} {src[key]!r} in fastddpm's terms); pass {key}={src[key]!r}, or pass "
                             "**fastddpm.compat.sample_kwargs(scheduler)")


def default_use_clipped_model_output(s, method, clip) -> bool:
    """What use_clipped_model_output=None means: the source's own semantics for a schedule from
    a peer's configuration (diffusers' pipelines keep the raw eps), else eps re-derived from the
    clipped x0 for DDIM with clipping (issue 18: with the raw eps, DDIM at 250+ steps on data at
    the clip bounds drifts off the training marginal; README, "DDIM and clipping")."""
    if s.source_options is not None:
        return bool(s.source_options.get("use_clipped_model_output", False))
    return method == "ddim" and clip is not None


def resolve_backend(backend, device, generator=None):
    """The backend that runs: "auto" -> the graph-captured loop where CUDA graphs work
    (seed= noise; generator= noise, drawn by torch on the host's order, runs the fused eager
    loop), the fused loop on CUDA otherwise, the reference loop elsewhere. Raises ValueError
    for an explicit backend that cannot run here."""
    C.one_of(backend, C.BACKENDS, "backend")
    from . import graphs, ops

    if backend == "graph":
        ok, why = graphs.supported(device)
        if not ok:
            raise ValueError(f"backend='graph' is not available here: {why}; use backend='fused' or 'reference'")
        if generator is not None:
            raise ValueError("backend='graph' draws its noise inside the kernels (seed=); generator= noise needs "
                             "backend='fused' or 'reference'")
        return "graph"
    if backend == "auto":
        if generator is None and graphs.supported(device)[0]:
            return "graph"
        return "fused" if device.type == "cuda" and ops.kernels_available()[0] else "reference"
    return backend


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

    def model_call(x, t, *cond):
        if not torch.compiler.is_compiling():  # only reached when Dynamo did not compile this call
            _warn_uncompiled(ref(), warned)
        return call_model(ref(), x, t, *cond)

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
    """forward(x float32, t[, x_self_cond float32]) -> model output: x (and x_self_cond) cast to
    the model's dtype, autocast when the weights are float32 and dtype= asked for half
    precision, no autograd.

    One autocast setting everywhere (its weight-cast cache off): the cache lives for one call
    only (the context is entered per call), must not outlive a CUDA-graph capture, and Dynamo
    guards on the flag, so a second setting would recompile a compiled model.
    compile=True: batches smaller than `batch` (a call's short last batch) are marked dynamic
    along dim 0, so every short batch of a model shares one compiled graph (Dynamo still
    specialises a batch of 1)."""
    ref = _weak(model)
    call = _compiled_call(model) if compile else (lambda x, t, *cond: call_model(ref(), x, t, *cond))

    def forward(x, t, *cond):
        xm = x.to(model_dtype)
        cm = tuple(c.to(model_dtype) for c in cond)
        if compile:
            t = t.contiguous()  # the eager loops' t is an expanded scalar: one stride for Dynamo's guards
            if batch is not None and x.shape[0] < batch:
                torch._dynamo.maybe_mark_dynamic(xm, 0)
                torch._dynamo.maybe_mark_dynamic(t, 0)
                for c in cm:
                    torch._dynamo.maybe_mark_dynamic(c, 0)
        with torch.autocast(x.device.type, dtype=model_dtype, enabled=autocast, cache_enabled=False), \
                torch.no_grad():
            return call(xm, t, *cm)

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


def sample(model, n: int, *, shape=None, schedule: Schedule | None = None, steps: int | None = None,
           method: str = "ddpm", eta: float = 0.0, prediction: str = "eps", variance: str = "fixed_small",
           clip: float | None | str = "auto", seed: int | None = None, generator: torch.Generator | None = None,
           batch_size: int | None = None, device=None, dtype=None, backend: str = "auto",
           progress: bool = False, sample_offset: int = 0, compile: bool = False,
           use_clipped_model_output: bool | None = None, self_condition: bool = False, order: int | None = None,
           solver_type: str = "midpoint") -> torch.Tensor:
    """Sample n images from `model`; returns (n, C, H, W) float32 in model space (about [-1, 1]).

    model: callable model(x (B, C, H, W), t LongTensor (B,) of ORIGINAL training timesteps)
        returning a tensor (or an object with .sample, e.g. a diffusers UNet2DModel).
    shape: (C, H, W); inferred from model.config (in_channels, image_size / sample_size) if omitted.
    schedule: the training schedule (default: model.fastddpm_schedule or linear(1000));
        steps=k respaces it to k steps ("leading").
    method: "ddpm" (ancestral; `variance` applies), "ddim" (`eta` applies), "dpmsolver++" or
        "sde-dpmsolver++" (Lu et al. 2022, multistep, see fastddpm.dpm_solver; `order` 1 or 2,
        default 2, and `solver_type` "midpoint" or "heun" apply; steps=k respaces as diffusers'
        DPMSolverMultistepScheduler does by default, "linspace").
    clip: clamp predicted x0 to [-clip, clip], None for no clipping; "auto" (default): 1.0 for
        ddpm / ddim, None for the DPM-Solver methods (diffusers' defaults).
    steps: respace the schedule to this many steps (a positive int); None (default) runs all of
        the schedule's steps. (The CLI's `--steps all` is the same.)
    eta: DDIM only (0 = deterministic); a nonzero eta with another method is an error.
    seed / generator: noise source (see module docstring): seed=<int> for the counter-based
        stream, or generator=<torch.Generator> for torch draws; not both. Neither: seed 0's stream.
    shape: a shape other than the model's configured one (model.config) is sampled, with a
        warning: the model was trained at its configured size.
    use_clipped_model_output: DDIM only: the direction term uses eps re-derived from the
        clipped x0 (improved-diffusion's and denoising-diffusion-pytorch's DDIM; diffusers'
        option of that name) instead of the raw model eps. DDPM's step reads only the clipped
        x0, so with method="ddpm" it would change nothing: True there is an error. None
        (default): fastddpm's choice, True for DDIM with clipping (with the raw eps, many small
        steps drift off the data: README, "DDIM and clipping"), except on a schedule from a
        peer's configuration (Schedule.from_diffusers, compat.sample_kwargs), which keeps the
        peer's semantics (diffusers' pipelines: the raw eps).
    self_condition: call model(x, t, x_self_cond) with the previous step's predicted x0
        (clipped when clip is set; zeros at the first step), as denoising-diffusion-pytorch
        does for a Unet(self_condition=True). A model whose `self_condition` attribute says
        otherwise, or whose signature does not fit, is refused.
    batch_size: images per model call (default min(n, 256)).
    dtype: precision of the model call (autocast when the model's weights are float32, which
        re-casts the weights every step: a model cast to bf16 itself is faster);
        the sampler state and step math stay float32. An nn.Module runs in eval mode (no
        dropout) during the call and gets its train/eval mode back afterwards.
    backend: "reference" (plain PyTorch loop), "fused" (Triton step kernels, eager loop),
        "graph" (the fused loop replayed from captured CUDA graphs; seed= noise only; see
        fastddpm.graphs), "auto" (graph on CUDA, falling back to fused with one warning if the
        model cannot be captured; fused with generator=; reference on the CPU).
    compile: run the model through torch.compile (default mode: its fused kernels, no CUDA
        graphs of its own) inside our loop, graphed or not. Compiled once per model.
    device: where to sample (default: the model's parameters' device, else the CPU); a CUDA
        device on a machine without CUDA is a ValueError.
    progress: True shows a tqdm bar over every step of the call; or pass your own bar (an
        object with .update(k), e.g. tqdm) to count the steps of several calls on one bar.
    sample_offset: seed mode only: return samples sample_offset .. sample_offset + n - 1 of
        the seed's stream (sample i is the same image in any call), e.g. a shard of a
        distributed run (see fastddpm.distributed).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t); got {type(model).__name__}")
    C.one_of(method, C.METHODS, "method")
    C.one_of(prediction, C.PREDICTIONS, "prediction")
    C.one_of(variance, C.VARIANCES, "variance")
    eta = C.check_eta(eta)
    if eta != 0 and method != "ddim":
        raise ValueError(f"eta={eta} applies to method='ddim' only; got method={method!r} (its noise is set by "
                         "variance=); pass eta=0 or method='ddim'")
    if isinstance(clip, str) and clip == "auto":
        clip = None if method in C.DPM_METHODS else 1.0
    clip = C.check_clip(clip)
    dpm = _check_dpm_args(method, order, solver_type, eta, variance)
    if method == "ddim" and variance == "learned_range":
        raise ValueError("variance='learned_range' applies to method='ddpm' only; DDIM's variance is set by eta")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"steps must be a positive int (the number of sampling steps) or None (all of the "
                         f"schedule's steps); got {steps!r}")
    if use_clipped_model_output is not None:
        C.check_bool(use_clipped_model_output, "use_clipped_model_output")
    if use_clipped_model_output and method != "ddim":
        raise ValueError(f"use_clipped_model_output=True applies to method='ddim' only; got method={method!r}, "
                         "whose step reads only the clipped x0, so it would change nothing; pass "
                         "use_clipped_model_output=False or method='ddim'")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
    if generator is not None and seed is not None:
        raise ValueError(f"pass seed= or generator=, not both (got seed={seed!r} and a generator): seed= selects the "
                         "counter-based noise stream, generator= torch draws")
    C.check_sample_offset(sample_offset)
    if generator is None:
        seed = 0 if seed is None else seed  # DESIGN.md: no seed and no generator = seed 0's stream
        rng.check_seed(seed)
        if sample_offset + n > 2**32:
            raise ValueError(f"sample_offset + n must not exceed 2**32; got {sample_offset} + {n}")
    elif sample_offset:
        raise ValueError("sample_offset applies to seed= noise only: generator= draws depend on the batch order")
    if not isinstance(progress, bool) and not callable(getattr(progress, "update", None)):
        raise TypeError(f"progress must be True, False or a progress bar (an object with .update(k)); "
                        f"got {type(progress).__name__}")
    if batch_size is None:
        batch_size = min(n, 256)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    C.check_self_condition(model, self_condition)
    shape = _resolve_shape(model, shape)
    s = _resolve_schedule(model, schedule, steps, method)
    _check_consistent(model, s, method, prediction, variance, clip, dpm)
    if use_clipped_model_output is None:
        use_clipped_model_output = default_use_clipped_model_output(s, method, clip)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False; got {compile!r}")
    device, model_dtype, autocast = _resolve_device_dtype(model, device, dtype)
    requested = backend
    backend = resolve_backend(backend, device, generator)

    out = torch.empty((n, *shape), dtype=torch.float32, device=device)
    starts = range(0, n, batch_size)
    bar = progress if not isinstance(progress, bool) else None  # a caller's bar: one bar over many calls
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts) * s.num_steps, desc=f"sampling ({backend})", unit="step")
    opts = dict(method=method, eta=eta, prediction=prediction, variance=variance, clip=clip,
                use_clipped_model_output=use_clipped_model_output, self_condition=self_condition, **(dpm or {}))
    flags = None  # graph batches: first bad step of each batch, read once at the end
    full = min(batch_size, n)  # every batch but a short last one
    layout = input_layout(model, shape)
    forward = make_forward(model, model_dtype, autocast, compile, full)  # the eager loops' model call
    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()  # no dropout while sampling; the caller's mode is restored below
    try:
        for j, start in enumerate(starts):
            B = min(batch_size, n - start)
            if backend == "graph":
                loop = _graph_loop(model, s, (B, *shape), device, model_dtype, autocast, opts, compile, full,
                                   layout, explicit=requested == "graph")
                if loop is not None:
                    if flags is None:
                        flags = torch.full((len(starts),), -1, dtype=torch.long, device=device)
                    loop.run(seed, sample_offset + start, out[start:start + B], flags[j], bar)
                    continue
                backend = "fused"
            out[start:start + B] = _sample_batch(forward, s, (B, *shape), sample_offset + start, seed, generator,
                                                 device, model_dtype, opts, bar, backend, layout)
    finally:
        if was_training:
            model.train()
        if progress is True:
            bar.close()
    if flags is not None:
        bad = flags.tolist()  # one host sync for the whole call
        for j, step in enumerate(bad):
            if step >= 0:
                _raise_if_bad(step, s, sample_offset + starts[j])
    return out


def _check_dpm_args(method, order, solver_type, eta, variance):
    """{"order", "solver_type"} of a DPM-Solver method (order defaults to 2), else None; options
    that do not apply to the method are refused rather than ignored."""
    if method not in C.DPM_METHODS:
        if order is not None:
            raise ValueError(f"order applies to method='dpmsolver++' / 'sde-dpmsolver++' only; got order={order!r} "
                             f"with method={method!r}")
        if solver_type != "midpoint":
            raise ValueError(f"solver_type applies to the DPM-Solver methods only; got solver_type={solver_type!r} "
                             f"with method={method!r}")
        return None
    order = 2 if order is None else order
    dpm_solver.check_dpm_options(method, order, solver_type)
    if eta != 0:
        raise ValueError(f"eta applies to method='ddim' only; got eta={eta} with method={method!r} "
                         "(its stochastic variant is method='sde-dpmsolver++')")
    if variance != "fixed_small":
        raise ValueError(f"variance applies to method='ddpm' only; got variance={variance!r} with method={method!r}")
    return {"order": order, "solver_type": solver_type}


def _graph_loop(model, s, shape, device, model_dtype, autocast, opts, compile, full, layout, explicit):
    """The cached captured loop, or None after a capture failure under backend='auto' (warned once)."""
    from . import graphs

    forward = make_forward(model, model_dtype, autocast, compile, full)
    try:
        return graphs.loop_for(model, forward, s, shape, device, opts, (model_dtype, autocast, compile, layout),
                               lambda mo, x: _check_output(mo, x, opts["variance"]), layout)
    except graphs.CaptureError as e:
        if explicit:
            raise RuntimeError(f"backend='graph': the model could not be captured in a CUDA graph ({e}); "
                               "use backend='fused' (the same loop without graphs)") from e
        graphs.warn_fallback(e)
        return None


def _initial_noise(shape, start, seed, generator, device, model_dtype):
    if generator is not None:
        return _generator_normal(shape, generator, device, model_dtype)
    return rng.normal_like(torch.empty(shape, device=device), seed, start, rng.TAG_INIT)


def _generator_normal(shape, generator, device, dtype):
    # diffusers' randn_tensor: draw on the generator's device in the model's dtype, then move.
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    return z.to(device=device, dtype=torch.float32)


def _check_output(mo, x, variance):
    try:
        C.check_model_output(mo, x, variance)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model output does not fit the sampler: {e}") from None


def _step_fn(backend, method):
    """The step function of a backend; the fused one updates the state in place (out=x, and
    for DPM-Solver the previous x0 buffer: x0_out=prev_x0)."""
    if backend == "reference":
        return {"ddpm": diffusion.ddpm_step, "ddim": diffusion.ddim_step}.get(method, diffusion.dpm_solver_step)
    from . import ops

    if method in C.DPM_METHODS:
        return lambda s, x, t, mo, prev, *args, **kw: ops.dpm_solver_step(s, x, t, mo, prev, *args, out=x,
                                                                          x0_out=prev, **kw)
    fn = ops.ddpm_step if method == "ddpm" else ops.ddim_step
    return lambda s, x, *args, **kw: fn(s, x, *args, out=x, **kw)


def _sample_batch(forward, s, shape, start, seed, generator, device, model_dtype, opts, bar, backend,
                  layout=torch.contiguous_format):
    B = shape[0]
    method, variance = opts["method"], opts["variance"]
    step = _step_fn(backend, method)
    x = _initial_noise(shape, start, seed, generator, device, model_dtype)  # (B, C, H, W) float32
    x = x.contiguous(memory_format=layout)
    # self-conditioning: the previous step's clipped x0, zeros before the first step
    cond = (torch.zeros_like(x),) if opts["self_condition"] else ()
    timesteps = s.timesteps_on(device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    dpm = method in C.DPM_METHODS
    draws = method in ("ddpm", "sde-dpmsolver++") or opts["eta"] > 0
    prev_x0 = torch.zeros_like(x) if dpm else None  # DPM-Solver's previous x0 (read by second-order steps)
    for i in reversed(range(s.num_steps)):
        t_model = timesteps[i].expand(B)
        first = i == s.num_steps - 1
        try:
            mo = forward(x, t_model, *cond)
        except Exception as e:
            if first and hasattr(e, "add_note"):
                e.add_note(f"fastddpm.sample: the model failed on its first call with x of shape {tuple(x.shape)} "
                           f"({model_dtype}, {device}); check shape=, dtype= and device=")
            raise
        if first:
            _check_output(mo, x, variance)
            if backend == "fused":
                x = follow_layout(x, mo)
                cond = tuple(follow_layout(c, mo) for c in cond)
                prev_x0 = follow_layout(prev_x0, mo) if dpm else None
        noise, kw = None, {}
        if generator is not None:
            # diffusers: DDPM draws in the model's dtype at steps > 0; SDE-DPM-Solver++ draws float32 at every step
            if draws and (i > 0 or dpm):
                noise = _generator_normal(shape, generator, device, torch.float32 if dpm else mo.dtype)
        else:
            kw = dict(seed=seed, sample_offset=start)
        if method == "ddpm":
            kw["variance"] = variance
        elif method == "ddim":
            kw["eta"] = opts["eta"]
            kw["use_clipped_model_output"] = opts["use_clipped_model_output"]
        else:
            kw.update(method=method, order=opts["order"], solver_type=opts["solver_type"])
        with torch.no_grad():
            if dpm:
                x, prev_x0 = step(s, x, i, mo, prev_x0, noise, prediction=opts["prediction"], clip=opts["clip"],
                                  **kw)
                x0 = prev_x0
            else:
                x = step(s, x, i, mo, noise, prediction=opts["prediction"], clip=opts["clip"], return_x0=bool(cond),
                         **kw)
                if cond:
                    x, x0 = x
        if cond:
            cond = (x0,)
        bad = ~torch.isfinite(x).all()
        first_bad = torch.where((first_bad < 0) & bad, torch.full_like(first_bad, i), first_bad)
        if bar is not None:
            bar.update(1)
    _raise_if_bad(int(first_bad), s, start)  # one host sync per batch
    return x


def _raise_if_bad(i, s, start):
    if i >= 0:
        raise FloatingPointError(
            f"non-finite values appeared in the sampler state at step {i} (timestep {int(s.timesteps[i])}) "
            f"in the batch starting at sample {start}: check the model's output and dtype")


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

No host synchronisation inside the loop: non-finite values, in the model's output (which
clipping would otherwise hide) or in the state, are tracked in a device-side flag holding the
first bad step, read once per batch (once per call for graph batches).

How the model is called (its shape, device, dtype and layout; casts, autocast, compile=True):
fastddpm.model_call.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _checks as C
from . import diffusion, dpm_solver, guidance, karras, methods, rng
from . import sigmas as sigmas_mod
from .layout import follow_layout
from .model_call import _resolve_device_dtype, _resolve_shape, call_model, input_layout, make_forward
from .schedule import Schedule

__all__ = ["sample", "model_evaluations", "call_model", "resolve_backend", "make_forward"]


def _resolve_schedule(model, schedule, steps, method="ddpm"):
    if schedule is None:
        schedule = getattr(model, "fastddpm_schedule", None) or Schedule.linear(1000)
    C.check_schedule(schedule, "schedule")
    if methods.get(method).family == "sigma":  # the noise levels come from sigmas=; the model's timesteps from s
        if not torch.equal(schedule.timesteps, torch.arange(schedule.num_train_timesteps)):
            raise ValueError(f"method={method!r} runs on continuous noise levels and needs the model's TRAINING "
                             f"schedule (all {schedule.num_train_timesteps} timesteps), not a respaced one "
                             f"({schedule.num_steps} steps); pass the training schedule and steps= or sigmas=")
        return schedule
    if steps is not None:
        if method in C.DPM_METHODS:  # DPMSolverMultistepScheduler's default "linspace" respacing
            schedule = schedule.select(dpm_solver.dpm_indices(schedule.num_steps, steps, "linspace"))
        else:
            schedule = schedule.respace(steps)
    return schedule


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


def sample(model, n: int, *, shape=None, schedule: Schedule | None = None, steps: int | None = None,
           method: str = "ddpm", eta: float | None = None, prediction: str = "eps", variance: str = "fixed_small",
           clip: float | None | str = "auto", seed: int | None = None, generator: torch.Generator | None = None,
           batch_size: int | None = None, device=None, dtype=None, backend: str = "auto",
           progress: bool = False, sample_offset: int = 0, compile: bool = False, order: int | None = None,
           solver_type: str = "midpoint", use_clipped_model_output: bool | None = None, self_condition: bool = False,
           sigmas=None, sigma_min: float | None = None, sigma_max: float | None = None, rho: float | None = None,
           quantize: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
           s_noise: float = 1.0, r: float = 0.5, class_labels=None, cond: dict | None = None,
           uncond: dict | None = None, null_class: int | None = None, guidance_scale: float = 1.0,
           guidance_interval=None, guidance_rescale: float = 0.0, guidance_parallel: float = 1.0) -> torch.Tensor:
    """Sample n images from `model`; returns (n, C, H, W) float32 in model space (about [-1, 1]).

    model: callable model(x (B, C, H, W), t (B,)) returning a tensor (or an object with .sample,
        e.g. a diffusers UNet2DModel); t holds ORIGINAL training timesteps: a LongTensor for the
        timestep methods, a float tensor interpolated from log sigma for the sigma methods
        (integers with quantize=True).
    method: a name of the table fastddpm.methods.METHODS, which also lists the options each one
        takes and their defaults; an option a method does not take is an error.
        On the training timesteps: "ddpm" (ancestral; `variance`), "ddim" (`eta` in [0, 1],
        `use_clipped_model_output`), "dpmsolver++" / "sde-dpmsolver++" (Lu et al. 2022,
        fastddpm.dpm_solver; `order` 1 or 2, `solver_type`; steps=k respaces as diffusers'
        DPMSolverMultistepScheduler does, "linspace"); `self_condition` for all four.
        On continuous noise levels (k-diffusion's samplers, fastddpm.karras): "euler", "heun",
        "dpm_2" (`s_churn`, `s_tmin`, `s_tmax`, `s_noise`), "euler_ancestral", "dpm_2_ancestral",
        "dpmpp_2s_ancestral", "dpmpp_sde" (`r`), "dpmpp_2m_sde" (`solver_type`), "dpmpp_3m_sde"
        (`eta`, default 1, and `s_noise`), "lms" (`order`, default 4), "dpmpp_2m"; all take
        `sigmas` ("karras" (default), "exponential", "polyexponential", "vp", "discrete", or a 1-D
        tensor of decreasing noise levels, a final 0 appended if it has none), `sigma_min` /
        `sigma_max` (default: the training schedule's), `rho` (karras 7, polyexponential 1) and
        `quantize` (round the model's timestep to the nearest training one).
    shape: (C, H, W); inferred from model.config (in_channels, image_size / sample_size) if omitted;
        another shape than the configured one is sampled with a warning.
    schedule: the training schedule (default: model.fastddpm_schedule or linear(1000)).
    steps: the number of sampling steps (a positive int): the timestep methods respace the
        schedule to it ("leading"; "linspace" for DPM-Solver++), the sigma methods take that many
        noise levels; None (default) runs all of the schedule's steps (`--steps all` in the CLI).
    clip: clamp predicted x0 (the sigma methods: the denoised D) to [-clip, clip], None for no
        clipping; "auto" (default): 1.0 for ddpm / ddim, None for the others (diffusers' and
        k-diffusion's defaults).
    seed / generator: noise source (see module docstring): seed=<int> for the counter-based
        stream, or generator=<torch.Generator> for torch draws; not both. Neither: seed 0's stream.
    use_clipped_model_output: DDIM's direction term uses eps re-derived from the clipped x0
        (improved-diffusion, denoising-diffusion-pytorch, diffusers' option of that name); None
        (default): True with clipping (README, "DDIM and clipping"), except on a schedule from a
        peer's configuration, which keeps the peer's semantics (diffusers' pipelines: False).
    self_condition: call model(x, t, x_self_cond) with the previous step's predicted x0 (clipped
        when clip is set; zeros at the first step), as denoising-diffusion-pytorch does.
    batch_size: images per model call (default min(n, 256)).
    dtype: precision of the model call (autocast when the model's weights are float32, which
        re-casts the weights every step: a model cast to bf16 itself is faster); the sampler
        state and step math stay float32. An nn.Module runs in eval mode during the call.
    backend: "reference" (plain PyTorch loop), "fused" (Triton step kernels, eager loop), "graph"
        (the fused loop replayed from captured CUDA graphs; seed= noise only; fastddpm.graphs),
        "auto" (graph on CUDA, falling back to fused with one warning if the model cannot be
        captured; fused with generator=; reference on the CPU).
    compile: run the model through torch.compile (default mode) inside our loop, graphed or not.
    device: where to sample (default: the model's parameters' device, else the CPU).
    progress: True shows a tqdm bar over every model evaluation of the call; or pass your own bar
        (an object with .update(k)) to count the steps of several calls on one bar.
    sample_offset: seed mode only: return samples sample_offset .. sample_offset + n - 1 of the
        seed's stream (sample i is the same image in any call; see fastddpm.distributed).
    class_labels: an int, a sequence or a LongTensor of n labels, passed under the model's own
        keyword (y for fastddpm's UNet(num_classes=K), class_labels for diffusers' UNet2DModel,
        classes for denoising-diffusion-pytorch's CFG Unet). cond / uncond: keyword arguments of
        every model call / of the unconditional call (model(x, t, **{**cond, **uncond})); a tensor
        whose first dimension is n is per sample (image i gets row i). null_class: the label of
        the unconditional call (default: the model's own, K for UNet(num_classes=K)).
    guidance_scale: classifier-free guidance w, out_u + w (out_c - out_u) on the model output,
        one doubled-batch call per step (conditional rows first); 1 (default) makes only the
        conditional call, 0 only the unconditional one. guidance_interval=(lo, hi): guidance only
        at steps whose noise level sqrt((1 - abar) / abar) is in (lo, hi], one conditional call
        elsewhere (Kynkaanniemi et al. 2024). guidance_rescale: phi of Lin et al. 2024 (diffusers'
        guidance_rescale). guidance_parallel: the fraction kept of the guidance direction's part
        parallel to the conditional output (1: all, diffusers; 0: removed, denoising-diffusion-
        pytorch's default). fastddpm.guidance has the formulas.
    """
    n, steps, batch_size, seed, sample_offset = map(C.as_int, (n, steps, batch_size, seed, sample_offset))
    m = methods.get(method)
    mopts = methods.resolve(method, eta=eta, variance=variance, order=order, solver_type=solver_type,
                            use_clipped_model_output=use_clipped_model_output, self_condition=self_condition,
                            sigmas=sigmas, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, quantize=quantize,
                            s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, r=r)
    seed, batch_size = _check_call(model, n, prediction, steps, seed, generator, sample_offset, progress, batch_size,
                                   compile)
    clip = C.check_clip(m.clip if isinstance(clip, str) and clip == "auto" else clip)
    conditioning = guidance.resolve(model, n, class_labels=class_labels, cond=cond, uncond=uncond,
                                    null_class=null_class, guidance_scale=guidance_scale,
                                    guidance_interval=guidance_interval, guidance_rescale=guidance_rescale,
                                    guidance_parallel=guidance_parallel,
                                    self_condition=mopts.get("self_condition", False))
    # the conditioning's keywords may fill a third parameter (denoising-diffusion-pytorch's CFG Unet's classes)
    C.check_self_condition(model, mopts.get("self_condition", False),
                           keywords=set(conditioning.cond) | set(conditioning.uncond) if conditioning else ())
    shape = _resolve_shape(model, shape)
    C.check_schedule_fits_model(model, schedule)
    s = _resolve_schedule(model, schedule, steps, m.name)
    opts = _loop_options(model, m, mopts, s, steps, prediction, clip)
    device, model_dtype, autocast = _resolve_device_dtype(model, device, dtype)
    requested = backend
    backend = resolve_backend(backend, device, generator)

    out = torch.empty((n, *shape), dtype=torch.float32, device=device)
    starts = range(0, n, batch_size)
    plan = opts.get("plan")
    evals = plan.nfe if plan is not None else s.num_steps
    modes = _guidance_modes(conditioning, s, plan)
    bar = progress if not isinstance(progress, bool) else None  # a caller's bar: one bar over many calls
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts) * evals, desc=f"sampling ({backend})", unit="step")
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
            guide = (conditioning, modes, conditioning.batch(start, B, device)) if conditioning else None
            if backend == "graph":
                loop = _graph_loop(model, s, (B, *shape), device, model_dtype, autocast, opts, compile, full,
                                   layout, explicit=requested == "graph",
                                   guide=(conditioning, modes) if conditioning else None)
                if loop is not None:
                    if flags is None:
                        flags = torch.full((len(starts),), -1, dtype=torch.long, device=device)
                    loop.run(seed, sample_offset + start, out[start:start + B], flags[j], bar,
                             conditions=guide[2] if guide else None, scale=float(guidance_scale))
                    continue
                backend = "fused"
            batch = _sample_sigma_batch if plan is not None else _sample_batch
            out[start:start + B] = batch(forward, s, (B, *shape), sample_offset + start, seed, generator, device,
                                         model_dtype, opts, bar, backend, layout, guide)
    finally:
        if was_training:
            model.train()
        if progress is True:
            bar.close()
    if flags is not None:
        bad = flags.tolist()  # one host sync for the whole call
        for j, flag in enumerate(bad):
            if flag >= 0:
                _raise_if_bad(flag, s, sample_offset + starts[j], plan)
    return out


def model_evaluations(model, *, schedule=None, steps=None, method="ddpm", prediction="eps", **options) -> int:
    """How many times `sample` calls the model per batch for these arguments (the steps of a
    timestep method; k-diffusion's NFE of a sigma method: heun at k steps makes 2k - 1 calls).
    Takes sample()'s keyword arguments; those that do not change the count are ignored."""
    m = methods.get(method)
    s = _resolve_schedule(model, schedule, steps, m.name)
    if m.family == "timestep":
        return s.num_steps
    mopts = methods.resolve(method, **{k: v for k, v in options.items() if k in methods.OPTIONS})
    return karras.build_plan(m.name, _sigma_levels(mopts, s, steps), s, prediction, mopts).nfe


def _check_call(model, n, prediction, steps, seed, generator, sample_offset, progress, batch_size, compile):
    """The arguments of sample() that every method shares; returns (seed, batch_size) resolved."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t); got {type(model).__name__}")
    C.one_of(prediction, C.PREDICTIONS, "prediction")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"steps must be a positive int (the number of sampling steps) or None (all of the "
                         f"schedule's steps); got {steps!r}")
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
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False; got {compile!r}")
    return seed, batch_size


def _loop_options(model, m, mopts, s, steps, prediction, clip) -> dict:
    """What the loops read: for the timestep methods their options; for the sigma methods the
    SigmaPlan (fastddpm.karras) under "plan". Refuses what contradicts the model or the peer
    configuration the schedule came from."""
    if m.family == "sigma":
        _check_consistent(model, s, m.name, prediction, "fixed_small", clip)
        sig = _sigma_levels(mopts, s, steps)
        plan = karras.build_plan(m.name, sig, s, prediction, mopts, clip=clip, quantize=mopts["quantize"])
        return dict(method=m.name, prediction=prediction, clip=clip, self_condition=False, plan=plan)
    dpm = {"order": mopts["order"], "solver_type": mopts["solver_type"]} if m.name in C.DPM_METHODS else None
    variance = mopts.get("variance", "fixed_small")
    _check_consistent(model, s, m.name, prediction, variance, clip, dpm)
    ucmo = mopts.get("use_clipped_model_output")
    if ucmo is None:
        ucmo = m.name == "ddim" and default_use_clipped_model_output(s, m.name, clip)
    return dict(method=m.name, eta=mopts.get("eta", 0.0), prediction=prediction, variance=variance, clip=clip,
                use_clipped_model_output=ucmo, self_condition=mopts["self_condition"], **(dpm or {}))


def _sigma_levels(mopts, s, steps) -> torch.Tensor:
    """The noise levels of a sigma method: a named family (fastddpm.sigmas.get_sigmas), or the
    user's 1-D tensor of positive, strictly decreasing sigmas (a final 0 appended if it has none)."""
    spec = mopts["sigmas"]
    if isinstance(spec, str):
        return sigmas_mod.get_sigmas(spec, steps if steps is not None else s.num_steps, s, mopts["sigma_min"],
                                     mopts["sigma_max"], mopts["rho"])
    for name in ("sigma_min", "sigma_max", "rho"):
        if mopts[name] is not None:
            raise ValueError(f"{name} applies to a named sigma family (sigmas='karras', ...), not to a tensor of "
                             f"sigmas; got {name}={mopts[name]!r}")
    try:
        sig = torch.as_tensor(spec, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"sigmas must be one of {sigmas_mod.SIGMA_KINDS} or a 1-D tensor of noise levels; got "
                         f"{type(spec).__name__}") from None
    body = sig[:-1] if sig.ndim == 1 and sig.numel() > 1 and float(sig[-1]) == 0 else sig
    if sig.ndim != 1 or body.numel() == 0 or not torch.isfinite(body).all() or (body <= 0).any():
        raise ValueError(f"sigmas must be a 1-D tensor of positive finite noise levels (optionally ending in one 0); "
                         f"got {sig.tolist()[:6]}{'...' if sig.numel() > 6 else ''}")
    if (body[1:] >= body[:-1]).any():
        raise ValueError(f"sigmas must be strictly decreasing; got {body.tolist()[:6]}"
                         f"{'...' if body.numel() > 6 else ''}")
    if steps is not None and steps != body.numel():
        raise ValueError(f"steps={steps} disagrees with the {body.numel()} noise levels of sigmas=; leave steps out "
                         "or pass as many sigmas")
    return torch.cat([body, body.new_zeros(1)])


def _guidance_modes(conditioning, s, plan):
    """Per model evaluation (timestep methods: indexed by step i; sigma methods: by stage k) what
    the guidance runs there: "cond", "uncond" or "guided" (fastddpm.guidance.Conditioning.mode)."""
    if conditioning is None:
        return None
    if plan is not None:
        return conditioning.modes(plan.sigma.tolist()[:plan.nfe])
    return conditioning.modes(guidance.noise_level(a) for a in s.alphas_cumprod.tolist())


def _call(forward, x, t, cond, guide, idx):
    """(model output, the step's guidance or None): one model call, or on a guided step the doubled
    batch's output (2B rows, conditional first) or the pair of the two calls' outputs."""
    if guide is None:
        return forward(x, t, *cond), None
    conditioning, modes, kw = guide
    mode = modes[idx]
    return guidance.call(forward, x, t, mode, kw, *cond), (conditioning.cfg if mode == "guided" else None)


def _cond_half(mo, B):
    """The conditional output of a model output (itself, a doubled batch's first B rows, a pair's first)."""
    if isinstance(mo, tuple):
        return mo[0]
    return mo[:B] if mo.shape[0] == 2 * B and B else mo


def _all_finite(mo):
    if isinstance(mo, tuple):
        return torch.isfinite(mo[0]).all() & torch.isfinite(mo[1]).all()
    return torch.isfinite(mo).all()


def _graph_loop(model, s, shape, device, model_dtype, autocast, opts, compile, full, layout, explicit, guide=None):
    """The cached captured loop, or None after a capture failure under backend='auto' (warned once)."""
    from . import graphs

    forward = make_forward(model, model_dtype, autocast, compile, full)
    try:
        return graphs.loop_for(model, forward, s, shape, device, opts, (model_dtype, autocast, compile, layout),
                               lambda mo, x: _check_output(mo, x, opts.get("variance", "fixed_small")), layout,
                               guide)
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
                  layout=torch.contiguous_format, guide=None):
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
            mo, cfg = _call(forward, x, t_model, cond, guide, i)
        except Exception as e:
            if first and hasattr(e, "add_note"):
                e.add_note(f"fastddpm.sample: the model failed on its first call with x of shape {tuple(x.shape)} "
                           f"({model_dtype}, {device}); check shape=, dtype= and device=")
            raise
        if first:
            _check_output(_cond_half(mo, B), x, variance)
            if backend == "fused":
                x = follow_layout(x, _cond_half(mo, B))
                cond = tuple(follow_layout(c, _cond_half(mo, B)) for c in cond)
                prev_x0 = follow_layout(prev_x0, _cond_half(mo, B)) if dpm else None
        finite = _all_finite(mo)
        if cfg is not None and backend == "reference":
            mo, cfg = guidance.combine(mo, cfg, x), None  # the peers' combine, then the plain step
        noise, kw = None, {}
        if cfg is not None:
            kw["guidance"] = cfg
        if generator is not None:
            # diffusers: DDPM draws in the model's dtype at steps > 0; SDE-DPM-Solver++ draws float32 at every step
            if draws and (i > 0 or dpm):
                noise = _generator_normal(shape, generator, device, torch.float32 if dpm else _cond_half(mo, B).dtype)
        else:
            kw.update(seed=seed, sample_offset=start)
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
        bad = ~(torch.isfinite(x).all() & finite)  # clipping can hide a non-finite output
        first_bad = torch.where((first_bad < 0) & bad, torch.full_like(first_bad, i), first_bad)
        if bar is not None:
            bar.update(1)
    _raise_if_bad(int(first_bad), s, start)  # one host sync per batch
    return x


def _raise_if_bad(i, s, start, plan=None):
    if i >= 0 and plan is not None:  # a sigma method's flag counts stages left
        k = plan.nfe - 1 - i
        raise FloatingPointError(
            f"non-finite values (NaN or inf) appeared at model evaluation {k} of {plan.nfe} (sigma "
            f"{float(plan.sigma[k]):.4g}) in the batch starting at sample {start}, in the model's output or the "
            "sampler state: check the model's output and dtype")
    if i >= 0:
        raise FloatingPointError(
            f"non-finite values (NaN or inf) appeared at step {i} (timestep {int(s.timesteps[i])}) in the batch "
            f"starting at sample {start}, in the model's output or the sampler state: check the model's output "
            "and dtype")


def _sample_sigma_batch(forward, s, shape, start, seed, generator, device, model_dtype, opts, bar, backend,
                        layout=torch.contiguous_format, guide=None):
    """One batch of a sigma method (fastddpm.karras): per model evaluation k, the model on the
    state (its input c_in x) at the stage's timestep, then one stage update (reference, or the
    fused op updating x and the history in place)."""
    plan, B = opts["plan"], shape[0]
    if backend == "reference":
        step = karras.sigma_step
    else:
        from . import ops

        def step(plan, x, k, mo, hist, noise, **kw):
            return ops.sigma_step(plan, x, k, mo, hist, noise, out=x, history_out=hist, **kw)
    if generator is not None:  # k-diffusion: x = randn * sigma_max, then euler / heun / dpm_2's first churn draw
        z_init = _generator_normal(shape, generator, device, torch.float32)
        z0 = _generator_normal(shape, generator, device, torch.float32) if plan.init_draws else None
        x = karras.initial_state(plan, z_init, z0)
        kw = {}
    else:
        x = karras.initial_state_seeded(plan, torch.empty(shape, device=device), seed, start)
        kw = dict(seed=seed, sample_offset=start)
    x = x.contiguous(memory_format=layout)
    hist = tuple(torch.zeros_like(x) for _ in range(plan.num_history))
    timesteps = plan.timesteps_on(device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    for k in range(plan.nfe):
        try:
            mo, cfg = _call(forward, x, timesteps[k].expand(B), (), guide, k)
        except Exception as e:
            if k == 0 and hasattr(e, "add_note"):
                e.add_note(f"fastddpm.sample: the model failed on its first call with x of shape {tuple(x.shape)} "
                           f"({model_dtype}, {device}); check shape=, dtype= and device=")
            raise
        if k == 0:
            _check_output(_cond_half(mo, B), x, "fixed_small")
            if backend == "fused":
                x = follow_layout(x, _cond_half(mo, B))
                hist = tuple(follow_layout(h, _cond_half(mo, B)) for h in hist)
        finite = _all_finite(mo)
        if cfg is not None and backend == "reference":
            mo, cfg = guidance.combine(mo, cfg, x), None
        noise = _generator_normal(shape, generator, device, torch.float32) \
            if generator is not None and bool(plan.draw[k]) else None
        with torch.no_grad():
            x, hist = step(plan, x, k, mo, hist, noise, **kw, **({"guidance": cfg} if cfg is not None else {}))
        bad = ~(torch.isfinite(x).all() & finite)  # clipping can hide a non-finite output
        first_bad = torch.where((first_bad < 0) & bad, torch.full_like(first_bad, plan.nfe - 1 - k), first_bad)
        if bar is not None:
            bar.update(1)
    _raise_if_bad(int(first_bad), s, start, plan)  # one host sync per batch
    return x

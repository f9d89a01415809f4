"""Argument validation shared by the reference math, the fused ops and the samplers.

Public entry points call these; inner code trusts its inputs. Every error names the
argument, what was given and what is allowed.
"""
from __future__ import annotations

import inspect
import math
import numbers

import torch

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
METHODS = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++")
DPM_METHODS = ("dpmsolver++", "sde-dpmsolver++")  # fastddpm.dpm_solver (Lu et al. 2022)
BACKENDS = ("auto", "reference", "fused", "graph")


def one_of(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
    return value


# fastddpm.schedule.Schedule, registered by fastddpm.schedule when it is imported: this module is the
# bottom layer (schedule -> dpm_solver -> _checks), so it must not import schedule itself.
SCHEDULE_TYPE: type | None = None


def check_schedule(s, name="s"):
    if SCHEDULE_TYPE is None or not isinstance(s, SCHEDULE_TYPE):
        given = repr(s) if isinstance(s, str) else type(s).__name__
        raise TypeError(f"{name} must be a fastddpm.Schedule (e.g. fastddpm.Schedule.linear(1000)); got {given}")


def check_schedule_fits_model(model, schedule):
    """schedule= must be the model's own training schedule (model.fastddpm_schedule) or a respacing
    of it: the same num_train_timesteps and the same alphas_cumprod at every timestep it keeps.
    Another training schedule would call the model at timesteps, or noise levels, it was not
    trained on."""
    own = getattr(model, "fastddpm_schedule", None)
    if schedule is None or own is None or schedule is own:
        return
    check_schedule(schedule, "schedule")
    if schedule.num_train_timesteps != own.num_train_timesteps:
        why = (f"num_train_timesteps {schedule.num_train_timesteps} against the model's {own.num_train_timesteps}: "
               f"the model would be called at timesteps {int(schedule.timesteps[0])}.."
               f"{int(schedule.timesteps[-1])} with other noise levels than it was trained on")
    else:
        own_abar = dict(zip(own.timesteps.tolist(), own.alphas_cumprod.tolist()))
        why = None
        for ts, a in zip(schedule.timesteps.tolist(), schedule.alphas_cumprod.tolist()):
            b = own_abar.get(ts)
            if b is None:
                why = f"it runs timestep {ts}, which the model's schedule does not have"
                break
            if abs(a - b) > 1e-6 * b + 1e-12:
                why = (f"alphas_cumprod at timestep {ts} is {a:.6g} against the model's {b:.6g} (other betas): "
                       "the model would be called at other noise levels than it was trained on")
                break
        if why is None:
            return  # the model's own schedule, or a respacing of it
    raise ValueError(f"schedule={schedule!r} contradicts this model's training schedule (model.fastddpm_schedule = "
                     f"{own!r}): {why}. Leave schedule= out (steps=k respaces the model's own; so does "
                     "schedule=model.fastddpm_schedule.respace(k)): pass schedule= only for a model without a "
                     "schedule of its own, or set model.fastddpm_schedule if the model was trained with this one")


def as_int(v):
    """A numpy (or other non-bool numbers.Integral) integer as a Python int; anything else unchanged, for the
    caller's own check to name."""
    if isinstance(v, numbers.Integral) and not isinstance(v, (bool, int)):
        return int(v)
    return v


def check_float_tensor(x, name, min_ndim=2):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have shape (B, ...) with at least {min_ndim} dims; got {tuple(x.shape)}")


def check_clip(clip):
    if clip is None:
        return None
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0:
        raise ValueError(f"clip must be a positive finite float or None; got {clip!r}")
    return float(clip)


def check_bool(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return value


def check_eta(eta):
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite float >= 0; got {eta!r}")
    return float(eta)


def check_t(s, t, x):
    """t: int step index in 0..S-1, or an integer tensor of shape () or (B,) on x's device.

    Returns an int, or a contiguous int64 tensor of shape (B,) on x's device (a 0-d t is
    expanded and copied, a strided or non-int64 t copied): the kernels read t[b] at t_ptr + b.
    Values of a tensor t are range-checked (one host sync) except while a CUDA graph is being
    captured.
    """
    return check_index(t, s.num_steps, x, "t", "step", "x_t")


def check_index(t, count, x, name, what, x_name="x"):
    """An index into 0..count-1 (a step, a stage): an int (numpy integers too), or an integer
    tensor () / (B,) on x's device, returned as in check_t."""
    B = x.shape[0]
    t = as_int(t)
    if isinstance(t, bool):
        raise TypeError(f"{name} must be an int or an integer tensor; got bool")
    if isinstance(t, int):
        if not 0 <= t < count:
            raise ValueError(f"{name} must be a {what} index in 0..{count - 1}; got {t}")
        return t
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int or an integer tensor; got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype; got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}; put them on one device")
    if t.ndim == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"{name} must have shape () or ({B},) to match {x_name}'s batch; got {tuple(t.shape)}")
    if t.numel() and not _capturing(t):  # an empty batch has nothing to check (and no min)
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= count:
            raise ValueError(f"{name} must hold {what} indices in 0..{count - 1}; got values in [{lo}, {hi}]")
    return t.to(torch.long).contiguous()


def _capturing(t):
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_like(y, x, name, channels=None):
    """y must have x's shape (channel count `channels` if given) and device."""
    check_float_tensor(y, name, min_ndim=1)
    want = tuple(x.shape) if channels is None else (x.shape[0], channels, *x.shape[2:])
    if tuple(y.shape) != want:
        raise ValueError(f"{name} must have shape {want}; got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"{name} is on {y.device} but x_t is on {x.device}; put them on one device")


def check_model_output(model_output, x, variance):
    """model_output: (B, C, ...) or, for variance='learned_range', (B, 2C, ...)."""
    check_float_tensor(model_output, "model_output")
    C = x.shape[1]
    channels = 2 * C if variance == "learned_range" else C
    if model_output.ndim != x.ndim or model_output.shape[0] != x.shape[0] or model_output.shape[1] != channels \
            or model_output.shape[2:] != x.shape[2:]:
        want = (x.shape[0], channels, *x.shape[2:])
        extra = " (learned_range needs 2C channels: eps and the variance interpolation v)" \
            if variance == "learned_range" else ""
        raise ValueError(f"model_output must have shape {want}{extra}; got {tuple(model_output.shape)}")
    if model_output.device != x.device:
        raise ValueError(f"model_output is on {model_output.device} but x_t is on {x.device}")


def check_noise_source(noise, seed, x, needs_noise, name="noise"):
    """Exactly one of noise (a tensor like x) or seed (an int) when a step adds noise."""
    from .rng import check_seed

    if noise is not None and seed is not None:
        raise ValueError(f"pass either {name}= or seed=, not both")
    if noise is not None:
        check_like(noise, x, name)
    elif seed is not None:
        check_seed(seed)
    elif needs_noise:
        raise ValueError(f"{name} is required (or seed= to draw it from the counter-based stream)")


def check_step_args(s, x_t, t, model_output, noise, *, ddim, eta, prediction, variance, clip, seed, sample_offset,
                    use_clipped_model_output):
    """Validate one DDPM (ddim=False) or DDIM step's arguments: one validator for the reference
    (fastddpm.diffusion) and the fused op (fastddpm.ops), as fastddpm.dpm_solver.check_dpm_step_args
    is for DPM-Solver++. Returns (t, eta, clip) normalised (see check_t, check_eta, check_clip)."""
    check_schedule(s)
    check_float_tensor(x_t, "x_t")
    one_of(prediction, PREDICTIONS, "prediction")
    one_of(variance, VARIANCES, "variance")
    eta = check_eta(eta)
    clip = check_clip(clip)
    check_bool(use_clipped_model_output, "use_clipped_model_output")
    t = check_t(s, t, x_t)
    check_model_output(model_output, x_t, variance)
    at_zero = isinstance(t, int) and t == 0
    check_noise_source(noise, seed, x_t, needs_noise=not at_zero and (not ddim or eta > 0))
    check_sample_offset(sample_offset)
    if sample_offset + x_t.shape[0] > 2**32:
        raise ValueError(f"sample_offset + batch must not exceed 2**32; got {sample_offset} + {x_t.shape[0]}")
    return t, eta, clip


def _byte_range(x):
    """[first, last] byte addresses x can touch (its storage span), or None for an empty tensor."""
    if x.numel() == 0:
        return None
    first = x.data_ptr() + x.element_size() * sum((n - 1) * st for n, st in zip(x.shape, x.stride()) if st < 0)
    last = x.data_ptr() + x.element_size() * (sum((n - 1) * st for n, st in zip(x.shape, x.stride()) if st > 0) + 1)
    return first, last - 1


def check_no_partial_overlap(out, name, inputs, outputs=None):
    """out may be one of `inputs` itself (the same memory, element for element: an in-place update)
    or memory apart from all of them; a partial overlap would let a kernel read elements it has
    already overwritten, so it is refused. inputs: {argument name: tensor or None}; outputs: other
    buffers the same call writes, which must be apart from out altogether."""
    if out is None:
        return
    mine = _byte_range(out)
    for other_name, y in {**inputs, **(outputs or {})}.items():
        if y is None or y.device != out.device or mine is None:
            continue
        theirs = _byte_range(y)
        if theirs is None or theirs[1] < mine[0] or mine[1] < theirs[0]:
            continue
        if other_name in (outputs or {}):
            raise ValueError(f"{name} and {other_name} share memory; the op writes both: pass two separate buffers")
        if y.data_ptr() == out.data_ptr() and y.shape == out.shape and y.stride() == out.stride() \
                and y.dtype == out.dtype:
            continue  # the same elements: the in-place update the ops support
        raise ValueError(f"{name} partly overlaps {other_name} in memory (it shares some elements, not the same "
                         f"elements: {name} at byte offset {out.data_ptr() - y.data_ptr():+d} from {other_name}, "
                         f"shape {tuple(out.shape)}); pass {name}={other_name} itself for an in-place update, or a "
                         "separate buffer")


def check_sample_offset(sample_offset):
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or not 0 <= sample_offset < 2**32:
        raise ValueError(f"sample_offset must be an int in [0, 2**32); got {sample_offset!r}")
    return sample_offset


def check_device(device, name="device"):
    """A torch.device that exists on this machine, or a ValueError naming the argument."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name} must be a device such as 'cpu', 'cuda' or 'cuda:1'; got {device!r} ({e})") from None
    if dev.type == "meta":
        raise ValueError(f"{name}={str(device)!r} is torch's placeholder device, which holds no values; pass a device "
                         f"that computes, such as {name}='cpu' or {name}='cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={str(device)!r} but CUDA is not available on this machine "
                             f"(torch.cuda.is_available() is False); pass {name}='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={str(device)!r} but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s) (indices 0..{torch.cuda.device_count() - 1})")
    return dev


def _accepts_positional(fn, n, keywords=()):
    """Whether fn can be called with n positional arguments and the keywords (None when its
    signature is unknown)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(*range(n), **dict.fromkeys(keywords))
    except TypeError:
        return False
    return True


def check_self_condition(model, self_condition, keywords=()):
    """self_condition=True calls model(x, t, x_self_cond) (denoising-diffusion-pytorch's Unet);
    refuse a model that would ignore the third argument, and one that needs it but would not get it.
    keywords: those the conditioning passes (a third parameter they fill, such as the `classes` of
    denoising-diffusion-pytorch's classifier-free guidance Unet, is not a self-conditioning input)."""
    check_bool(self_condition, "self_condition")
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    flag = getattr(model, "self_condition", None)
    name = type(model).__name__
    if isinstance(flag, bool) and flag != self_condition:
        if flag:
            raise ValueError(f"self_condition=False, but this {name} has self_condition=True: it expects "
                             "model(x, t, x_self_cond) with the previous step's x0 prediction; pass "
                             "self_condition=True")
        raise ValueError(f"self_condition=True, but this {name} has self_condition=False: it would ignore "
                         "x_self_cond; pass self_condition=False")
    if self_condition:
        if "diffusers" in type(model).__module__:
            raise ValueError(f"self_condition=True, but {name} is a diffusers model: its third argument is not a "
                             "self-conditioning input; pass self_condition=False")
        if _accepts_positional(fn, 3) is False:
            raise ValueError(f"self_condition=True calls model(x, t, x_self_cond), but this {name} takes "
                             f"{inspect.signature(fn)}; pass self_condition=False or give it a third argument")
    elif _accepts_positional(fn, 2, keywords) is False and _accepts_positional(fn, 3):
        raise ValueError(f"this {name} takes {inspect.signature(fn)}, a third argument: if it is a "
                         "self-conditioning input (the previous step's x0), pass self_condition=True")

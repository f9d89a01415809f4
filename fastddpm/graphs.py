"""CUDA-graph captured sampling loops: `fastddpm.sample(..., backend="graph")`.

At small and medium batches a sampling step is dominated by launch and Python overhead.
Here the whole loop runs from captured CUDA graphs:

- static buffers: the state x (B, C, H, W) float32, the step index of every sample i (B,)
  int64, the noise stream's (seed_lo, seed_hi, first sample) rng (3,) int64, and the
  first-bad-step flag () int64, all on the device;
- one step = timesteps[i] gathered on the device -> model(x, t) -> the fused step kernel
  (noise drawn in the kernel from rng, t read from i, the non-finite check folded into the
  kernel as an atomic max into the flag) -> i -= 1. Nothing in it reads the host;
- the loop is cut into an "init" graph (x_T drawn in a kernel under TAG_INIT, i = S - 1,
  flag = -1), a "chunk" graph of K = min(CHUNK_STEPS, S) steps replayed S // K times and,
  when K does not divide S, a "tail" graph of S % K steps. All share one memory pool, so
  activations are allocated once, not per step. A chunk of steps instead of the whole loop
  keeps capture cheap (its cost grows with K) and gives `progress=True` a point to report
  at; replays are queued asynchronously, so the host stays ahead of the GPU for any K whose
  replay takes longer than a graph launch (~10 us): K = 10 covers batch 1 of a small U-Net.

A captured loop serves any seed and any batch of a run (both are device data), so it is
built once per (model weights, batch shape, model dtype, schedule, step options, K) and
cached on the model (weakly: it goes when the model goes). A key holds the addresses of
the model's parameters and buffers: moving or replacing them (`model.to(...)`,
`load_state_dict` into new tensors) misses the cache and drops the stale entries. Weights
updated in place (an optimizer step, `copy_`) are seen by the next replay, as in eager
mode. Python-level state a model's forward branches on (a flag attribute, say) is frozen
at capture: call `clear_cache(model)` after changing it.

Warm-up runs the loop body eagerly on a side stream first (Triton compilation, cuDNN and
torch.compile autotuning stay out of the capture). If the capture itself fails (the model
synchronises with the host, branches on tensor values, copies from host memory), the
failure is remembered for that key and `sample` falls back to the fused eager loop with one
warning (backend="auto") or raises (backend="graph").
"""
from __future__ import annotations

import collections
import hashlib
import threading
import warnings
import weakref

import torch
from torch import nn

from . import rng

__all__ = ["supported", "clear_cache", "CaptureError", "CHUNK_STEPS"]

CHUNK_STEPS = 10        # steps per replayed graph (see the module docstring)
MAX_ENTRIES = 4         # cached loops per model (batch sizes, dtypes, schedules...), least recently used go
EMULATE_ON_CPU = False  # tests: run the graph loop's body eagerly on the CPU, without capturing

_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# models that cannot be weakly referenced: id -> (model, loops); the model is held so its id stays unique
_strong_cache: "collections.OrderedDict" = collections.OrderedDict()
_lock = threading.Lock()


class CaptureError(RuntimeError):
    """The model's forward could not be captured in a CUDA graph."""

    def __init__(self, message):
        super().__init__(message)
        self.reported = False


def supported(device: torch.device) -> tuple[bool, str]:
    """(ok, why): whether a graph-captured loop can run on `device`."""
    from . import ops

    if device.type == "cuda" or (EMULATE_ON_CPU and device.type == "cpu"):
        return ops.kernels_available()
    return False, f"needs a CUDA device (it replays CUDA graphs); got device {device}"


def clear_cache(model=None) -> None:
    """Drop the captured loops of `model` (all models when None), freeing their memory."""
    with _lock:
        if model is None:
            _cache.clear()
            _strong_cache.clear()
            return
        try:
            _cache.pop(model, None)
        except TypeError:
            pass
        _strong_cache.pop(id(model), None)


def cached_entries(model) -> int:
    """How many captured loops are cached for `model` (for tests and diagnostics)."""
    entries = _entries(model, create=False)
    return 0 if entries is None else len(entries)


# ----------------------------------------------------------------------------------- plan
class LoopPlan:
    """One batch's sampling loop on static buffers, with the step index on the device.

    forward(x, t) -> model output is the model call (dtype casts and autocast included);
    begin() draws x_T and resets the index and flag; step() runs one step. Both only launch
    device work on device data, so they can be captured."""

    def __init__(self, forward, s, shape, device, opts):
        from .kernels.step import step_forward

        self._step_forward = step_forward
        self.forward = forward
        self.s = s
        self.S = s.num_steps
        self.device = device
        B = shape[0]
        self.x = torch.empty(shape, dtype=torch.float32, device=device)
        self.i = torch.empty(B, dtype=torch.long, device=device)
        self.rng = torch.zeros(3, dtype=torch.long, device=device)
        self.flag = torch.full((), -1, dtype=torch.long, device=device)
        self.timesteps = s.timesteps_on(device)
        ddim = opts["method"] == "ddim"
        # the captured launches read these by address: hold them for the life of the plan
        self._tables = (s.table(device), s.ddim_rows(device, opts["eta"]) if ddim else None)
        self.kw = dict(ddim=ddim, eta=opts["eta"] if ddim else 0.0, prediction=opts["prediction"],
                       variance=opts["variance"] if not ddim else "fixed_small", clip=opts["clip"],
                       seed=None, sample_offset=0, return_x0=False)

    def set_rng(self, seed: int, first_sample: int):
        self.rng[0].fill_(seed & 0xFFFFFFFF)
        self.rng[1].fill_(seed >> 32)
        self.rng[2].fill_(first_sample)

    def begin(self):
        from .kernels.noise import normal_forward

        normal_forward(self.x, rng.TAG_INIT, rng=self.rng)
        self.i.fill_(self.S - 1)
        self.flag.fill_(-1)

    def step(self):
        t = torch.index_select(self.timesteps, 0, self.i)
        mo = self.forward(self.x, t)
        self._step_forward(self.s, self.x, self.i, mo, None, **self.kw, out=self.x, rng=self.rng, flag=self.flag)
        self.i.sub_(1)

    def steps(self, k: int):
        for _ in range(k):
            self.step()

    def first_call(self, check_output):
        """The first model call, eager: validates the output and adopts its memory layout
        (a channels_last model keeps a channels_last state, so the step never copies)."""
        self.begin()
        t = torch.index_select(self.timesteps, 0, self.i)
        mo = self.forward(self.x, t)
        check_output(mo, self.x)
        from .sampler import follow_layout

        self.x = follow_layout(self.x, mo)


# ----------------------------------------------------------------------------------- loop
class GraphLoop:
    """A LoopPlan cut into captured graphs (init, chunk of K steps, tail), replayed per batch.
    With capture=False (EMULATE_ON_CPU) the same calls run eagerly: what tests on the CPU see."""

    def __init__(self, plan: LoopPlan, chunk: int, capture: bool):
        self.plan = plan
        self.k = min(chunk, plan.S)
        self.n_chunks, self.tail = divmod(plan.S, self.k)
        self.capture = capture
        self.lock = threading.Lock()
        self._init = plan.begin
        self._chunk = lambda: plan.steps(self.k)
        self._tail = lambda: plan.steps(self.tail)
        self.graphs = ()

    def build(self, check_output):
        """Warm up (eagerly, on a side stream when capturing), then capture. A failure of the
        first model call is the model's own error and propagates; any later failure (the
        warm-up steps, the capture) raises CaptureError, so 'auto' can fall back to fused."""
        plan = self.plan
        if not self.capture:
            plan.first_call(check_output)
            return self
        dev = plan.device
        with torch.cuda.device(dev):
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                plan.first_call(check_output)
            try:
                with torch.cuda.stream(side):
                    plan.begin()
                    plan.steps(min(2, plan.S))  # compiles the kernels; a compiled model's second call
                torch.cuda.current_stream(dev).wait_stream(side)
                torch.cuda.synchronize(dev)
                pool = torch.cuda.graph_pool_handle()
                graphs = [self._capture(self._init, pool), self._capture(self._chunk, pool)]
                if self.tail:
                    graphs.append(self._capture(self._tail, pool))
            except Exception as e:  # noqa: BLE001 - any failure here means "run this model eagerly"
                try:
                    torch.cuda.synchronize(dev)
                except Exception:  # noqa: BLE001
                    pass
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise CaptureError(f"{type(e).__name__}: {first_line}") from e
        self.graphs = tuple(graphs)
        self._init = graphs[0].replay
        self._chunk = graphs[1].replay
        if self.tail:
            self._tail = graphs[2].replay
        return self

    @staticmethod
    def _capture(fn, pool):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            fn()
        return g

    def run(self, seed: int, first_sample: int, out: torch.Tensor, flag_out: torch.Tensor, bar=None):
        """Sample one batch into out (B, C, H, W); copy the batch's first-bad-step flag into
        flag_out (a 0-d int64 tensor). Host synchronisation only for progress, per chunk."""
        plan = self.plan
        with self.lock, _device_ctx(plan.device):
            plan.set_rng(seed, first_sample)
            self._init()
            pending = collections.deque()
            runs = [(self._chunk, self.k)] * self.n_chunks + ([(self._tail, self.tail)] if self.tail else [])
            for fn, k in runs:
                fn()
                if bar is not None:
                    pending.append((_event(plan.device), k))
                    while len(pending) > 1:  # report the chunk before the one just queued
                        ev, done = pending.popleft()
                        if ev is not None:
                            ev.synchronize()
                        bar.update(done)
            out.copy_(plan.x)
            flag_out.copy_(plan.flag)
            for ev, done in pending:
                if ev is not None:
                    ev.synchronize()
                bar.update(done)


def _event(device):
    if device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record()
    return ev


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _device_ctx(device):
    return torch.cuda.device(device) if device.type == "cuda" else _NullCtx()


# ---------------------------------------------------------------------------------- cache
def _schedule_key(s) -> str:
    h = hashlib.sha1()
    h.update(s.alphas_cumprod.numpy().tobytes())
    h.update(s.timesteps.numpy().tobytes())
    h.update(str(s.num_train_timesteps).encode())
    return h.hexdigest()


def _weights_key(model) -> tuple:
    if not isinstance(model, nn.Module):
        return ()
    # once per batch: one walk over the modules (model.parameters() + buffers() walk twice)
    return tuple((t.data_ptr(), t.shape, t.dtype) for mod in model.modules()
                 for group in (mod._parameters, mod._buffers) for t in group.values() if t is not None)


def _entries(model, create: bool):
    with _lock:
        try:
            entries = _cache.get(model)
            if entries is None and create:
                entries = _cache[model] = collections.OrderedDict()
        except TypeError:  # not weakly referenceable: a bounded strong cache
            held = _strong_cache.get(id(model))
            if held is None and create:
                held = _strong_cache[id(model)] = (model, collections.OrderedDict())
                while len(_strong_cache) > MAX_ENTRIES:
                    _strong_cache.popitem(last=False)
            entries = held[1] if held is not None else None
        return entries


def loop_for(model, forward, s, shape, device, opts, extra_key, check_output) -> GraphLoop:
    """The cached GraphLoop for this model and configuration, built on a miss.
    Raises CaptureError (also for a configuration whose capture failed before)."""
    weights = _weights_key(model)
    key = (weights, tuple(shape), str(device), _schedule_key(s), tuple(sorted(opts.items())), CHUNK_STEPS,
           extra_key)
    entries = _entries(model, create=True)
    with _lock:
        hit = entries.get(key)
        if hit is not None:
            entries.move_to_end(key)
    if isinstance(hit, CaptureError):
        raise hit
    if hit is not None:
        return hit
    with _lock:  # weights moved or replaced: the loops captured on the old addresses are stale
        for k in [k for k in entries if k[0] != weights]:
            del entries[k]
    capture = device.type == "cuda"
    try:
        loop = GraphLoop(LoopPlan(forward, s, shape, device, opts), CHUNK_STEPS, capture).build(check_output)
    except CaptureError as e:
        loop = e
    with _lock:
        entries[key] = loop
        while len(entries) > MAX_ENTRIES:
            entries.popitem(last=False)
    if isinstance(loop, CaptureError):
        raise loop
    return loop


def warn_fallback(err: CaptureError):
    """One warning per failed configuration."""
    if not err.reported:
        err.reported = True
        warnings.warn(f"fastddpm.sample: the model could not be captured in a CUDA graph ({err}); using "
                      "backend='fused' (same samples, eager loop). Pass backend='fused' to silence this.",
                      RuntimeWarning, stacklevel=3)

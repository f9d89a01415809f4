"""One CUDA-graph captured sampling loop: what `fastddpm.graphs` builds and caches per model.

At small and medium batches a sampling step is dominated by launch and Python overhead.
Here the whole loop runs from captured CUDA graphs:

- static buffers: the state x (B, C, H, W) float32, the step index of every sample i (B,)
  int64, the noise stream's (seed_lo, seed_hi, first sample) rng (3,) int64, the
  first-bad-step flag () int64 and, for self-conditioning and DPM-Solver++, the previous step's x0 (like x; one buffer
  serves both),
  all on the device;
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

LoopPlan is that loop on static buffers, run eagerly; GraphLoop cuts it into the captured
graphs and replays them per batch, in the memory pool its model's loops share
(fastddpm.graphs). fastddpm's captures run one at a time in the process, in
capture_error_mode="thread_local": another thread's host synchronisation or cudaMalloc
neither fails nor invalidates a capture.

Warm-up runs the loop body eagerly on a side stream first (Triton compilation, cuDNN and
torch.compile autotuning stay out of the capture). A failure after the first model call
raises CaptureError, which says whether the model's own code failed (it synchronises with
the host, branches on tensor values, copies from host memory) or the failure was transient
(out of memory, a capture invalidated from outside): fastddpm.graphs caches the former only.
"""
from __future__ import annotations

import collections
import threading

import torch

from . import rng
from .layout import follow_layout

_capture_lock = threading.Lock()  # one capture at a time in the process
_emulated = threading.local()     # fastddpm.graphs.EMULATE_ON_CPU: .capturing is True while a "capture" runs


class CaptureError(RuntimeError):
    """The model's forward could not be captured in a CUDA graph. `model_failed`: the model's
    own code failed (cached: that configuration is not captured again); otherwise transient."""

    def __init__(self, message, model_failed: bool = True):
        super().__init__(message)
        self.model_failed = model_failed
        self.reported = False


def capturing() -> bool:
    """Whether this thread is capturing a CUDA graph (or, under EMULATE_ON_CPU, running the body
    in place of a capture: tests model a forward that cannot be captured with it)."""
    if getattr(_emulated, "capturing", False):
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------------- plan
class StaticGuide:
    """A captured loop's conditioning (fastddpm.guidance): every tensor the model calls take (labels,
    per-sample conditions, the doubled batch's labels) in a static buffer, refilled per batch; the
    scale w in a device buffer (1,) read by the step kernels (and by the coefficient kernel of
    guidance_rescale / guidance_parallel, which writes a static (B, 2) buffer): one capture serves
    every label set and every scale w other than 0 and 1 (those make one call per step, a different
    pattern). `modes` says per model evaluation what runs: "cond", "uncond" or "guided"."""

    def __init__(self, conditioning, modes, B, device):
        self.modes = tuple(modes)
        self.conditioning = conditioning
        template = conditioning.batch(0, B, device)
        self.kw = {group: (None if d is None else {k: v.clone() if isinstance(v, torch.Tensor) else v
                                                   for k, v in d.items()})
                   for group, d in template.items()}
        self.w = torch.ones(1, dtype=torch.float32, device=device)
        cfg = conditioning.cfg
        self.cfg = type(cfg)(self.w, cfg.rescale, cfg.parallel)
        self.coef = torch.empty((B, 2), dtype=torch.float32, device=device) if cfg.needs_reduction else None
        # the doubled model input (2B, ...): the step kernels write the state into both halves
        self.x2 = None

    def double(self, x):
        """The plan's state x (B, ...) -> a view of the first half of a (2B, ...) buffer whose second
        half the step kernels keep equal to it (when guided steps make one doubled call)."""
        if self.kw["doubled"] is None or "guided" not in self.modes:
            return x
        from .layout import follow_layout

        x2 = follow_layout(torch.empty((2 * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device), x)
        self.x2 = x2
        return x2[:x.shape[0]]

    @staticmethod
    def key(conditioning, modes, B, device) -> tuple:
        """What a capture depends on: the pattern of modes, the options, the structure of the calls
        (tensors by shape and dtype: their values are refilled per batch; other values as they are)."""
        def shape(v):
            return ("T", tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else ("V", repr(v))

        template = conditioning.batch(0, B, device)
        calls = tuple((g, None if d is None else tuple(sorted((k, shape(v)) for k, v in d.items())))
                      for g, d in sorted(template.items()))
        return (tuple(modes), conditioning.cfg.rescale, conditioning.cfg.parallel, calls)

    def set(self, batch_kw: dict, scale: float):
        """Fill the static buffers with a batch's conditions (Conditioning.batch) and the scale."""
        for group, d in self.kw.items():
            for k, v in (d or {}).items():
                if isinstance(v, torch.Tensor):
                    v.copy_(batch_kw[group][k])
        self.w.fill_(scale)

    def call(self, forward, x, t, mode, *cond):
        """(conditional output, unconditional output or None) of one step's model call(s)."""
        from .guidance import call

        mo = call(forward, x, t, mode, self.kw, *cond, x2=self.x2 if mode == "guided" else None)
        if mode != "guided":
            return mo, None
        if isinstance(mo, tuple):
            return mo
        B = x.shape[0]
        return mo[:B], mo[B:]

    def sync(self, x):
        """The doubled input's second half := x (after the initial noise)."""
        if self.x2 is not None:
            self.x2[x.shape[0]:].copy_(x)

    def step_kw(self, mode) -> dict:
        dup = {"dup_out": self.x2[self.x2.shape[0] // 2:]} if self.x2 is not None else {}
        if mode != "guided":
            return dup
        return dict(guidance=self.cfg, coef_out=self.coef, **dup)


def segments(modes, S, reverse) -> list:
    """[(mode, run length)] of consecutive model evaluations with one mode, in loop order."""
    order = list(reversed(range(S))) if reverse else list(range(S))
    runs = []
    for idx in order:
        m = modes[idx] if modes is not None else None
        if runs and runs[-1][0] == m:
            runs[-1][1] += 1
        else:
            runs.append([m, 1])
    return [tuple(r) for r in runs]


class LoopPlan:
    """One batch's sampling loop on static buffers, with the step index on the device.

    forward(x, t[, x0]) -> model output is the model call (dtype casts and autocast included);
    begin() draws x_T and resets the index and flag; step() runs one step. Both only launch
    device work on device data, so they can be captured."""

    def __init__(self, forward, s, shape, device, opts, layout=torch.contiguous_format, guide=None):
        from .kernels.step import step_forward

        self._step_forward = step_forward
        self.guide = guide
        self.forward = forward
        self.s = s
        self.S = s.num_steps
        self.device = device
        B = shape[0]
        self.x = torch.empty(shape, dtype=torch.float32, device=device, memory_format=layout)
        if guide is not None:
            self.x = guide.double(self.x)
        self.i = torch.empty(B, dtype=torch.long, device=device)
        self.rng = torch.zeros(3, dtype=torch.long, device=device)
        self.flag = torch.full((), -1, dtype=torch.long, device=device)
        # self-conditioning: the previous step's clipped x0, written by the step kernel
        self.x0 = torch.zeros_like(self.x) if opts["self_condition"] else None
        self.timesteps = s.timesteps_on(device)
        ddim = opts["method"] == "ddim"
        # DPM-Solver++: the previous step's x0 in a static buffer, updated in place by the step kernel
        self.dpm = opts["method"] in ("dpmsolver++", "sde-dpmsolver++")
        self.self_condition = opts["self_condition"]
        if self.dpm and self.x0 is None:  # DPM-Solver++ reads the previous x0 from the same buffer
            self.x0 = torch.zeros_like(self.x)
        # the captured launches read these by address: hold them for the life of the plan
        self._tables = (s.table(device), s.ddim_rows(device, opts["eta"]) if ddim else None,
                        s.dpm_rows(device, opts["method"], opts["order"], opts["solver_type"]) if self.dpm else None)
        if self.dpm:
            from .kernels.dpm import dpm_step_forward

            self._dpm_forward = dpm_step_forward
            self.kw = dict(method=opts["method"], order=opts["order"], solver_type=opts["solver_type"],
                           prediction=opts["prediction"], clip=opts["clip"], seed=None, sample_offset=0)
        else:
            self.kw = dict(ddim=ddim, eta=opts["eta"] if ddim else 0.0, prediction=opts["prediction"],
                           variance=opts["variance"] if not ddim else "fixed_small", clip=opts["clip"],
                           seed=None, sample_offset=0, return_x0=self.x0 is not None,
                           use_clipped_model_output=ddim and opts["use_clipped_model_output"])

    def set_rng(self, seed: int, first_sample: int):
        self.rng[0].fill_(seed & 0xFFFFFFFF)
        self.rng[1].fill_(seed >> 32)
        self.rng[2].fill_(first_sample)

    def begin(self):
        from .kernels.noise import normal_forward

        normal_forward(self.x, rng.TAG_INIT, rng=self.rng)
        if self.guide is not None:
            self.guide.sync(self.x)
        if self.x0 is not None:
            self.x0.zero_()
        self.i.fill_(self.S - 1)
        self.flag.fill_(-1)

    def step(self, mode=None):
        t = torch.index_select(self.timesteps, 0, self.i)
        mo, mu = self._model(t, mode)
        gkw = self.guide.step_kw(mode) if self.guide is not None else {}
        if self.dpm:  # first-order steps (the first, the last) never read the previous x0
            self._dpm_forward(self.s, self.x, self.i, mo, self.x0, None, **self.kw, out=self.x, x0_out=self.x0,
                              rng=self.rng, flag=self.flag, uncond_output=mu, **gkw)
        else:
            self._step_forward(self.s, self.x, self.i, mo, None, **self.kw, out=self.x, rng=self.rng,
                               flag=self.flag, x0_out=self.x0, uncond_output=mu, **gkw)
        self.i.sub_(1)

    def _model(self, t, mode):
        """(output, unconditional output of a guided step or None)."""
        if self.guide is None:
            return self.forward(self.x, t, *self._cond()), None
        return self.guide.call(self.forward, self.x, t, mode, *self._cond())

    def _cond(self):
        return (self.x0,) if self.self_condition else ()

    def steps(self, k: int, mode=None):
        for _ in range(k):
            self.step(mode)

    def segments(self):
        return segments(self.guide.modes if self.guide is not None else None, self.S, reverse=True)

    def first_call(self, check_output):
        """The first model call, eager: validates the output and adopts its memory layout
        (a channels_last model keeps a channels_last state, so the step never copies)."""
        self.begin()
        t = torch.index_select(self.timesteps, 0, self.i)
        mo, _ = self._model(t, self.segments()[0][0])
        check_output(mo, self.x)
        x = follow_layout(self.x, mo)
        if x is not self.x:
            self.x = self.guide.double(x) if self.guide is not None else x
        if self.x0 is not None:
            self.x0 = follow_layout(self.x0, mo)


class SigmaLoopPlan:
    """LoopPlan's counterpart for a sigma method (fastddpm.karras): static buffers x (the model
    input), the stage index k (B,) int64 counting up, the history buffers, rng and flag; begin()
    draws the first model input in a kernel; step() = the model at the stage's timestep, then one
    fused stage update (x and the history in place), k += 1. S = the number of model evaluations."""

    def __init__(self, forward, s, shape, device, opts, layout=torch.contiguous_format, guide=None):
        from .kernels.noise import normal_forward
        from .kernels.sigma_step import sigma_step_forward

        self._step_forward, self._normal_forward = sigma_step_forward, normal_forward
        self.guide = guide
        self.forward = forward
        self.plan = opts["plan"]
        self.S = self.plan.nfe
        self.device = device
        B = shape[0]
        self.x = torch.empty(shape, dtype=torch.float32, device=device, memory_format=layout)
        if guide is not None:
            self.x = guide.double(self.x)
        self.k = torch.empty(B, dtype=torch.long, device=device)
        self.rng = torch.zeros(3, dtype=torch.long, device=device)
        self.flag = torch.full((), -1, dtype=torch.long, device=device)
        self.hist = tuple(torch.zeros_like(self.x) for _ in range(self.plan.num_history))
        # the captured launches read these by address: hold them for the life of the plan
        self._tables = (self.plan.table(device), self.plan.tags_on(device), self.plan.timesteps_on(device))

    set_rng = LoopPlan.set_rng

    def begin(self):
        # the first model input c_in (sigma_max z(TAG_INIT) + the first churn noise z(tag 0)): karras.initial_state
        self._normal_forward(self.x, rng.TAG_INIT, rng=self.rng, scale=self.plan.init_std, tag2=0,
                             scale2=self.plan.init_churn)
        if self.guide is not None:
            self.guide.sync(self.x)
        for h in self.hist:
            h.zero_()
        self.k.fill_(0)
        self.flag.fill_(-1)

    def step(self, mode=None):
        t = torch.index_select(self._tables[2], 0, self.k)
        mo, mu = self._model(t, mode)
        gkw = self.guide.step_kw(mode) if self.guide is not None else {}
        self._step_forward(self.plan, self.x, self.k, mo, self.hist, None, seed=None, sample_offset=0, out=self.x,
                           rng=self.rng, flag=self.flag, uncond_output=mu, **gkw)
        self.k.add_(1)

    def _model(self, t, mode):
        if self.guide is None:
            return self.forward(self.x, t), None
        return self.guide.call(self.forward, self.x, t, mode)

    steps = LoopPlan.steps

    def segments(self):
        return segments(self.guide.modes if self.guide is not None else None, self.S, reverse=False)

    def first_call(self, check_output):
        """The first model call, eager: validates the output and adopts its memory layout."""
        self.begin()
        mo, _ = self._model(torch.index_select(self._tables[2], 0, self.k), self.segments()[0][0])
        check_output(mo, self.x)
        x = follow_layout(self.x, mo)
        if x is not self.x:
            self.x = self.guide.double(x) if self.guide is not None else x
        self.hist = tuple(follow_layout(h, mo) for h in self.hist)


# ----------------------------------------------------------------------------------- loop
class GraphLoop:
    """A LoopPlan cut into captured graphs (init, chunk of K steps, tail), replayed per batch,
    in the memory pool of its model's `group` (a fastddpm.graphs._ModelGraphs: its pool, build
    and replay locks, last replay event). With capture=False (EMULATE_ON_CPU) the same
    calls run eagerly, each "capture" running its body once: what tests on the CPU see."""

    def __init__(self, plan: LoopPlan, chunk: int, group, capture: bool):
        self.plan = plan
        self.group = group
        self.k = min(chunk, plan.S)
        self.capture = capture
        self._init = plan.begin
        # the loop as runs of at most K model evaluations of one guidance mode (one mode without
        # guidance): a chunk graph per (mode, length), each replayed wherever that run occurs
        self.runs = []
        for mode, length in plan.segments():
            q, r = divmod(length, self.k)
            self.runs += [(mode, self.k)] * q + ([(mode, r)] if r else [])
        self._fns = {run: (lambda m=run[0], c=run[1]: plan.steps(c, m)) for run in self.runs}
        self.graphs = ()
        self.pool = None

    def build(self, check_output):
        """Warm up (eagerly, on a side stream when capturing), then capture into the group's pool.
        A failure of the first model call is the model's own error and propagates; any later
        failure raises CaptureError (model_failed: whether the model's own code failed, see
        _classify), so 'auto' can fall back to fused."""
        plan, dev = self.plan, self.plan.device
        forward, model_errors = plan.forward, []

        def tracked(x, t, *cond, **kw):  # tells the model's own failures from the capture machinery's
            try:
                return forward(x, t, *cond, **kw)
            except Exception as e:
                model_errors.append(e)
                raise

        with _device_ctx(dev):
            side = torch.cuda.Stream(dev) if self.capture else None
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(dev))
            with _stream_ctx(side):
                plan.first_call(check_output)
            plan.forward = tracked
            try:
                with _stream_ctx(side):
                    for mode in dict.fromkeys(m for m, _ in self.runs):  # every mode's kernels and calls
                        plan.begin()
                        plan.steps(min(2, plan.S), mode)  # compiles the kernels; a compiled model's second call
                with _capture_lock:
                    if self.capture:
                        torch.cuda.current_stream(dev).wait_stream(side)
                        torch.cuda.synchronize(dev)
                    pool = self.group.pool(dev)
                    graphs = [self._capture(self._init, pool)]
                    captured = {}
                    for run in dict.fromkeys(self.runs):
                        captured[run] = self._capture(self._fns[run], pool)
                        graphs.append(captured[run])
            except Exception as e:  # noqa: BLE001 - any failure here means "run this model eagerly"
                if self.capture:
                    try:
                        torch.cuda.synchronize(dev)
                    except Exception:  # noqa: BLE001
                        pass
                cause, model_failed = _classify(e, model_errors)
                first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
                raise CaptureError(f"{type(cause).__name__}: {first_line}", model_failed) from e
            finally:
                plan.forward = forward
        self.pool = pool
        self.graphs = tuple(graphs)
        self._init = graphs[0].replay
        self._fns = {run: g.replay for run, g in captured.items()}
        return self

    def _capture(self, fn, pool):
        if not self.capture:
            return _EmulatedGraph(fn)
        g = torch.cuda.CUDAGraph()
        # thread_local: another thread's sync or cudaMalloc neither fails nor invalidates this capture
        with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
            fn()
        return g

    def run(self, seed: int, first_sample: int, out: torch.Tensor, flag_out: torch.Tensor, bar=None,
            conditions=None, scale=1.0):
        """Sample one batch into out (B, C, H, W); copy the batch's first-bad-step flag into
        flag_out (a 0-d int64 tensor). Host synchronisation only for progress, per chunk.
        conditions: the batch's Conditioning.batch(...) (guided loops), copied into the static
        buffers with the scale.
        Replays of one model's loops never overlap (they share a pool and the static buffers):
        they are queued under the group's lock, each after the previous one's last copy."""
        plan, group = self.plan, self.group
        with group.replay_lock, _device_ctx(plan.device):
            if group.last_replay is not None:
                torch.cuda.current_stream(plan.device).wait_event(group.last_replay)
            plan.set_rng(seed, first_sample)
            if plan.guide is not None:
                plan.guide.set(conditions, scale)
            self._init()
            pending = collections.deque()
            for run in self.runs:
                self._fns[run]()
                k = run[1]
                if bar is not None:
                    pending.append((_event(plan.device), k))
                    while len(pending) > 1:  # report the chunk before the one just queued
                        ev, done = pending.popleft()
                        if ev is not None:
                            ev.synchronize()
                        bar.update(done)
            out.copy_(plan.x)
            flag_out.copy_(plan.flag)
            group.last_replay = _event(plan.device)
            for ev, done in pending:
                if ev is not None:
                    ev.synchronize()
                bar.update(done)


class _EmulatedGraph:
    """EMULATE_ON_CPU's stand-in for a captured graph: the "capture" runs the body once with
    capturing() true (where a real capture would fail, a test model fails), replay runs it."""

    def __init__(self, fn):
        _emulated.capturing = True
        try:
            fn()
        finally:
            _emulated.capturing = False
        self.replay = fn


_TRANSIENT = ("out of memory", "previous error during capture", "capture invalidated", "captureinvalidated")


def _classify(e: BaseException, model_errors: list) -> tuple[BaseException, bool]:
    """(the error to report, whether the model's own code failed). The model failed when an
    error it raised is in e's chain (torch.cuda.graph's exit may raise its own error on top)
    and is not transient: out of memory, or a capture invalidated from outside (the next CUDA
    call in the model then fails with "operation failed due to a previous error during capture")."""
    chain, x = [], e
    while x is not None and len(chain) < 16:
        chain.append(x)
        x = x.__cause__ or x.__context__
    own = next((x for x in chain if any(x is m for m in model_errors)), None)
    if own is None:
        return e, False
    transient = isinstance(own, torch.cuda.OutOfMemoryError) or any(w in str(own).lower() for w in _TRANSIENT)
    return own, not transient


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


def _stream_ctx(stream):
    return torch.cuda.stream(stream) if stream is not None else _NullCtx()

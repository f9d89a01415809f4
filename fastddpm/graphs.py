"""CUDA-graph captured sampling loops: `fastddpm.sample(..., backend="graph")`, and their
per-model cache.

One loop (static buffers, the init / chunk / tail graphs, warm-up and capture) is
`fastddpm.graph_loop`; this module decides when one is built and keeps it.

A captured loop serves any seed and any batch of a run (both are device data), so it is
built once per (model weights, batch shape, model dtype, schedule, step options, K) and
cached on the model (weakly: it goes when the model goes). A key holds the addresses of
the model's parameters and buffers: moving or replacing them (`model.to(...)`,
`load_state_dict` into new tensors) misses the cache and drops the stale entries. Weights
updated in place (an optimizer step, `copy_`) are seen by the next replay, as in eager
mode. Python-level state a model's forward branches on (a flag attribute, say) is frozen
at capture: call `clear_cache(model)` after changing it.

Memory: all of a model's loops (up to MAX_ENTRIES: batch shapes, schedules, dtypes) capture
into ONE pool. What a capture allocates there is temporaries of the loop body (activations,
model outputs); a loop's state lives in static buffers outside the pool, so loops may reuse
one another's blocks as long as their replays never overlap (one lock per model, and an event
orders them across streams). Peak device memory of a model's loops: one pool as large as the
largest loop's activations + per loop its state (B*C*H*W*4 + 8*B + 32 bytes) + the eager
warm-up's activations in the ordinary cache. The short last batch of a call (b = n % batch_size
samples) gets its own loop in that pool: it adds b*C*H*W*4 bytes of state, not a second set of
activations. (Padding it to the full batch would waste (B - b) * S rows of model compute per
call.) These follow from the caching allocator's pool semantics; the test marked gpu measures
the pools with torch.cuda.memory_snapshot (no GPU figure was taken where this was written).

Builds are serialised per model (two threads sampling one model capture once; the second
waits and replays the first's loop); captures run one at a time in the process
(fastddpm.graph_loop).

If the capture fails, `sample` falls back to the fused eager loop with a warning
(backend="auto") or raises (backend="graph"). The failure is remembered for that key only
when the model's own code failed (it synchronises with the host, branches on tensor values,
copies from host memory); a transient failure (out of memory, a capture invalidated from
outside) is not cached: the next call captures again.
"""
from __future__ import annotations

import collections
import hashlib
import threading
import warnings
import weakref

import torch
from torch import nn

from .graph_loop import CaptureError, GraphLoop, LoopPlan, SigmaLoopPlan, StaticGuide
from .graph_loop import capturing  # noqa: F401 - public here too: models and tests ask fastddpm.graphs

__all__ = ["supported", "clear_cache", "CaptureError", "CHUNK_STEPS"]

CHUNK_STEPS = 10        # steps per replayed graph (see fastddpm.graph_loop's docstring)
MAX_ENTRIES = 4         # cached loops per model (batch sizes, dtypes, schedules...), least recently used go
EMULATE_ON_CPU = False  # tests: run the graph loop's body eagerly on the CPU, without capturing

_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> _ModelGraphs
# models that cannot be weakly referenced: id -> (model, graphs); the model is held so its id stays unique
_strong_cache: "collections.OrderedDict" = collections.OrderedDict()
_lock = threading.Lock()          # guards the two dicts above and every _ModelGraphs.loops


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
    group = _group(model, create=False)
    return 0 if group is None else len(group.loops)


# ---------------------------------------------------------------------------------- cache
def _schedule_key(s) -> str:
    h = hashlib.sha1()
    h.update(s.alphas_cumprod.numpy().tobytes())
    h.update(s.timesteps.numpy().tobytes())
    h.update(str(s.num_train_timesteps).encode())
    return h.hexdigest()


def _options_key(opts) -> tuple:
    """The loop options as a key; a sigma method's SigmaPlan by the digest of its tables."""
    return tuple(sorted((k, v.key() if k == "plan" else v) for k, v in opts.items()))


def _weights_key(model) -> tuple:
    if not isinstance(model, nn.Module):
        return ()
    # once per batch: one walk over the modules (model.parameters() + buffers() walk twice)
    return tuple((t.data_ptr(), t.shape, t.dtype) for mod in model.modules()
                 for group in (mod._parameters, mod._buffers) for t in group.values() if t is not None)


class _ModelGraphs:
    """One model's captured loops (key -> GraphLoop, or the CaptureError of a configuration
    whose model code failed; least recently used first), the memory pool they all capture
    into, and the locks that serialise their builds and their replays."""

    def __init__(self):
        self.loops: collections.OrderedDict = collections.OrderedDict()
        self.build_lock = threading.Lock()
        self.replay_lock = threading.Lock()
        self.last_replay = None  # CUDA event after the last replay's final copy
        self._pool = None

    def pool(self, device):
        if self._pool is None:  # EMULATE_ON_CPU: a token, so tests can see that loops share it
            self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else object()
        return self._pool


def _group(model, create: bool):
    with _lock:
        try:
            group = _cache.get(model)
            if group is None and create:
                group = _cache[model] = _ModelGraphs()
        except TypeError:  # not weakly referenceable: a bounded strong cache
            held = _strong_cache.get(id(model))
            if held is None and create:
                held = _strong_cache[id(model)] = (model, _ModelGraphs())
                while len(_strong_cache) > MAX_ENTRIES:
                    _strong_cache.popitem(last=False)
            group = held[1] if held is not None else None
        return group


def _lookup(group, key):
    with _lock:
        hit = group.loops.get(key)
        if hit is not None:
            group.loops.move_to_end(key)
        return hit


def loop_for(model, forward, s, shape, device, opts, extra_key, check_output,
             layout=torch.contiguous_format, guide=None) -> GraphLoop:
    """The cached GraphLoop for this model and configuration, built on a miss (once: a thread
    that misses while another builds waits for it). Raises CaptureError (also for a
    configuration whose model code failed to capture before). guide: (fastddpm.guidance's
    Conditioning, its modes) of a conditioned call: its labels and scale are the loop's device
    data, so the key holds only their structure (graph_loop.StaticGuide.key)."""
    weights = _weights_key(model)
    gkey = StaticGuide.key(*guide, shape[0], device) if guide is not None else None
    key = (weights, tuple(shape), str(device), _schedule_key(s), _options_key(opts), CHUNK_STEPS, extra_key, gkey)
    group = _group(model, create=True)
    hit = _lookup(group, key)
    if hit is None:
        with group.build_lock:
            hit = _lookup(group, key)
            if hit is None:
                plan_type = SigmaLoopPlan if "plan" in opts else LoopPlan
                static = StaticGuide(*guide, shape[0], device) if guide is not None else None
                hit = _build(group, key, weights, plan_type(forward, s, shape, device, opts, layout, static),
                             check_output)
    if isinstance(hit, CaptureError):
        raise hit
    return hit


def _build(group, key, weights, plan, check_output):
    with _lock:  # weights moved or replaced: the loops captured on the old addresses are stale
        for k in [k for k in group.loops if k[0] != weights]:
            del group.loops[k]
    loop = GraphLoop(plan, CHUNK_STEPS, group, capture=plan.device.type == "cuda")
    try:
        loop.build(check_output)
    except CaptureError as e:
        if not e.model_failed:
            raise  # transient (out of memory, invalidated from outside): not cached, the next call retries
        loop = e
    with _lock:
        group.loops[key] = loop
        while len(group.loops) > MAX_ENTRIES:
            group.loops.popitem(last=False)
    return loop


def warn_fallback(err: CaptureError):
    """One warning per failed configuration (per failure when transient)."""
    if not err.reported:
        err.reported = True
        again = "" if err.model_failed else " this time (a transient failure: the next call captures again)"
        warnings.warn(f"fastddpm.sample: the model could not be captured in a CUDA graph ({err}); using "
                      f"backend='fused'{again} (same samples, eager loop). Pass backend='fused' to silence this.",
                      RuntimeWarning, stacklevel=3)

"""backend="graph": the captured sampling loop (fastddpm.graph_loop) and its cache (fastddpm.graphs).

CPU: the loop body the graphs capture (static buffers, step index and noise-stream
arguments in device memory, in-kernel x_T and non-finite flag, chunk + tail cut) runs
eagerly under the Triton interpreter with graphs.EMULATE_ON_CPU, and must give the fused
and reference backends' samples; the cache, the fallback and the argument errors are
checked there too. GPU (@pytest.mark.gpu): the real captures.
"""
import collections
import gc
import threading
import time
import warnings
import weakref

import pytest
import torch
from torch import nn

import fastddpm
from fastddpm import Schedule, graph_loop, graphs
from fastddpm.sampler import resolve_backend
from fastddpm.testing import GaussianDataModel, SelfConditionedModel

SHAPE = (2, 2, 3)
CUDA = torch.cuda.is_available()


def gaussian_model():
    s = Schedule.linear(1000)
    mu = torch.linspace(-0.8, 0.8, 12).reshape(SHAPE)
    sd = torch.linspace(0.2, 1.0, 12).reshape(SHAPE)
    return s, GaussianDataModel(s, mu, sd)


class ConvEps(nn.Module):
    """A small conv model (cheap for Dynamo to trace)."""

    def __init__(self, channels=2):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t):
        return 0.1 * self.conv(x) + (t.float() / 1000).view(-1, 1, 1, 1)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def emulate(monkeypatch):
    """The graph backend on the CPU: same code, run eagerly instead of captured."""
    if CUDA:
        pytest.skip("the GPU runs the real captures (tests marked gpu)")
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    monkeypatch.setattr(graphs, "CHUNK_STEPS", 5)
    graphs.clear_cache()
    yield
    graphs.clear_cache()


# ------------------------------------------------------------------------ CPU (emulated)
@pytest.mark.parametrize("method,eta,variance,use_clipped", [
    ("ddpm", 0.0, "fixed_small", False), ("ddpm", 0.0, "fixed_large", False), ("ddim", 0.0, "fixed_small", False),
    ("ddim", 0.7, "fixed_small", False), ("ddim", 0.7, "fixed_small", True)])
def test_graph_loop_equals_fused_and_reference(emulate, method, eta, variance, use_clipped):
    """12 steps = 2 chunks of 5 + a tail of 2; 5 samples in batches of 3 (the last one short)."""
    s, model = gaussian_model()
    kw = dict(schedule=s, steps=12, method=method, eta=eta, variance=variance, batch_size=3, seed=2**40 + 11,
              sample_offset=5, use_clipped_model_output=use_clipped, clip=0.5)
    runs = {b: fastddpm.sample(model, 5, backend=b, **kw) for b in ("reference", "fused", "graph")}
    assert torch.isfinite(runs["graph"]).all()
    assert rel(runs["graph"], runs["fused"]) < 1e-5
    assert rel(runs["graph"], runs["reference"]) < 1e-5


def test_graph_loop_on_a_unet_with_learned_range_and_channels_last(emulate):
    m = fastddpm.UNet.from_preset("tiny", out_channels=6).eval()
    kw = dict(steps=6, seed=1, variance="learned_range", batch_size=2)
    ref = fastddpm.sample(m, 3, backend="reference", **kw)
    assert rel(fastddpm.sample(m, 3, backend="graph", **kw), ref) < 1e-5
    m = m.to(memory_format=torch.channels_last)
    assert rel(fastddpm.sample(m, 3, backend="graph", **kw), ref) < 1e-5


class SelfConditionedUNet(nn.Module):
    """denoising-diffusion-pytorch's self-conditioning on our U-Net: cat(x_self_cond, x) in."""

    self_condition = True

    def __init__(self):
        super().__init__()
        self.unet = fastddpm.UNet.from_preset("tiny", in_channels=6, out_channels=3)
        self.config = type("Cfg", (), dict(in_channels=3, image_size=16))

    def forward(self, x, t, x_self_cond):
        return self.unet(torch.cat((x_self_cond, x), dim=1), t)


@pytest.mark.parametrize("method,eta,use_clipped", [("ddpm", 0.0, False), ("ddim", 0.7, True)])
def test_graph_loop_self_condition_keeps_x0_in_a_static_buffer(emulate, method, eta, use_clipped):
    """The previous x0 crosses chunk boundaries (12 steps = 5 + 5 + 2) through LoopPlan.x0."""
    s, base = gaussian_model()
    model = SelfConditionedModel(base)
    kw = dict(schedule=s, steps=12, method=method, eta=eta, clip=0.5, batch_size=3, seed=5, self_condition=True,
              use_clipped_model_output=use_clipped)
    runs = {b: fastddpm.sample(model, 5, backend=b, **kw) for b in ("reference", "fused", "graph")}
    assert rel(runs["graph"], runs["reference"]) < 1e-5
    assert rel(runs["fused"], runs["reference"]) < 1e-5


def test_graph_loop_self_condition_on_a_channels_last_unet(emulate):
    m = SelfConditionedUNet().eval()
    kw = dict(steps=6, seed=1, batch_size=2, self_condition=True)
    ref = fastddpm.sample(m, 3, backend="reference", **kw)
    m = m.to(memory_format=torch.channels_last)
    assert rel(fastddpm.sample(m, 3, backend="graph", **kw), ref) < 1e-5
    assert rel(fastddpm.sample(m, 3, backend="fused", **kw), ref) < 1e-5


def test_graph_loop_on_a_diffusers_unet2dmodel(emulate):
    m = small_diffusers_unet().eval()
    for kw in (dict(method="ddpm"), dict(method="ddim", eta=0.0)):
        kw.update(steps=4, seed=6, batch_size=2)
        ref = fastddpm.sample(m, 3, backend="reference", **kw)
        assert rel(fastddpm.sample(m, 3, backend="graph", **kw), ref) < 1e-5


def test_sample_i_is_the_same_in_any_batch(emulate):
    s, model = gaussian_model()
    a = fastddpm.sample(model, 5, schedule=s, steps=6, seed=9, backend="graph")
    b = fastddpm.sample(model, 5, schedule=s, steps=6, seed=9, backend="graph", batch_size=3)
    c = fastddpm.sample(model, 2, schedule=s, steps=6, seed=9, backend="graph", sample_offset=3)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c, a[3:], rtol=1e-6, atol=1e-6)


def test_auto_is_graph_where_graphs_run():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", cpu) == "reference"
    assert resolve_backend("auto", cuda) == "graph"  # decided without touching a GPU
    assert resolve_backend("auto", cuda, generator=torch.Generator()) == "fused"
    with pytest.raises(ValueError, match="backend='graph' is not available here: needs a CUDA device"):
        resolve_backend("graph", cpu)
    with pytest.raises(ValueError, match="generator= noise needs backend='fused'"):
        resolve_backend("graph", cuda, generator=torch.Generator())


def test_argument_errors():
    s, model = gaussian_model()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        fastddpm.sample(model, 2, schedule=s, steps=3, backend="graph")
    with pytest.raises(TypeError, match="compile must be True or False; got 'yes'"):
        fastddpm.sample(model, 2, schedule=s, steps=3, compile="yes")


def test_cache_reuse_invalidation_and_bound(emulate, monkeypatch):
    builds = []
    real_build = graphs.GraphLoop.build

    def counting_build(self, check):
        builds.append(self.plan.x.shape)
        return real_build(self, check)

    monkeypatch.setattr(graphs.GraphLoop, "build", counting_build)
    m = fastddpm.UNet.from_preset("tiny").eval()
    kw = dict(steps=3, seed=0, backend="graph")
    a = fastddpm.sample(m, 2, **kw)
    b = fastddpm.sample(m, 2, **{**kw, "seed": 1})  # another seed: the same loop
    assert len(builds) == 1 and graphs.cached_entries(m) == 1
    assert rel(a, b) > 0.1
    fastddpm.sample(m, 2, **{**kw, "steps": 4})  # another schedule
    fastddpm.sample(m, 2, **{**kw, "method": "ddim"})  # other options
    fastddpm.sample(m, 3, **kw)  # another batch shape
    assert len(builds) == 4 and graphs.cached_entries(m) == 4
    # in-place weight updates are seen by the cached loop (as by the captured graph's addresses)
    with torch.no_grad():
        m.conv_out.weight.mul_(2)
    c = fastddpm.sample(m, 2, **kw)
    assert len(builds) == 4
    assert rel(c, fastddpm.sample(m, 2, **{**kw, "backend": "reference"})) < 1e-5
    # replaced weights (new addresses) miss the cache and drop every stale loop
    m.conv_out.weight = nn.Parameter(m.conv_out.weight.detach().clone())
    fastddpm.sample(m, 2, **kw)
    assert len(builds) == 5 and graphs.cached_entries(m) == 1
    for k in range(graphs.MAX_ENTRIES + 2):  # bounded
        fastddpm.sample(m, 1, **{**kw, "steps": 2 + k})
    assert graphs.cached_entries(m) == graphs.MAX_ENTRIES
    graphs.clear_cache(m)
    assert graphs.cached_entries(m) == 0


def test_cache_does_not_keep_the_model_alive(emulate, monkeypatch):
    from fastddpm import model_call

    monkeypatch.setattr(model_call, "COMPILE_BACKEND", "eager")  # Dynamo's own caches are covered too
    m = ConvEps()
    fastddpm.sample(m, 2, shape=(2, 5, 7), steps=2, backend="graph")
    fastddpm.sample(m, 2, shape=(2, 5, 7), steps=2, backend="graph", compile=True)
    assert graphs.cached_entries(m) == 2
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None
    torch._dynamo.reset()


def test_capture_failure_falls_back_with_one_warning(emulate, monkeypatch):
    builds = []

    def failing_build(self, check):
        builds.append(1)
        raise graphs.CaptureError("RuntimeError: operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs.GraphLoop, "build", failing_build)
    monkeypatch.setattr(graphs, "supported", lambda device: (True, ""))  # 'auto' picks graph on the CPU
    s, model = gaussian_model()
    kw = dict(schedule=s, steps=6, seed=3, batch_size=2)
    fused = fastddpm.sample(model, 3, backend="fused", **kw)
    with pytest.warns(RuntimeWarning, match="could not be captured.*operation not permitted.*backend='fused'"):
        got = fastddpm.sample(model, 3, backend="auto", **kw)
    torch.testing.assert_close(got, fused, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: no second warning, no second capture
        fastddpm.sample(model, 3, backend="auto", **kw)
    assert len(builds) == 1
    with pytest.raises(RuntimeError, match="backend='graph': the model could not be captured.*use backend='fused'"):
        fastddpm.sample(model, 3, backend="graph", **kw)


@pytest.fixture
def serial_interpreter(monkeypatch):
    """The Triton interpreter is not thread-safe (one global grid index, triton.language patched
    per launch): tests with threads run its launches one at a time. GPU launches need no lock."""
    from triton.runtime import interpreter

    lock, real = threading.RLock(), interpreter.GridExecutor.__call__

    def serial(self, *args, **kwargs):
        with lock:
            return real(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", serial)


def test_two_threads_sampling_one_model_capture_once(emulate, serial_interpreter, monkeypatch):
    s, model = gaussian_model()
    kw = dict(schedule=s, steps=7, batch_size=2, backend="graph")
    alone = {seed: fastddpm.sample(model, 3, seed=seed, **kw) for seed in (1, 2)}
    graphs.clear_cache()
    builds, real_build = [], graphs.GraphLoop.build

    def slow_build(self, check):
        builds.append(self.plan.x.shape[0])
        time.sleep(0.3)  # the other thread arrives while this one builds
        return real_build(self, check)

    monkeypatch.setattr(graphs.GraphLoop, "build", slow_build)
    barrier, results, errors = threading.Barrier(2), {}, []

    def worker(seed):
        try:
            barrier.wait()
            results[seed] = fastddpm.sample(model, 3, seed=seed, **kw)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert sorted(builds) == [1, 2]  # the batch of 2 and the short batch of 1, each built once
    for seed in (1, 2):
        torch.testing.assert_close(results[seed], alone[seed], rtol=0, atol=0)


class FailsInCapture(nn.Module):
    """`inner`, but raising make_error() while a graph is captured, the first `times` times."""

    def __init__(self, inner, make_error, times):
        super().__init__()
        self.inner, self.make_error, self.times, self.failures = inner, make_error, times, 0

    def forward(self, x, t):
        if graphs.capturing() and self.failures < self.times:
            self.failures += 1
            raise self.make_error()
        return self.inner(x, t)


def test_a_failure_is_cached_only_when_the_models_own_code_failed(emulate, monkeypatch):
    monkeypatch.setattr(graphs, "supported", lambda device: (True, ""))  # 'auto' picks graph on the CPU
    s, inner = gaussian_model()
    kw = dict(shape=SHAPE, schedule=s, steps=6, seed=3, batch_size=3, backend="auto")
    fused = fastddpm.sample(inner, 3, **{**kw, "backend": "fused"})
    # the model syncs with the host: it cannot be captured, and that is remembered
    syncs = "CUDA error: operation not permitted when stream is capturing"
    m = FailsInCapture(inner, lambda: RuntimeError(syncs), 9)
    with pytest.warns(RuntimeWarning, match=f"could not be captured in a CUDA graph .RuntimeError: {syncs}"):
        torch.testing.assert_close(fastddpm.sample(m, 3, **kw), fused, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastddpm.sample(m, 3, **kw)
    assert m.failures == 1
    # transient: a capture invalidated from outside, out of memory: not remembered, captured next call
    for make_error in (lambda: RuntimeError("CUDA error: operation failed due to a previous error during capture"),
                       lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        graphs.clear_cache()
        m = FailsInCapture(inner, make_error, 1)
        with pytest.warns(RuntimeWarning, match="this time .a transient failure: the next call captures again"):
            torch.testing.assert_close(fastddpm.sample(m, 3, **kw), fused, rtol=0, atol=0)
        assert graphs.cached_entries(m) == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = fastddpm.sample(m, 3, **kw)
        assert graphs.cached_entries(m) == 1 and m.failures == 1
        assert rel(got, fused) < 1e-6


def test_a_model_error_under_the_capture_exit_error_is_the_models():
    own = RuntimeError("CUDA error: operation not permitted when stream is capturing")
    try:
        try:
            raise own
        except RuntimeError:  # what torch.cuda.graph's exit raises on top of it
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")  # noqa: B904
    except RuntimeError as e:
        outer = e
    assert graph_loop._classify(outer, [own]) == (own, True)
    assert graph_loop._classify(outer, []) == (outer, False)  # not the model's code: transient
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert graph_loop._classify(oom, [oom]) == (oom, False)


def test_a_models_loops_share_one_pool(emulate):
    s, model = gaussian_model()
    fastddpm.sample(model, 5, schedule=s, steps=4, batch_size=3, seed=0, backend="graph")  # batch 3, short 2
    fastddpm.sample(model, 2, schedule=s, steps=5, seed=0, backend="graph")  # another schedule
    loops = list(graphs._group(model, create=False).loops.values())
    assert len(loops) == 3 and len({id(loop.pool) for loop in loops}) == 1
    other = gaussian_model()[1]
    fastddpm.sample(other, 2, schedule=s, steps=4, seed=0, backend="graph")
    assert next(iter(graphs._group(other, create=False).loops.values())).pool is not loops[0].pool


def test_non_finite_state_raises_with_step_and_batch(emulate):
    s = Schedule.linear(20)

    def model(x, t):
        bad = (t == 8).view(-1, 1, 1, 1) & (torch.arange(x.shape[0]) == 1).view(-1, 1, 1, 1)
        return torch.where(bad, torch.full_like(x, float("nan")), torch.zeros_like(x))

    # every batch has a sample 1 (global samples 1 and 3): the first batch is reported
    with pytest.raises(FloatingPointError, match="step 8 .timestep 8. in the batch starting at sample 0"):
        fastddpm.sample(model, 4, shape=(1, 4, 4), schedule=s, batch_size=2, backend="graph")


def test_progress_is_reported_per_chunk(emulate, capsys):
    s, model = gaussian_model()
    fastddpm.sample(model, 3, schedule=s, steps=12, batch_size=2, backend="graph", progress=True)
    assert "24/24" in capsys.readouterr().err


def test_bf16_model_dtype_under_the_graph_loop(emulate):
    m = fastddpm.UNet.from_preset("tiny").eval()
    kw = dict(steps=3, seed=4, dtype=torch.bfloat16)
    ref = fastddpm.sample(m, 2, backend="reference", **kw)
    got = fastddpm.sample(m, 2, backend="graph", **kw)
    assert got.dtype == torch.float32 and rel(got, ref) < 1e-2


# ---------------------------------------------------------------------------------- GPU
def small_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(32, 64), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def gpu_model(name):
    torch.manual_seed(0)
    m = fastddpm.UNet.from_preset("tiny") if name == "fastddpm" else small_diffusers_unet()
    return m.cuda().eval()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fastddpm", "diffusers"])
@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_gpu_graph_fused_reference_agree(name, method, eta):
    """graph vs fused in seed mode; fused vs reference with the same generator noise.
    10 steps keep DDIM(eta=0) on a random U-Net well inside float32's reach (DESIGN.md)."""
    graphs.clear_cache()
    m = gpu_model(name)
    kw = dict(steps=10, method=method, eta=eta, batch_size=3)
    g = fastddpm.sample(m, 5, backend="graph", seed=7, **kw)
    f = fastddpm.sample(m, 5, backend="fused", seed=7, **kw)
    assert torch.isfinite(g).all() and rel(g, f) < 1e-4, rel(g, f)
    auto = fastddpm.sample(m, 5, backend="auto", seed=7, **kw)
    assert rel(auto, g) < 1e-6
    gen = lambda: torch.Generator(device="cuda").manual_seed(7)  # noqa: E731
    f = fastddpm.sample(m, 5, backend="fused", generator=gen(), **kw)
    r = fastddpm.sample(m, 5, backend="reference", generator=gen(), **kw)
    assert rel(f, r) < 1e-4, rel(f, r)
    assert graphs.cached_entries(m) == 2  # batch 3 and the last batch of 2


@pytest.mark.gpu
def test_gpu_second_call_replays_the_cached_graph(monkeypatch):
    graphs.clear_cache()
    m = gpu_model("fastddpm")
    fastddpm.sample(m, 4, steps=12, backend="graph", seed=0)
    monkeypatch.setattr(graphs.GraphLoop, "build", lambda *a: pytest.fail("captured again"))
    a = fastddpm.sample(m, 4, steps=12, backend="graph", seed=1)
    b = fastddpm.sample(m, 4, steps=12, backend="fused", seed=1)
    assert rel(a, b) < 1e-4
    loop = next(v for v in graphs._cache[m].loops.values())
    assert len(loop.graphs) == 3  # init, chunk of 10, tail of 2


@pytest.mark.gpu
def test_gpu_memory_does_not_grow_over_calls():
    graphs.clear_cache()
    m = gpu_model("fastddpm")
    for _ in range(2):
        fastddpm.sample(m, 8, steps=10, backend="graph", seed=0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for k in range(5):
        x = fastddpm.sample(m, 8, steps=10, backend="graph", seed=k)
        del x
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


@pytest.mark.gpu
def test_gpu_uncapturable_model_falls_back_with_a_warning():
    graphs.clear_cache()
    inner = gpu_model("fastddpm")

    class Syncing(nn.Module):  # branches on a tensor value: a host sync, not capturable
        def __init__(self):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def forward(self, x, t):
            out = self.inner(x, t)
            return out if float(out.abs().max()) < 1e9 else out * 0

    m = Syncing()
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        got = fastddpm.sample(m, 3, steps=5, seed=2)
    assert rel(got, fastddpm.sample(m, 3, steps=5, seed=2, backend="fused")) < 1e-6
    with pytest.raises(RuntimeError, match="backend='graph'"):
        fastddpm.sample(m, 3, steps=5, seed=2, backend="graph")
    # the device is still usable after the failed capture
    assert rel(fastddpm.sample(inner, 3, steps=5, seed=2), fastddpm.sample(inner, 3, steps=5, seed=2,
                                                                          backend="fused")) < 1e-4


@pytest.mark.gpu
def test_gpu_compile_and_half_precision():
    graphs.clear_cache()
    m = gpu_model("fastddpm")
    kw = dict(steps=10, seed=3, batch_size=4)
    f = fastddpm.sample(m, 4, backend="fused", **kw)
    c = fastddpm.sample(m, 4, backend="graph", compile=True, **kw)
    assert rel(c, f) < 1e-3, rel(c, f)  # inductor may reassociate float32 sums
    for dtype in (torch.bfloat16, torch.float16):
        f = fastddpm.sample(m, 4, backend="fused", dtype=dtype, **kw)
        g = fastddpm.sample(m, 4, backend="graph", dtype=dtype, **kw)
        assert g.dtype == torch.float32 and rel(g, f) < 1e-2, (dtype, rel(g, f))


@pytest.mark.gpu
def test_gpu_non_finite_is_caught_inside_the_graph():
    graphs.clear_cache()
    s = Schedule.linear(100)

    def model(x, t):
        return torch.where((t == 40).view(-1, 1, 1, 1), torch.full_like(x, float("nan")), torch.zeros_like(x))

    with pytest.raises(FloatingPointError, match="step 40"):
        fastddpm.sample(model, 2, shape=(1, 4, 4), schedule=s, backend="graph", device="cuda")


def _pool_bytes():
    """Bytes reserved in CUDA-graph private pools, by pool id."""
    by_pool = collections.Counter()
    for seg in torch.cuda.memory_snapshot():
        pool = tuple(seg.get("segment_pool_id", (0, 0)))
        if pool != (0, 0):
            by_pool[pool] += seg["total_size"]
    return by_pool


@pytest.mark.gpu
def test_gpu_short_last_batch_captures_into_the_same_pool():
    """31 samples in batches of 16: the short batch of 15 gets its own loop, whose activations
    fit in the pool the batch of 16 already holds (a pool per loop nearly doubled it)."""
    graphs.clear_cache()
    torch.cuda.empty_cache()
    m = gpu_model("fastddpm")
    kw = dict(steps=10, seed=0, batch_size=16, backend="graph")
    full = fastddpm.sample(m, 16, **kw)
    one = _pool_bytes()
    both = fastddpm.sample(m, 31, **kw)
    two = _pool_bytes()
    assert graphs.cached_entries(m) == 2
    assert len(one) == 1 and len(two) == 1, (one, two)
    assert sum(two.values()) <= 1.1 * sum(one.values()) + 2**21, (one, two)
    assert rel(both[:16], full) < 1e-6


@pytest.mark.gpu
def test_gpu_two_threads_sampling_one_model_capture_once(monkeypatch):
    graphs.clear_cache()
    m = gpu_model("fastddpm")
    kw = dict(steps=12, batch_size=4, backend="graph")
    alone = {seed: fastddpm.sample(m, 6, seed=seed, **kw) for seed in (1, 2)}
    graphs.clear_cache()
    builds, real_build = [], graphs.GraphLoop.build
    monkeypatch.setattr(graphs.GraphLoop, "build", lambda self, check: builds.append(1) or real_build(self, check))
    barrier, results, errors = threading.Barrier(2), {}, []

    def worker(seed):
        try:
            barrier.wait()
            results[seed] = fastddpm.sample(m, 6, seed=seed, **kw)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(builds) == 2  # batch 4 and the short batch of 2, once each
    for seed in (1, 2):
        assert rel(results[seed], alone[seed]) < 1e-6


@pytest.mark.gpu
def test_gpu_graph_self_condition_and_use_clipped_model_output():
    """The captured loop with the static x0 buffer (self_condition) and the USE_CLIPPED kernel."""
    graphs.clear_cache()
    torch.manual_seed(0)
    m = SelfConditionedUNet().cuda().eval()
    for kw in (dict(method="ddpm"), dict(method="ddim", eta=0.0, use_clipped_model_output=True)):
        kw.update(steps=10, batch_size=3, seed=7, self_condition=True)
        g = fastddpm.sample(m, 5, backend="graph", **kw)
        f = fastddpm.sample(m, 5, backend="fused", **kw)
        r = fastddpm.sample(m, 5, backend="reference", **kw)
        assert torch.isfinite(g).all() and rel(g, f) < 1e-4 and rel(f, r) < 1e-4, (rel(g, f), rel(f, r))

"""Sampling: ms/step and images/s per backend and per peer, on the same model in the same run.

DPM-Solver++ rows (test_dpm_solver_sampling) compare against diffusers' DPMSolverMultistepScheduler
loop and project the wall time of 50,000 samples at 20 steps.

Contenders: fastddpm's reference, fused and graph backends, graph with compile=True, a
plain diffusers DDPMScheduler loop over the same model (the baseline), and (GPU)
torch.compile(mode="reduce-overhead") of the model with diffusers' step. The sampler
overhead is the step time minus the model's own forward time at the same batch, that
forward replayed from a captured CUDA graph on a GPU (its launch-free time).
GPU: fastddpm's ddpm-cifar10 preset and a diffusers UNet2DModel of the same architecture,
batch 1, 16, 128. CPU: the tiny preset, batch 1 and 4, so the suite runs in CI.

The "graph chunk" group measures how the loop is cut into graphs (K steps per replayed
graph; K = STEPS is the whole loop in one graph) at batch 1, where launch costs dominate.
torch.compile rows take minutes to compile on a GPU: FASTDDPM_BENCH_COMPILE=0 skips them.
"""
import os

import pytest
import torch

import fastddpm
from harness import CUDA, DEVICE, median_seconds, run_rounds

BATCHES = [1, 16, 128] if CUDA else [1, 4]
STEPS = 50 if CUDA else 3  # DDIM-50-like calls: per-call costs amortised as in use
BACKENDS = ["reference", "fused", "graph", "graph+compile"]
COMPILE = os.environ.get("FASTDDPM_BENCH_COMPILE", "1") != "0"


def build(model_name):
    if model_name == "fastddpm-unet":
        m = fastddpm.UNet.from_preset("ddpm-cifar10" if CUDA else "tiny")
    else:
        diffusers = pytest.importorskip("diffusers")
        if CUDA:
            m = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                                      block_out_channels=(128, 256, 256, 256),
                                      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                                      up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
        else:
            m = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                      block_out_channels=(32, 64), norm_num_groups=8,
                                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                      up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return m.to(DEVICE).eval()


_MODELS = {}
_FORWARD = {}


def forward_seconds(name, model, batch):
    """The model's own forward time at this batch: replayed from a captured CUDA graph on a GPU
    (no launch overhead), eager on the CPU."""
    if (name, batch) not in _FORWARD:
        x = torch.randn((batch, *shape_of(model)), device=DEVICE)
        t = torch.full((batch,), 500, device=DEVICE)
        with torch.no_grad():
            fn = lambda: model(x, t)  # noqa: E731
            if CUDA:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        fn()
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                fn = g.replay
            _FORWARD[name, batch] = median_seconds(fn)
    return _FORWARD[name, batch]


def model_for(name):
    if name not in _MODELS:
        _MODELS[name] = build(name)
    return _MODELS[name]


def shape_of(m):
    cfg = m.config
    size = getattr(cfg, "image_size", None) or cfg.sample_size
    return (cfg.in_channels, size, size)


def diffusers_loop(model, batch, steps, compiled=None):
    import diffusers

    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    fwd = compiled or model
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def loop():
        x = torch.randn((batch, *shape_of(model)), device=DEVICE, generator=gen)
        with torch.no_grad():
            for t in sched.timesteps:
                out = fwd(x, t.to(DEVICE).expand(batch))
                out = out.sample if hasattr(out, "sample") else out
                x = sched.step(out, t, x, generator=gen).prev_sample
        return x

    return loop


def skip_unless_runnable(contender):
    if contender.startswith("graph"):
        try:
            fastddpm.sampler.resolve_backend("graph", DEVICE)
        except ValueError as e:
            pytest.skip(str(e))
    if "compile" in contender:
        if not CUDA:
            pytest.skip("torch.compile rows are measured on GPUs only (CPU compile takes minutes per model)")
        if not COMPILE:
            pytest.skip("FASTDDPM_BENCH_COMPILE=0")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model_name", ["fastddpm-unet", "diffusers-unet2d"])
@pytest.mark.parametrize("contender", BACKENDS + ["diffusers_loop", "compile_reduce_overhead+diffusers"])
def test_sampling(benchmark, record, model_name, batch, contender):
    skip_unless_runnable(contender)
    model = model_for(model_name)
    shape = shape_of(model)
    if contender == "compile_reduce_overhead+diffusers":
        pytest.importorskip("diffusers")
        fn = diffusers_loop(model, batch, STEPS, torch.compile(model, mode="reduce-overhead"))
    elif contender == "diffusers_loop":
        pytest.importorskip("diffusers")
        fn = diffusers_loop(model, batch, STEPS)
    else:
        backend, _, comp = contender.partition("+")
        fn = lambda: fastddpm.sample(model, batch, shape=shape, steps=STEPS, backend=backend,  # noqa: E731
                                     compile=bool(comp), seed=0)
    sec = run_rounds(benchmark, [fn], calls_per_round=1, rounds=5 if CUDA else 2)
    ms_step = 1e3 * sec / STEPS
    figs = dict(ms_per_step=ms_step, images_per_s=batch / sec, steps=STEPS)
    if contender in BACKENDS:  # the sampler's overhead over the model's own forward at this batch
        fwd_ms = 1e3 * forward_seconds(model_name, model, batch)
        figs.update(model_ms=fwd_ms, overhead_ms=ms_step - fwd_ms, overhead_pct=100 * (ms_step - fwd_ms) / fwd_ms)
    record(f"sample {model_name} b{batch}", contender, sec, baseline=contender == "diffusers_loop", **figs)


@pytest.mark.parametrize("chunk", [1, 10, STEPS])
def test_graph_chunk(benchmark, record, monkeypatch, chunk):
    """How the loop is cut: K steps per replayed graph (K = STEPS: the whole loop, one graph)."""
    skip_unless_runnable("graph")
    from fastddpm import graphs

    monkeypatch.setattr(graphs, "CHUNK_STEPS", chunk)
    model = model_for("fastddpm-unet")
    shape = shape_of(model)
    fn = lambda: fastddpm.sample(model, 1, shape=shape, steps=STEPS, backend="graph", seed=0)  # noqa: E731
    import time

    t0 = time.perf_counter()
    fn()  # the capture of this cut (the cache holds one loop per K)
    first = time.perf_counter() - t0
    sec = run_rounds(benchmark, [fn], calls_per_round=1, rounds=5 if CUDA else 2)
    record("graph chunk b1", f"K={chunk}", sec, baseline=chunk == 1, ms_per_step=1e3 * sec / STEPS,
           first_call_s=first, steps=STEPS)


# ------------------------------------------------------------------ DPM-Solver++ (few-step sampling)
DPM_BATCHES = [1, 16, 128] if CUDA else [1, 4]
DPM_STEPS = 20 if CUDA else 3  # the step count DPM-Solver++ is used at (CPU: 3, so CI stays short)
FID_SAMPLES, FID_STEPS = 50_000, 20


def diffusers_dpm_loop(model, batch, steps):
    import diffusers

    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000)
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def loop():
        sched.set_timesteps(steps)  # resets its step index and stored model outputs, as a pipeline call does
        x = torch.randn((batch, *shape_of(model)), device=DEVICE, generator=gen)
        with torch.no_grad():
            for t in sched.timesteps:
                out = model(x, t.to(DEVICE).expand(batch))
                out = out.sample if hasattr(out, "sample") else out
                x = sched.step(out, t, x, generator=gen).prev_sample
        return x

    return loop


@pytest.mark.parametrize("batch", DPM_BATCHES)
@pytest.mark.parametrize("contender", ["reference", "fused", "graph", "diffusers_dpm_loop"])
def test_dpm_solver_sampling(benchmark, record, batch, contender):
    """DPM-Solver++ (2M, method="dpmsolver++") ms/step per backend against diffusers'
    DPMSolverMultistepScheduler loop over the same model, and the projected wall time of
    50,000 samples at 20 steps at this batch (ms/step x 20 x ceil(50,000 / batch))."""
    skip_unless_runnable(contender)
    model = model_for("fastddpm-unet")
    shape = shape_of(model)
    if contender == "diffusers_dpm_loop":
        pytest.importorskip("diffusers")
        fn = diffusers_dpm_loop(model, batch, DPM_STEPS)
    else:
        fn = lambda: fastddpm.sample(model, batch, shape=shape, steps=DPM_STEPS, method="dpmsolver++",  # noqa: E731
                                     backend=contender, seed=0)
    sec = run_rounds(benchmark, [fn], calls_per_round=1, rounds=5 if CUDA else 2)
    ms_step = 1e3 * sec / DPM_STEPS
    batches = -(-FID_SAMPLES // batch)
    record(f"dpmsolver++ b{batch}", contender, sec, baseline=contender == "diffusers_dpm_loop",
           ms_per_step=ms_step, images_per_s=batch / sec, steps=DPM_STEPS,
           projected_50k_at_20_steps_s=ms_step * FID_STEPS * batches / 1e3)

"""Classifier-free guidance (issue 22): ms per step of guided sampling (w = 4) against a
hand-written diffusers guidance loop and against fastddpm's own unguided step, on the same model.

The model: a diffusers UNet2DModel with num_class_embeds = K + 1 (labels 0..K-1, K = 10, the
null class K), which both loops call under its own keyword class_labels. Contenders, per batch
of B images:
  diffusers_cfg_loop (baseline)  the guidance loop of diffusers' class-conditional pipelines
                                 (DiTPipeline's structure): cat([x, x]) and cat([labels, null]),
                                 one model call on 2B rows, split, out_u + w (out_c - out_u),
                                 DDIMScheduler.step on the B rows
  <backend> w=4                  fastddpm.sample(method="ddim", class_labels=..., guidance_scale=4,
                                 null_class=K): the same doubled call, the combine inside the fused
                                 step kernel (fused, graph) or in PyTorch (reference)
  <backend> w=1                  the same call unguided (guidance_scale=1: one conditional call on
                                 B rows): what guidance costs over plain conditional sampling
                                 (vs_unguided = the w=4 row's time over the w=1 row's, measured
                                 just before it; about 2 where the model dominates)
graph rows: CUDA only. GPU: a ddpm-cifar10-sized UNet2DModel (35.7M parameters + the label
embedding), batch 1, 16, 128, 20 steps. CPU: a small UNet2DModel (16x16), batch 1 and 4, 3
steps, fused at batch 1 only (Triton's interpreter: its CPU time says nothing about GPU speed),
so that this file runs in CI in seconds. Timing never decides pass or fail.
"""
import pytest
import torch

import fastddpm
from harness import CUDA, DEVICE, run_rounds

diffusers = pytest.importorskip("diffusers")

K = 10  # classes; label K is the null class
W = 4.0
BATCHES = [1, 16, 128] if CUDA else [1, 4]
STEPS = 20 if CUDA else 3
CONTENDERS = ["diffusers_cfg_loop", "reference w=1", "reference w=4", "fused w=1", "fused w=4", "graph w=1",
              "graph w=4"]

_MODEL = []
_UNGUIDED = {}  # (backend, batch) -> seconds of the w=1 row


def model():
    if not _MODEL:
        torch.manual_seed(0)
        if CUDA:
            m = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                                      block_out_channels=(128, 256, 256, 256), num_class_embeds=K + 1,
                                      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                                      up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
        else:
            m = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                      block_out_channels=(32, 64), norm_num_groups=8, num_class_embeds=K + 1,
                                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                      up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        _MODEL.append(m.to(DEVICE).eval())
    return _MODEL[0]


def shape_of(m):
    return (m.config.in_channels, m.config.sample_size, m.config.sample_size)


def labels_of(batch):
    return torch.arange(batch, device=DEVICE) % K


def diffusers_cfg_loop(m, batch, steps, w):
    """diffusers' class-conditional guidance loop (DiTPipeline's structure), DDIM steps."""
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    labels = labels_of(batch)
    labels_in = torch.cat([labels, torch.full_like(labels, K)])  # conditional rows first, then the null class

    def loop():
        sched.set_timesteps(steps)
        x = torch.randn((batch, *shape_of(m)), device=DEVICE, generator=gen)
        with torch.no_grad():
            for t in sched.timesteps:
                x_in = torch.cat([x, x])
                out = m(x_in, t.to(DEVICE).expand(2 * batch), class_labels=labels_in).sample
                out_c, out_u = out.split(batch)
                out = out_u + w * (out_c - out_u)
                x = sched.step(out, t, x).prev_sample
        return x

    return loop


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("contender", CONTENDERS)
def test_guided_sampling(benchmark, record, contender, batch):
    backend, _, w = contender.partition(" w=")
    if backend == "graph":
        try:
            fastddpm.sampler.resolve_backend("graph", DEVICE)
        except ValueError as e:
            pytest.skip(str(e))
    if backend == "fused" and not CUDA and batch > 1:
        pytest.skip("fused on the CPU runs under Triton's interpreter: batch 1 only")
    m = model()
    if backend == "diffusers_cfg_loop":
        fn = diffusers_cfg_loop(m, batch, STEPS, W)
    else:
        labels = labels_of(batch)
        fn = lambda: fastddpm.sample(m, batch, shape=shape_of(m), steps=STEPS, method="ddim",  # noqa: E731
                                     backend=backend, seed=0, class_labels=labels, guidance_scale=float(w),
                                     null_class=K)
    fn()  # warm-up outside the timing: first-call allocations, graph capture
    # CPU: a shared machine's noise is large against a 3-step loop; more rounds where a loop is cheap
    sec = run_rounds(benchmark, [fn], calls_per_round=1, rounds=5 if CUDA else 2 if backend == "fused" else 3)
    figs = dict(ms_per_step=1e3 * sec / STEPS, images_per_s=batch / sec, steps=STEPS, guidance_scale=float(w or W))
    if w == "1":
        _UNGUIDED[backend, batch] = sec
    elif w and (backend, batch) in _UNGUIDED:
        figs["vs_unguided"] = sec / _UNGUIDED[backend, batch]
    if backend == "fused" and not CUDA:
        figs["note"] = "Triton interpreter (CPU)"
    record(f"guided ddim b{batch}", contender, sec, baseline=backend == "diffusers_cfg_loop", **figs)

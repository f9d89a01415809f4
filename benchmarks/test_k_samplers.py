"""k-diffusion's samplers (issue 23): ms per model evaluation of fastddpm's loops against
k-diffusion's own loop and the diffusers scheduler loop, on the same model.

Contenders, per sampler and batch:
  reference, fused, graph   fastddpm.sample(method=M) with Karras sigmas (the default), seed mode
                            (graph: CUDA only; fused on a CPU runs under Triton's interpreter, so
                            its CPU time says nothing about GPU speed)
  k_diffusion (baseline)    k_diffusion.sampling.sample_M over its DiscreteEpsDDPMDenoiser, the
                            sigmas from its get_sigmas_karras (k-diffusion 0.1.1.post1's own loop,
                            loaded by tests/kdiffusion_peer.py; its own noise samplers: torch
                            randn_like, or a torchsde Brownian tree for dpmpp_sde / dpmpp_2m_sde)
  diffusers                 a hand-written pipeline loop (scale_model_input, model, step) over
                            EulerDiscreteScheduler(use_karras_sigmas=True) for euler and
                            DPMSolverMultistepScheduler(use_karras_sigmas=True) for dpmpp_2m
The figure is ms per model evaluation: a loop's time over its NFE (k-diffusion's count, which
fastddpm.sampler.model_evaluations gives: heun at K steps makes 2K - 1 calls); diffusers' two
schedulers make K calls. The model: fastddpm's ddpm-cifar10 preset on a GPU (batch 1, 16, 128,
20 steps), the tiny preset on the CPU (batch 1 and 4, 3 steps; fused at batch 1 only) so that
this file runs in CI in about a minute. Timing never decides pass or fail.
"""
import os
import sys

import pytest
import torch

import fastddpm
from harness import CUDA, DEVICE, run_rounds

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
try:  # before k-diffusion's loader, whose stand-in torchvision module diffusers' import checks would trip on
    import diffusers
except ImportError:
    diffusers = None

BATCHES = [1, 16, 128] if CUDA else [1, 4]
STEPS = 20 if CUDA else 3
# one per kind of update: one evaluation, two evaluations, multistep, multistep with noise, two noise draws
SAMPLERS = ["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde"] if CUDA else ["euler", "heun", "dpmpp_2m"]
CONTENDERS = ["reference", "fused", "graph", "k_diffusion", "diffusers"]
DIFFUSERS = {"euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
SCHEDULERS = {m: getattr(diffusers, name) for m, name in DIFFUSERS.items()} if diffusers else {}

_MODEL = []


def model_and_schedule():
    if not _MODEL:
        m = fastddpm.UNet.from_preset("ddpm-cifar10" if CUDA else "tiny").to(DEVICE).eval()
        _MODEL.append((m, fastddpm.Schedule.linear(1000)))  # diffusers' and the presets' default schedule
    return _MODEL[0]


def shape_of(m):
    return (m.config.in_channels, m.config.image_size, m.config.image_size)


def k_diffusion_loop(model, s, method, batch, steps):
    from kdiffusion_peer import load_k_diffusion

    sampling, external = load_k_diffusion()
    den = external.DiscreteEpsDDPMDenoiser(model, s.alphas_cumprod.float().to(DEVICE), quantize=False)
    sig = sampling.get_sigmas_karras(steps, float(den.sigma_min), float(den.sigma_max), device=DEVICE)
    fn = getattr(sampling, f"sample_{method}")
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def loop():
        x = torch.randn((batch, *shape_of(model)), device=DEVICE, generator=gen) * sig[0]
        with torch.no_grad():
            return fn(den, x, sig, disable=True)

    return loop


def diffusers_loop(model, method, batch, steps):
    if not SCHEDULERS:
        pytest.skip("diffusers is not installed")
    sched = SCHEDULERS[method](num_train_timesteps=1000, use_karras_sigmas=True)
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def loop():
        sched.set_timesteps(steps, device=DEVICE)  # resets its step index and history, as a pipeline call does
        x = torch.randn((batch, *shape_of(model)), device=DEVICE, generator=gen) * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                out = model(sched.scale_model_input(x, t), t.expand(batch))
                x = sched.step(out, t, x).prev_sample
        return x

    return loop


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("method", SAMPLERS)
def test_k_sampler(benchmark, record, method, contender, batch):
    if contender == "graph":
        try:
            fastddpm.sampler.resolve_backend("graph", DEVICE)
        except ValueError as e:
            pytest.skip(str(e))
    if contender == "fused" and not CUDA and batch > 1:
        pytest.skip("fused on the CPU runs under Triton's interpreter (about a second per evaluation): batch 1 only")
    if contender == "diffusers" and method not in DIFFUSERS:
        pytest.skip(f"no diffusers scheduler loop measured for {method}")
    model, s = model_and_schedule()
    shape = shape_of(model)
    nfe = fastddpm.sampler.model_evaluations(model, schedule=s, steps=STEPS, method=method)
    if contender == "k_diffusion":
        fn = k_diffusion_loop(model, s, method, batch, STEPS)
    elif contender == "diffusers":
        fn, nfe = diffusers_loop(model, method, batch, STEPS), STEPS
    else:
        fn = lambda: fastddpm.sample(model, batch, shape=shape, schedule=s, steps=STEPS, method=method,  # noqa: E731
                                     backend=contender, seed=0)
    fn()  # an extra warm-up call: caches, the peer's imports, first-call allocations
    # CPU: a shared machine's noise is large against a 3-step loop; more rounds where a loop is cheap
    sec = run_rounds(benchmark, [fn], calls_per_round=1, rounds=5 if CUDA else 2 if contender == "fused" else 7)
    figs = dict(ms_per_eval=1e3 * sec / nfe, nfe=nfe, steps=STEPS, images_per_s=batch / sec)
    if contender == "fused" and not CUDA:
        figs["note"] = "Triton interpreter (CPU)"
    record(f"k {method} b{batch}", contender, sec / nfe, baseline=contender == "k_diffusion", **figs)

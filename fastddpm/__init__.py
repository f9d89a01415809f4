"""fastddpm: DDPM / DDIM / DPM-Solver++ and k-diffusion's samplers, and training, fast on NVIDIA GPUs,
equal to a plain-PyTorch reference.

    import fastddpm
    unet = fastddpm.UNet.from_preset("ddpm-cifar10")
    x = fastddpm.sample(unet, 16, steps=50, method="ddim")   # (16, 3, 32, 32) float32

Modules: `schedule` (noise schedules), `diffusion` (reference math), `methods` (the table of
sampling methods), `karras` + `sigmas` (k-diffusion's samplers on continuous noise levels),
`ops` (fused Triton ops with the same signatures), `rng` (the counter-based noise stream),
`unet`, `sampler`,
`model_call` (how the sampler calls the model: dtype, autocast, torch.compile), `graphs`
(the per-model cache of CUDA-graph captured loops behind backend="graph"), `graph_loop`
(one captured loop).
"""
from . import compat, diffusion, graphs, karras, methods, ops, rng, sigmas
from .schedule import Schedule
from .unet import UNet
from .sampler import sample
from .checkpoint import load

__version__ = "0.1.0"
__all__ = ["Schedule", "UNet", "sample", "load", "compat", "diffusion", "graphs", "karras", "methods", "ops", "rng",
           "sigmas", "__version__"]

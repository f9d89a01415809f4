"""A training step (forward, backward, AdamW): images/s of a plain PyTorch step against
fastddpm's (fused q_sample, bf16 autocast, optionally torch.compile), same model and batch."""
import pytest
import torch
import torch.nn.functional as F

import fastddpm
from fastddpm import Schedule, diffusion
from fastddpm.train import diffusion_loss
from harness import CUDA, DEVICE, run_rounds

PRESET, BATCH = ("ddpm-cifar10", 128) if CUDA else ("tiny", 8)
S = Schedule.linear(1000)


@pytest.mark.parametrize("variant", ["plain", "fastddpm", "fastddpm+compile"])
def test_training_step(benchmark, record, variant):
    if variant.endswith("compile") and not CUDA:
        pytest.skip("torch.compile of a training step is measured on GPUs only (CPU compile takes minutes)")
    torch.manual_seed(0)
    model = fastddpm.UNet.from_preset(PRESET).to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = model.config
    x0 = torch.randn(BATCH, cfg.in_channels, cfg.image_size, cfg.image_size, device=DEVICE).clamp(-1, 1)
    t = torch.randint(0, 1000, (BATCH,), device=DEVICE)
    fwd = torch.compile(model) if variant.endswith("compile") else model
    counter = iter(range(10**9))

    def step():
        if variant == "plain":  # what a plain PyTorch loop does: torch.randn, eager q_sample, float32
            noise = torch.randn_like(x0)
            loss = F.mse_loss(model(diffusion.q_sample(S, x0, t, noise), t), noise)
        else:
            loss = diffusion_loss(fwd, S, x0, t, noise_seed=next(counter), fused=CUDA, bf16=CUDA)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sec = run_rounds(benchmark, [step], calls_per_round=5 if CUDA else 1, rounds=10 if CUDA else 2)
    record(f"train step {PRESET} b{BATCH}", variant, sec, baseline=variant == "plain", images_per_s=BATCH / sec)

"""Step kernels: fused ddpm_step vs eager reference vs the seeds' formula vs diffusers vs torch.compile.

Bytes moved per element: the fused step with in-kernel noise reads x_t and eps and writes
x_{t-1} (12 B in float32); with a noise tensor it also reads the noise (16 B). GB/s and the
fraction of the device's copy bandwidth use those counts for every contender (the work is
the same; the eager ones simply move more bytes than they are credited with).
"""
import pytest
import torch

from harness import CUDA, DEVICE, rotations, run_rounds
from fastddpm import Schedule, diffusion, ops

# (B, C, H, W): latency-bound CIFAR batch, 3.1M and 16.8M elements (bandwidth-bound)
SIZES = [(256, 3, 32, 32), (16, 3, 256, 256), (64, 4, 256, 256)] if CUDA else [(4, 3, 32, 32)]
S = Schedule.linear(1000)


def seeds_formula(s, x, t, eps, noise):
    """The step as DDPM code bases write it in eager PyTorch: gathered coefficients, x0, clip, mean, noise."""
    tab = s.table(x.device)
    c = lambda row: tab[row][t].view(-1, 1, 1, 1)  # noqa: E731
    x0 = (c(2) * x - c(3) * eps).clamp(-1, 1)
    mean = c(4) * x0 + c(5) * x
    return mean + (t > 0).float().view(-1, 1, 1, 1) * c(6) * noise


def make_inputs(shape, n):
    B = shape[0]
    return [dict(x=torch.randn(shape, device=DEVICE), eps=torch.randn(shape, device=DEVICE),
                 noise=torch.randn(shape, device=DEVICE), t=torch.randint(1, 1000, (B,), device=DEVICE))
            for _ in range(n)]


def contenders():
    names = ["fused_philox", "fused_noise_tensor", "reference", "seeds_formula", "diffusers"]
    if CUDA:
        names.append("torch_compile")
    return names


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", contenders())
def test_ddpm_step(benchmark, record, copy_bandwidth, shape, name):
    numel = torch.Size(shape).numel()
    sets = make_inputs(shape, rotations(16 * numel))
    out = torch.empty(shape, device=DEVICE)
    bytes_moved = (12 if name == "fused_philox" else 16) * numel
    if name == "fused_philox":
        fns = [lambda d=d: ops.ddpm_step(S, d["x"], d["t"], d["eps"], seed=1, out=out) for d in sets]
    elif name == "fused_noise_tensor":
        fns = [lambda d=d: ops.ddpm_step(S, d["x"], d["t"], d["eps"], d["noise"], out=out) for d in sets]
    elif name == "reference":
        fns = [lambda d=d: diffusion.ddpm_step(S, d["x"], d["t"], d["eps"], d["noise"]) for d in sets]
    elif name == "seeds_formula":
        fns = [lambda d=d: seeds_formula(S, d["x"], d["t"], d["eps"], d["noise"]) for d in sets]
    elif name == "torch_compile":
        step = torch.compile(lambda x, t, eps, z: diffusion.ddpm_step(S, x, t, eps, z), dynamic=False)
        fns = [lambda d=d: step(d["x"], d["t"], d["eps"], d["noise"]) for d in sets]
    else:
        diffusers = pytest.importorskip("diffusers")
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
        t_int = int(sets[0]["t"][0])  # diffusers takes one timestep per call
        gens = torch.Generator(device=DEVICE).manual_seed(0)
        fns = [lambda d=d: sched.step(d["eps"], t_int, d["x"], generator=gens).prev_sample for d in sets]
    sec = run_rounds(benchmark, fns)
    gbs = bytes_moved / sec / 1e9
    record(f"ddpm_step {'x'.join(map(str, shape))}", name, sec, baseline=name == "reference",
           gb_per_s=gbs, frac_of_copy_bw=bytes_moved / sec / copy_bandwidth, bytes=bytes_moved)


@pytest.mark.parametrize("shape", SIZES[:1] + (SIZES[2:] if CUDA else []), ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["fused_philox", "reference_randn"])
def test_q_sample(benchmark, record, copy_bandwidth, shape, name):
    """Training's forward process for one batch: x0 in, x_t and the eps target out."""
    numel = torch.Size(shape).numel()
    sets = make_inputs(shape, rotations(12 * numel))
    if name == "fused_philox":
        fns = [lambda d=d: ops.q_sample(S, d["x"], d["t"], seed=3) for d in sets]
    else:
        def eager(d):
            z = torch.randn_like(d["x"])
            return diffusion.q_sample(S, d["x"], d["t"], z), z

        fns = [lambda d=d: eager(d) for d in sets]
    sec = run_rounds(benchmark, fns)
    bytes_moved = 12 * numel  # read x0, write x_t and eps
    record(f"q_sample {'x'.join(map(str, shape))}", name, sec, baseline=name == "reference_randn",
           gb_per_s=bytes_moved / sec / 1e9, frac_of_copy_bw=bytes_moved / sec / copy_bandwidth)

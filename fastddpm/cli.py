"""Command line: `fastddpm demo | sample | train | eval` (also `python -m fastddpm ...`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import _checks as C


def _add_sampling_args(p, steps_default):
    p.add_argument("-n", "--n", "--num-samples", dest="n", type=int, default=64,
                   help="number of images (default 64); under torchrun write -n or --num-samples: torchrun reads "
                        "--n as an abbreviation of its own --nnodes")
    p.add_argument("--seed", type=int, default=0, help="noise seed; sample i is the same image for any batch size")
    p.add_argument("--steps", type=int, default=steps_default,
                   help=f"respace the training schedule to this many steps (default {steps_default}; "
                        "0 = all training steps)")
    p.add_argument("--method", choices=C.METHODS, default="ddim", help="sampler (default ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--variance", choices=C.VARIANCES, default="fixed_small", help="DDPM variance")
    p.add_argument("--batch-size", type=int, default=None, help="images per model call (default min(n, 256))")
    p.add_argument("--backend", choices=C.BACKENDS, default="auto",
                   help="sampling loop (default auto: CUDA-graph captured on a GPU, reference on a CPU)")
    p.add_argument("--compile", action="store_true",
                   help="run the model through torch.compile inside the loop (GPU; compiling takes minutes)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _device(arg):
    return torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load(checkpoint, device):
    from .checkpoint import load, shipped_model_path

    return load(checkpoint or shipped_model_path(), device)


def _sample(model, a, backend=None, progress=True):
    from .sampler import sample

    return sample(model, a.n, steps=a.steps or None, method=a.method, eta=a.eta, variance=a.variance,
                  seed=a.seed, batch_size=a.batch_size, backend=backend or a.backend, compile=a.compile,
                  prediction=getattr(model, "fastddpm_prediction", "eps"), progress=progress)


def cmd_sample(a):
    """One process, or one rank of `torchrun -m fastddpm sample`: shards, then rank 0 assembles."""
    from .distributed import init_process_group, sample_to_folder

    rank, world, device = init_process_group()
    if a.device is not None:
        device = _device(a.device)
    model = _load(a.checkpoint, device)
    manifest = {"checkpoint": os.path.abspath(a.checkpoint) if a.checkpoint else "shipped digits model",
                "seed": a.seed, "steps": a.steps, "method": a.method, "eta": a.eta, "variance": a.variance}
    t0 = time.perf_counter()
    try:
        out = sample_to_folder(model, a.n, a.out, shard_size=a.shard_size, rank=rank, world=world, manifest=manifest,
                               progress=not a.no_progress, steps=a.steps or None, method=a.method, eta=a.eta,
                               variance=a.variance, seed=a.seed, batch_size=a.batch_size, backend=a.backend,
                               compile=a.compile, prediction=getattr(model, "fastddpm_prediction", "eps"))
    finally:
        _leave_process_group()
    if rank == 0:
        print(f"wrote {a.n} samples to {out} (uint8 NHWC, key arr_0) and {os.path.join(a.out, 'grid.png')} "
              f"in {time.perf_counter() - t0:.1f} s with {world} process(es)")


def _leave_process_group():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_demo(a):
    from .images import grid, save_png, to_uint8_nhwc
    from .sampler import resolve_backend

    device = _device(a.device)
    model = _load(None, device)
    n_params = sum(p.numel() for p in model.parameters())
    fast = resolve_backend("auto", device)
    print(f"fastddpm demo: the shipped digits model ({n_params / 1e6:.1f}M parameters), {a.n} samples, "
          f"{a.method.upper()} with {a.steps} steps, seed {a.seed}, on {device}")
    runs = {}
    for backend in dict.fromkeys([fast, "reference"]):
        if backend != "reference":  # kernel compilation and graph capture: once per process and shape
            t0 = time.perf_counter()
            _sample(model, a, backend=backend, progress=False)
            warm = time.perf_counter() - t0
            print(f"  backend {backend:<9}: warm-up (kernel compilation, graph capture) {warm:.2f} s")
        t0 = time.perf_counter()
        x = _sample(model, a, backend=backend, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        runs[backend] = (x, dt)
        print(f"  backend {backend:<9}: {dt:6.2f} s  {1e3 * dt / a.steps:7.1f} ms/step  {a.n / dt:7.1f} images/s")
    x, _ = runs[fast]
    if fast != "reference":
        ref = runs["reference"][0]
        rel = float((x - ref).norm() / ref.norm())
        print(f"  {fast} vs reference: relative L2 difference {rel:.2e}, speed-up "
              f"{runs['reference'][1] / runs[fast][1]:.1f}x")
    else:
        print("  (no CUDA here: 'auto' is the reference loop; the fused kernels and graphs need a GPU)")
    save_png(grid(to_uint8_nhwc(x), scale=4), a.out)
    print(f"wrote {a.out}")


def cmd_train(a):
    from .train import TrainConfig, train

    cfg = TrainConfig(data=a.data, out=a.out, model=a.model, schedule=a.schedule, prediction=a.prediction,
                      steps=a.steps, batch_size=a.batch_size, lr=a.lr, ema_decay=a.ema_decay, seed=a.seed,
                      ckpt_every=a.ckpt_every, log_every=a.log_every, device=a.device, compile=a.compile,
                      progress=not a.no_progress, warmup=a.warmup)
    try:
        out = train(cfg, resume=a.resume)
    finally:
        _leave_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"trained to step {a.steps}: {os.path.join(out, 'model.safetensors')} (sample it with "
          f"`fastddpm sample --checkpoint {out} --n 64 --out DIR`)")


def cmd_eval(a):
    import numpy as np

    from .quality import evaluate

    if not os.path.isfile(a.samples):
        raise SystemExit(f"fastddpm eval: no file {a.samples!r}")
    with np.load(a.samples) as f:
        if "arr_0" not in f:
            raise SystemExit(f"fastddpm eval: {a.samples!r} has no 'arr_0' array (keys: {list(f.keys())})")
        arr = f["arr_0"]
    res = evaluate(arr)
    if a.json:
        print(json.dumps(res))
        return
    print(f"{'':<22}{'samples':>12}{'held-out real':>16}")
    s, r = res["samples"], res["heldout_real"]
    print(f"{'images':<22}{s['n']:>12}{r['n']:>16}")
    print(f"{'FD (297 images)':<22}{s['fd_297']:>12.2f}{r['fd_297']:>16.2f}")
    print(f"{'FD (all images)':<22}{s['fd']:>12.2f}{r['fd']:>16.2f}")
    print(f"{'confidence':<22}{s['confidence']:>12.3f}{r['confidence']:>16.3f}")
    print(f"{'class histogram (%)':<22}")
    for d in range(10):
        fs, fr = 100 * s["histogram"][d] / s["n"], 100 * r["histogram"][d] / r["n"]
        print(f"{'  digit ' + str(d):<22}{fs:>12.1f}{fr:>16.1f}")


def build_parser():
    p = argparse.ArgumentParser(prog="fastddpm", description="Fast DDPM/DDIM sampling and training.")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="sample the shipped digits model: fast backend vs reference, timings, PNG")
    _add_sampling_args(d, steps_default=50)
    d.add_argument("--out", default="fastddpm-demo.png", help="PNG to write (default fastddpm-demo.png)")
    d.set_defaults(func=cmd_demo, checkpoint=None)

    s = sub.add_parser("sample", help="sample a checkpoint (default: the shipped digits model) to DIR")
    s.add_argument("--checkpoint", default=None, help="run folder or .safetensors file (default: shipped model)")
    s.add_argument("--out", required=True, help="output folder: samples.npz and grid.png")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--shard-size", type=int, default=256,
                   help="samples per shard file (default 256); a restarted run skips finished shards")
    _add_sampling_args(s, steps_default=50)
    s.set_defaults(func=cmd_sample)

    t = sub.add_parser("train", help="train a model (DDPM objective)")
    t.add_argument("--data", default="digits", help="digits | moons | gaussians | a folder of PNG/JPEG images")
    t.add_argument("--out", required=True, help="run folder (checkpoint, model, log)")
    t.add_argument("--model", default=None, help="UNet preset or 'mlp' (default: digits-16 for images, mlp for 2-D)")
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--schedule", choices=("linear", "cosine"), default="linear")
    t.add_argument("--prediction", choices=C.PREDICTIONS, default="eps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--ckpt-every", type=int, default=500)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--device", default=None)
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="quality figures for digit samples, real held-out digits beside them")
    e.add_argument("samples", help="a samples.npz (uint8 NHWC under arr_0)")
    e.add_argument("--json", action="store_true", help="print the figures as JSON")
    e.set_defaults(func=cmd_eval)
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.cmd == "train" and a.model is None:
        a.model = "mlp" if a.data in ("moons", "gaussians") else "digits-16"
    try:
        a.func(a)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
        print(f"fastddpm {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

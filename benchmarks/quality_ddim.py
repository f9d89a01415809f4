"""DDIM quality against the number of steps and the clipping option (issue 18).

    python benchmarks/quality_ddim.py digits --n 400 --steps 20 50 250   # the shipped digits model
    python benchmarks/quality_ddim.py moons --n 2000 --steps 20 50 250 1000

Runs DDIM (eta = 0, Song et al. 2021 eq. 12) with three treatments of the predicted x0:
    raw        clip=1.0, the direction term keeps the model's raw eps (diffusers' default,
               use_clipped_model_output=False)
    noclip     clip=None
    recompute  clip=1.0, eps re-derived from the clipped x0 (improved-diffusion,
               denoising-diffusion-pytorch; diffusers' use_clipped_model_output=True):
               eps = (x_t / sqrt(abar) - x0_clipped) / sqrt(1 / abar - 1)
The loop below is written with fastddpm.diffusion's own math (predict_x0, predict_eps and the
schedule's float32 rows) so that it can also record what happens inside each step; the script
first checks that each option equals fastddpm.sample(method="ddim", clip=...,
use_clipped_model_output=...) with the same seed. Every option starts from the same x_T (seed
mode, sample i = stream index i), so the rows are paired.

Figures:
- digits: the Frechet distance of `fastddpm eval` (fastddpm.quality; samples quantised to
  uint8 as `fastddpm sample` writes them) over m = min(n, 297) samples, and its ratio to
  the held-out real digits' FD over the same count (1.0 = as good as real data).
- moons: sliced Wasserstein-1 to fresh data (fastddpm.quality.sliced_wasserstein), and the
  same figure for a second independent data draw (the floor). The moons model is trained
  here with fastddpm's trainer (the test suite's recipe, about a minute).
- diagnostics per run: the share of x0 elements clipped (over all steps, and over the last
  10% of the steps), the RMS of x_t against the RMS the training marginal q(x_t) has
  (sqrt(abar E[x0^2] + 1 - abar)) at the middle step, the RMS change a step's clipping makes
  to the state (|sqrt(abar_prev) (x0 - x0_clipped)| + the eps term), and, for digits,
  isolated bright pixels per image ("speckles": brighter than each 8-neighbour by > 0.3)
  against the real digits' count.
Results are appended as JSON lines to --out (one line per run) and printed as a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import fastddpm
from fastddpm import diffusion, rng
from fastddpm.schedule import ROW

OPTIONS = ("raw", "noclip", "recompute")


# ---------------------------------------------------------------------- the DDIM loop under test
@torch.no_grad()
def ddim(model, s, n, shape, option, *, seed=1, batch_size=400, data_ms=None):
    """DDIM eta=0 over schedule `s` with the clipping `option`; returns (x0 (n, *shape), stats)."""
    clip = None if option == "noclip" else 1.0
    tab = s.table("cpu")
    out, clipped, late_clipped, kick, mid_rms = [], 0.0, 0.0, 0.0, 0.0
    mid = s.num_steps // 2
    late = max(1, s.num_steps // 10)
    for start in range(0, n, batch_size):
        B = min(batch_size, n - start)
        x = rng.normal_like(torch.empty((B, *shape)), seed, start, rng.TAG_INIT)  # = fastddpm.sample's x_T
        for i in reversed(range(s.num_steps)):
            mo = model(x, s.timesteps[i].expand(B)).float()
            x0 = diffusion.predict_x0(s, x, i, mo)
            eps = diffusion.predict_eps(s, x, i, mo)
            if clip is not None:
                x0c = x0.clamp(-clip, clip)
                frac = float((x0c != x0).float().mean())
                clipped += frac * B / s.num_steps
                if i < late:
                    late_clipped += frac * B / late
                eps_c = (tab[ROW["sqrt_recip_abar"], i] * x - x0c) / tab[ROW["sqrt_recipm1_abar"], i]
                # how far a raw-eps step lands from the consistent one (the per-step drift)
                kick += float((tab[ROW["ddim_dir0"], i] * (eps - eps_c)).pow(2).mean().sqrt()) * B / s.num_steps
                if option == "recompute":
                    eps = eps_c
                x0 = x0c
            x = tab[ROW["sqrt_abar_prev"], i] * x0 + tab[ROW["ddim_dir0"], i] * eps
            if i == mid:
                mid_rms += float(x.pow(2).mean()) * B
        out.append(x)
    x = torch.cat(out)
    stats = {"clipped_share": clipped / n, "clipped_share_last10pct": late_clipped / n,
             "raw_vs_consistent_rms_per_step": kick / n}
    if data_ms is not None:
        abar_prev = float(s.alphas_cumprod_prev[mid])
        stats["rms_mid_over_marginal"] = math.sqrt(mid_rms / n) / math.sqrt(
            abar_prev * data_ms + 1 - abar_prev)
    return x, stats


def check_loop_matches_sample(model, shape, steps=10, n=8):
    """The local loop's options are fastddpm.sample(method="ddim", clip=..., use_clipped_model_output=...)."""
    s = model.fastddpm_schedule.respace(steps)
    for option, clip, clipped_eps in (("raw", 1.0, False), ("noclip", None, False), ("recompute", 1.0, True)):
        mine, _ = ddim(model, s, n, shape, option)
        ref = fastddpm.sample(model, n, steps=steps, method="ddim", clip=clip, seed=1, backend="reference",
                              use_clipped_model_output=clipped_eps)
        rel = float((mine - ref).norm() / ref.norm())
        if not rel < 1e-5:
            raise SystemExit(f"local DDIM loop ({option}) differs from fastddpm.sample: relative L2 {rel:.2e}")


# ---------------------------------------------------------------------- figures
def speckles(x):
    """Isolated bright pixels per image: brighter than each of the 8 neighbours by more than 0.3
    (15% of the [-1, 1] range). The real digits have ~0 (0 in the first 64 held-out ones)."""
    x = x.float().clamp(-1, 1)  # (N, 1, H, W)
    p = F.pad(x, (1, 1, 1, 1), value=-1.0)
    H, W = x.shape[-2:]
    shifts = [p[..., 1 + dy:1 + dy + H, 1 + dx:1 + dx + W] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    nmax = torch.stack(shifts).amax(0)  # brightest of the 8 neighbours
    return float(((x - nmax) > 0.3).float().sum() / len(x))


class DigitsJudge:
    def __init__(self):
        from fastddpm.data import load_digits
        from fastddpm.quality import load_classifier

        self.clf = load_classifier()
        with torch.no_grad():
            self.ref = self.clf.features(load_digits("train"))
        self.heldout = load_digits("heldout")
        self.data_ms = float(load_digits("train").pow(2).mean())
        self.floor = {}

    @torch.no_grad()
    def __call__(self, x):
        from fastddpm.images import to_uint8_nhwc
        from fastddpm.quality import frechet_distance, to_model_space

        m = min(len(x), 297)
        x = to_model_space(to_uint8_nhwc(x))  # what `fastddpm sample` writes and `fastddpm eval` reads
        if m not in self.floor:
            self.floor[m] = frechet_distance(self.clf.features(self.heldout[:m]), self.ref)
        fd = frechet_distance(self.clf.features(x[:m]), self.ref)
        return {"m": m, "fd": fd, "fd_heldout": self.floor[m], "fd_ratio": fd / self.floor[m],
                "speckles_per_image": speckles(x), "speckles_real": speckles(self.heldout)}


class MoonsJudge:
    def __init__(self):
        from fastddpm.data import moons

        self.real = moons(2000, torch.Generator().manual_seed(99))
        self.data_ms = float(moons(20000, torch.Generator().manual_seed(0)).pow(2).mean())
        self.moons = moons

    def __call__(self, x):
        from fastddpm.quality import sliced_wasserstein

        other = self.moons(len(x), torch.Generator().manual_seed(98))
        return {"sw": sliced_wasserstein(x, self.real), "sw_floor": sliced_wasserstein(other, self.real),
                "outside_unit_box": float((x.abs() > 1.0).any(1).float().mean())}


def moons_model(folder):
    from fastddpm.train import TrainConfig, train

    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        train(TrainConfig(data="moons", out=folder, model="mlp", steps=1500, batch_size=256, lr=2e-3, warmup=50,
                          ema_decay=0.99, ckpt_every=1500, log_every=500, progress=False, seed=0))
    return fastddpm.load(folder)


# ---------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=("digits", "moons"))
    p.add_argument("--n", type=int, default=400, help="samples per run (default 400)")
    p.add_argument("--n-at", type=str, default="",
                   help="per-step-count sample counts, e.g. '1000:128' (the same count for every option)")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50, 250, 1000])
    p.add_argument("--options", nargs="+", choices=OPTIONS, default=list(OPTIONS))
    p.add_argument("--ddpm", type=int, nargs="*", default=[], help="also DDPM (fixed_small, clip=1.0) at these steps")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=400)
    p.add_argument("--moons-run", default="/tmp/fastddpm-moons-quality", help="moons model folder (trained if empty)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--save-dir", default=None, help="also save each run's samples (float32 .pt) here")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    n_at = {int(k): int(v) for k, v in (kv.split(":") for kv in a.n_at.split(",") if kv)}

    if a.model == "digits":
        model = fastddpm.load(fastddpm.checkpoint.shipped_model_path())
        judge, shape = DigitsJudge(), (1, 16, 16)
    else:
        model = moons_model(a.moons_run)
        judge, shape = MoonsJudge(), (2,)
    check_loop_matches_sample(model, shape)
    rows = []
    for k in a.steps:
        n = n_at.get(k, a.n)
        s = model.fastddpm_schedule.respace(k)
        for option in a.options:
            t0 = time.perf_counter()
            x, stats = ddim(model, s, n, shape, option, seed=a.seed, batch_size=a.batch_size, data_ms=judge.data_ms)
            row = {"model": a.model, "sampler": "ddim", "steps": k, "option": option, "n": n, "seed": a.seed,
                   **judge(x), **stats, "seconds": time.perf_counter() - t0}
            rows.append(row)
            _emit(row, a.out)
            _save(x, a.save_dir, f"{a.model}-ddim-{k}-{option}-n{n}-seed{a.seed}.pt")
    for k in a.ddpm:
        n = n_at.get(k, a.n)
        t0 = time.perf_counter()
        x = fastddpm.sample(model, n, steps=k, method="ddpm", clip=1.0, seed=a.seed, batch_size=a.batch_size,
                            backend="reference")
        row = {"model": a.model, "sampler": "ddpm", "steps": k, "option": "clip=1.0", "n": n, "seed": a.seed,
               **judge(x), "seconds": time.perf_counter() - t0}
        rows.append(row)
        _emit(row, a.out)
        _save(x, a.save_dir, f"{a.model}-ddpm-{k}-n{n}-seed{a.seed}.pt")
    print_table(rows)


def _save(x, folder, name):
    if folder:
        os.makedirs(folder, exist_ok=True)
        torch.save(x.cpu(), os.path.join(folder, name))


def _emit(row, out):
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def print_table(rows):
    key = "fd_ratio" if rows and "fd_ratio" in rows[0] else "sw"
    print(f"\n{'sampler':<8}{'steps':>6}{'option':>11}{'n':>6}{key:>10}{'clipped':>9}{'speckles':>9}")
    for r in rows:
        sp = r.get("speckles_per_image", float("nan"))
        print(f"{r['sampler']:<8}{r['steps']:>6}{r['option']:>11}{r['n']:>6}{r[key]:>10.3f}"
              f"{r.get('clipped_share', float('nan')):>9.3f}{sp:>9.3f}")


if __name__ == "__main__":
    sys.exit(main())

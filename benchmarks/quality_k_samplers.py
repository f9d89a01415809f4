"""Quality of the k-diffusion samplers on the shipped digits model (issue 23): FD against NFE.

    python benchmarks/quality_k_samplers.py                     # every method at 10 and 20 steps, seeds 0 and 1
    python benchmarks/quality_k_samplers.py --seeds 0 --methods dpmpp_2m euler
    python benchmarks/quality_k_samplers.py --plot-only --readme README.md   # table + PNG from the JSON

Protocol: the README's ("The shipped digits model"): per run, `fastddpm sample -n 1000 --method M
--steps K --seed S --backend reference` then `fastddpm eval`, i.e. fastddpm.sample with the CLI's
arguments (k-diffusion's defaults: Karras sigmas over the training schedule's range, eta 1, lms
order 4 ...), the images quantised to uint8 as the CLI writes them, and fastddpm.quality's figures:
FD over all n images, FD over the first 297 (the held-out real digits' count), confidence. When
both seeds of a (method, steps) are done, their images are pooled (2n) and scored again. NFE is
fastddpm.sampler.model_evaluations (k-diffusion's count: heun at K steps makes 2K - 1 calls).

Each run's uint8 images are kept in --samples-dir (so pooled rows need no resampling) and its
figures are written to --out (JSON) as soon as it finishes; a rerun skips the runs already in
the JSON, and a run with more images than one already done samples only the rest
(sample_offset). Images equal the CLI's up to float rounding (the CPU convolutions round
differently per batch size, --batch-size 250 here, min(n, 256) in the CLI: now and then one
uint8 level). The PNG (--png) plots FD (log scale) against NFE per method: the pooled FD if
every point has it, else the first seed's over n = 1000, else over its first 297, with the
README's DDPM-1000 figure under the same protocol as a reference line.
--readme rewrites the table between <!-- k-quality:start --> and <!-- k-quality:end -->.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import fastddpm
from fastddpm import methods
from fastddpm.sampler import model_evaluations

# The most asked-for rows first (DPM++ 2M Karras carries the 10% check).
ORDER = ("dpmpp_2m", "euler", "euler_ancestral", "heun", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde",
         "dpmpp_2s_ancestral", "lms", "dpm_2", "dpm_2_ancestral")
assert sorted(ORDER) == sorted(methods.SIGMA_NAMES)
# DDPM at 1000 steps under the same protocol (README, "Few-step samplers"): 1000 images per seed.
README_DDPM_1000 = {"seed 0": 6.23, "seed 1": 7.12, "pooled": 5.54, "seed 0 (first 297)": 8.20,
                    "seed 1 (first 297)": 12.25}
HELDOUT_297 = 11.54  # the 297 held-out real digits' FD (README)
HERE = os.path.dirname(os.path.abspath(__file__))


def _key(method, steps, seed, n):
    return f"{method}-{steps}-seed{seed}-n{n}"


def _load_json(path):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {"protocol": None, "runs": {}}


def _save_json(data, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


class Judge:
    def __init__(self):
        from fastddpm.data import load_digits
        from fastddpm.quality import load_classifier

        self.clf = load_classifier()
        with torch.no_grad():
            self.ref = self.clf.features(load_digits("train"))

    def __call__(self, images_uint8):
        from fastddpm.quality import digit_figures

        f = digit_figures(images_uint8, self.clf, self.ref)
        return {"n": f["n"], "fd": f["fd"], "fd_297": f["fd_common"], "confidence": f["confidence"],
                "histogram": f["histogram"]}


def run_one(model, judge, method, steps, seed, n, batch_size, samples_dir, runs=None):
    from fastddpm.images import to_uint8_nhwc

    nfe = model_evaluations(model, steps=steps, method=method)
    # seed mode: sample i is the same image whatever n, so a bigger run's first n images are this run
    def npz(k):
        return os.path.join(samples_dir, f"{_key(method, steps, seed, k)}.npz")

    bigger = [r for r in (runs or {}).values()
              if (r["method"], r["steps"], str(r["seed"])) == (method, steps, str(seed))
              and r["n"] > n and os.path.isfile(npz(r["n"]))]
    if bigger:
        big = bigger[0]["n"]
        arr = np.load(npz(big))["arr_0"][:n]
        return {"method": method, "steps": steps, "nfe": nfe, "seed": seed, **judge(arr),
                "from": f"the first {n} images of the n={big} run"}
    # ... and a smaller run's images are this run's first ones: sample only the rest (sample_offset)
    smaller = sorted(r["n"] for r in (runs or {}).values()
                     if (r["method"], r["steps"], str(r["seed"])) == (method, steps, str(seed)) and r["n"] < n
                     and os.path.isfile(npz(r["n"])))
    head = np.load(npz(smaller[-1]))["arr_0"] if smaller else np.zeros((0, 16, 16, 1), np.uint8)
    t0 = time.perf_counter()
    x = fastddpm.sample(model, n - len(head), steps=steps, method=method, seed=seed, batch_size=batch_size,
                        backend="reference", prediction=getattr(model, "fastddpm_prediction", "eps"),
                        sample_offset=len(head))
    seconds = time.perf_counter() - t0
    arr = np.concatenate([head, to_uint8_nhwc(x)])
    os.makedirs(samples_dir, exist_ok=True)
    np.savez(os.path.join(samples_dir, f"{_key(method, steps, seed, n)}.npz"), arr_0=arr)
    return {"method": method, "steps": steps, "nfe": nfe, "seed": seed, **judge(arr), "seconds": seconds,
            "threads": torch.get_num_threads(), **({"sampled": f"images {len(head)}..{n - 1}"} if smaller else {})}


def pooled(judge, method, steps, seeds, n, samples_dir):
    paths = [os.path.join(samples_dir, f"{_key(method, steps, s, n)}.npz") for s in seeds]
    if not all(os.path.isfile(p) for p in paths):
        return None
    arr = np.concatenate([np.load(p)["arr_0"] for p in paths])
    f = judge(arr)
    return {"method": method, "steps": steps, "seed": "+".join(map(str, seeds)), "fd": f["fd"], "n": f["n"],
            "fd_297": f["fd_297"], "confidence": f["confidence"]}


# ---------------------------------------------------------------------- table and plot
def _row(runs, method, steps, seed):
    """The run with the most images for (method, steps, seed), or None."""
    rows = [r for r in runs.values() if r["method"] == method and r["steps"] == steps and str(r["seed"]) == str(seed)]
    return max(rows, key=lambda r: r["n"]) if rows else None


def table(data, seeds, steps_list) -> str:
    runs = data["runs"]
    pooled_seed = "+".join(map(str, seeds))
    head = " | ".join(f"FD, seed {s}: all images (first 297)" for s in seeds)
    lines = [f"| sampler (Karras sigmas) | steps | NFE | {head} | FD, seeds {' + '.join(map(str, seeds))} pooled |"
             " pooled vs DDPM-1000 (5.54) |",
             "|---|---:|---:|" + "---:|" * len(seeds) + "---:|---:|"]
    for method in ORDER:
        for k in steps_list:
            rows = [_row(runs, method, k, s) for s in seeds]
            if not any(rows):
                continue
            nfe = next(r["nfe"] for r in rows if r)
            cells = [("not measured" if r is None else f"{r['fd']:.2f} over {r['n']} ({r['fd_297']:.2f})"
                      if r["n"] > 297 else f"({r['fd_297']:.2f}), 297 only") for r in rows]
            p = _row(runs, method, k, pooled_seed) if len(seeds) > 1 else None
            pc = f"{p['fd']:.2f} over {p['n']}" if p else "not measured"
            rel = f"{100 * (p['fd'] / README_DDPM_1000['pooled'] - 1):+.1f}%" if p and p["n"] == 2000 else ""
            lines.append(f"| {method} | {k} | {nfe} | " + " | ".join(cells) + f" | {pc} | {rel} |")
    return "\n".join(lines)


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0)]


def plot_figure(data, seeds, steps_list):
    """What the PNG plots: the pooled FD where every point has it, else seed seeds[0]'s FD over
    1000 images where every point has it, else its FD over the first 297 (every run has that).
    Returns (points {method: [(nfe, fd, steps)]}, label, DDPM-1000's figure under the same protocol)."""
    runs, s0, ps = data["runs"], seeds[0], "+".join(map(str, seeds))
    choices = [(ps, 2000, "fd", f"pooled seeds {' + '.join(map(str, seeds))}, 2000 images", "pooled")] \
        if len(seeds) > 1 else []
    choices += [(s0, 1000, "fd", f"seed {s0}, 1000 images", f"seed {s0}"),
                (s0, 297, "fd_297", f"seed {s0}, first 297 images", f"seed {s0} (first 297)")]
    for seed, n, fig, label, ref in choices:
        pts = {}
        for method in ORDER:
            rows = [(_row(runs, method, k, seed), _row(runs, method, k, s0)) for k in steps_list]
            if any(r for r, _ in rows):
                pts[method] = sorted((r0["nfe"], r[fig], r["steps"]) for r, r0 in rows if r and r["n"] >= n)
        want = {m: len([k for k in steps_list if _row(runs, m, k, s0)]) for m in ORDER}
        if pts and all(len(pts.get(m, [])) == w for m, w in want.items()):
            return pts, label, README_DDPM_1000.get(ref) if seeds[0] in (0, 1) else None
    return {}, "", None


def plot(data, seeds, steps_list, path, width=960, height=580):
    """FD (log scale) against NFE per method, the figure of plot_figure."""
    import math

    from PIL import Image, ImageDraw

    pts, label, ddpm = plot_figure(data, seeds, steps_list)
    if not pts:
        return
    refs = [("DDPM 1000 steps (README, same protocol)", ddpm)] if ddpm else []
    if "297" in label:
        refs.append(("297 held-out real digits (README)", HELDOUT_297))
    xs = [p[0] for line in pts.values() for p in line]
    ys = [p[1] for line in pts.values() for p in line] + [v for _, v in refs]
    x_lo, x_hi = 0, 5 * int((max(xs) + 6) // 5)
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if min(ys) / 1.5 <= t <= max(ys) * 1.5]
    y_lo, y_hi = math.log10(min(ys) / 1.3), math.log10(max(ys) * 1.3)
    L, R, T, B = 60, 210, 40, 50  # margins; the legend sits on the right
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    pw, ph = width - L - R, height - T - B

    def at(x, y):
        return L + pw * (x - x_lo) / (x_hi - x_lo), T + ph * (1 - (math.log10(y) - y_lo) / (y_hi - y_lo))

    d.text((10, 8), f"shipped digits model: FD (fastddpm eval; {label}; log scale) against model evaluations; "
                    "k-diffusion samplers, Karras sigmas, 10 and 20 steps", fill="black")
    d.rectangle([L, T, L + pw, T + ph], outline="black")
    for yv in ticks:
        _, y = at(1, yv)
        d.line([L - 4, y, L, y], fill="black")
        d.text((L - 34, y - 6), f"{yv}", fill="black")
    for xv in range(x_lo, x_hi + 1, 5):
        x, _ = at(xv, 1)
        d.line([x, T + ph, x, T + ph + (4 if xv % 10 else 8)], fill="black")
        if xv % 10 == 0:
            d.text((x - 6, T + ph + 10), f"{xv}", fill="black")
    d.text((L + pw // 2 - 90, height - 22), "model evaluations (NFE) per image", fill="black")
    d.text((8, T - 14), "FD (lower is better)", fill="black")
    for name, v in refs:  # dashed reference lines
        _, yr = at(1, v)
        for x in range(L, L + pw, 12):
            d.line([x, yr, min(x + 6, L + pw), yr], fill=(120, 120, 120))
        d.text((L + 6, yr - 14), f"{name}: {v}", fill=(90, 90, 90))
    ly = T
    for i, (method, line) in enumerate(pts.items()):
        c = PALETTE[i % len(PALETTE)]
        off = 0.3 * (i - (len(pts) - 1) / 2)  # sideways, so that points at equal NFE do not hide each other
        xy = [at(x + off, y) for x, y, _ in line]
        if len(xy) > 1:
            d.line(xy, fill=c, width=2)
        for (px, py), (_, _, k) in zip(xy, line):
            if k == 20:
                d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=c)
            else:
                d.ellipse([px - 4, py - 4, px + 4, py + 4], outline=c, width=2)
        d.line([width - R + 15, ly + 7, width - R + 40, ly + 7], fill=c, width=3)
        d.text((width - R + 46, ly), method, fill="black")
        ly += 18
    d.text((width - R + 15, ly + 8), "hollow: 10 steps", fill="black")
    d.text((width - R + 15, ly + 24), "filled: 20 steps", fill="black")
    d.text((width - R + 15, ly + 48), "points are offset sideways", fill="black")
    d.text((width - R + 15, ly + 62), f"by up to {0.3 * (len(pts) - 1) / 2:.1f} NFE", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


def update_readme(readme, text):
    start, end = "<!-- k-quality:start -->", "<!-- k-quality:end -->"
    with open(readme) as f:
        body = f.read()
    if start not in body or end not in body:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{start}\n{text}\n{end}{tail}")


# ---------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=ORDER, default=list(ORDER))
    p.add_argument("--steps", type=int, nargs="+", default=[20, 10])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--n", type=int, default=1000, help="samples per seed (default 1000)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default=os.path.join(HERE, "results", "quality_k_samplers.json"))
    p.add_argument("--samples-dir", default="/tmp/fastddpm-quality-k", help="uint8 samples per run (for pooling)")
    p.add_argument("--png", default=os.path.join(HERE, "..", "docs", "fd_vs_nfe.png"))
    p.add_argument("--readme", default=None, help="rewrite this README's k-quality table")
    p.add_argument("--plot-only", action="store_true", help="no sampling: table, PNG and README from the JSON")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    data = _load_json(a.out)
    data["protocol"] = {"model": "shipped digits-16", "backend": "reference", "sigmas": "karras (default)",
                        "figure": "fastddpm.quality FD on uint8 samples (fastddpm eval): over all n, and over "
                                  "the first 297", "pooled": "both seeds' images together"}
    if not a.plot_only:
        model = fastddpm.load(fastddpm.checkpoint.shipped_model_path())
        judge = Judge()
        for seed in a.seeds:  # one seed for every method first, then the next
            for method in [m for m in ORDER if m in a.methods]:
                for k in a.steps:
                    key = _key(method, k, seed, a.n)
                    if key in data["runs"]:
                        continue
                    row = run_one(model, judge, method, k, seed, a.n, a.batch_size, a.samples_dir, data["runs"])
                    data["runs"][key] = row
                    print(json.dumps({k2: v for k2, v in row.items() if k2 != "histogram"}), flush=True)
                    pk = _key(method, k, "+".join(map(str, a.seeds)), a.n * len(a.seeds))
                    if len(a.seeds) > 1 and pk not in data["runs"]:
                        pr = pooled(judge, method, k, a.seeds, a.n, a.samples_dir)
                        if pr:
                            data["runs"][pk] = pr
                            print(json.dumps(pr), flush=True)
                    _save_json(data, a.out)
    _save_json(data, a.out)
    text = table(data, a.seeds, sorted(a.steps))
    print(text)
    plot(data, a.seeds, sorted(a.steps), a.png)
    if a.readme:
        update_readme(a.readme, text)


if __name__ == "__main__":
    sys.exit(main())

"""Turn the GPU run's files (or a `pytest benchmarks` JSON) into the README's results table and a PNG chart.

    python -m benchmarks.report OUT --readme README.md --png docs/results.png   # benchmarks/run_gpu.sh's OUT
    python benchmarks/report.py benchmarks/results/cuda-latest.json --readme README.md --png docs/results.png
    python benchmarks/report.py cuda-latest.json cuda-compile.json ...   # runs split over calls, one device

The table replaces the text between <!-- results:start --> and <!-- results:end --> in the
README; the chart shows speed-ups: fastddpm against eager PyTorch, torch.compile and diffusers
(the GPU run), or each contender against its group's baseline (pytest benchmarks). Nothing
here is typed by hand: every figure comes from the JSON. A rehearsal's figures (CPU,
benchmarks/run_gpu.sh --rehearsal) are printed, never written into the README.
"""
from __future__ import annotations

import argparse
import json
import os

START, END = "<!-- results:start -->", "<!-- results:end -->"
RUN_FILES = ("1-env.json", "2-smoke.json", "3-kernels.json", "4-sampling.json", "5-tests.json")


def load(path):
    with open(path) as f:
        return json.load(f)


def merge(runs):
    """One payload from runs of the same device: records in run order, a later run's record
    replacing an earlier one of the same group and name."""
    devices = {r["device"] for r in runs}
    if len(devices) > 1:
        raise SystemExit(f"the JSONs come from different devices ({sorted(devices)}): ratios would not compare")
    data = dict(runs[-1])
    recs = {}
    for r in runs:
        for rec in r["records"]:
            recs[(rec["group"], rec["name"])] = rec
    data["records"] = list(recs.values())
    if len(runs) > 1:
        data["torch"] = ", ".join(sorted({r["torch"] for r in runs}))
        data["triton"] = ", ".join(sorted({r["triton"] for r in runs}))
    return data


def baseline_of(recs):
    """The record its benchmark declared the group's baseline (the first one otherwise)."""
    return next((r for r in recs if r.get("baseline")), recs[0])


def groups(data):
    out = {}
    for r in data["records"]:
        out.setdefault(r["group"], []).append(r)
    return out


def table(data) -> str:
    lines = [f"Device: **{data['device']}**, torch {data['torch']}, triton {data['triton']}, "
             f"{data['date'][:10]} (from `{data.get('_path', 'results.json')}`).", "",
             "| group | contender | us/call | speed-up vs baseline | figures |", "|---|---|---:|---:|---|"]
    for g, recs in groups(data).items():
        base = baseline_of(recs)
        for r in recs:
            figs = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                             if k in ("gb_per_s", "frac_of_copy_bw", "ms_per_step", "images_per_s", "overhead_ms",
                                      "overhead_pct", "first_call_s"))
            lines.append(f"| {g} | {r['name']} | {r['us_per_call']:.1f} | "
                         f"{base['us_per_call'] / r['us_per_call']:.2f}x vs {base['name']} | {figs} |")
    return "\n".join(lines)


def chart(data, path):
    rows = []
    for g, recs in groups(data).items():
        base = baseline_of(recs)
        rows.append((g, None))
        rows += [(r["name"], base["us_per_call"] / r["us_per_call"]) for r in recs]
    draw_bars(rows, f"speed-up over each group's baseline - {data['device']}", path)


def draw_bars(rows, title, path, width=900):
    """A bar per (label, speed-up) row; a row with value None is a heading."""
    from PIL import Image, ImageDraw

    top = max([v for _, v in rows if v] + [1.0])
    h = 22 * len(rows) + 40
    img = Image.new("RGB", (width, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black")
    x0, bar_w = 330, width - 410
    for i, (name, v) in enumerate(rows):
        y = 34 + 22 * i
        if v is None:
            d.text((10, y), name, fill="black")
            continue
        d.text((30, y), name[:48], fill="black")
        w = int(bar_w * v / top)
        d.rectangle([x0, y + 2, x0 + max(w, 1), y + 16], fill=(60, 120, 200) if v >= 1 else (200, 90, 60))
        d.text((x0 + w + 6, y), f"{v:.2f}x", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


# ------------------------------------------------------------------ the GPU run (benchmarks/gpu_run.py)
def load_run(paths):
    """{part: data} from an OUT folder or the part files themselves; all from one device."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += [os.path.join(path, f) for f in RUN_FILES if os.path.exists(os.path.join(path, f))]
        else:
            files.append(path)
    run = {}
    for f in files:
        d = load(f)
        d["_path"] = os.path.basename(f)
        run[d["part"]] = d
    if not run:
        raise SystemExit(f"no GPU-run files ({', '.join(RUN_FILES)}) in {paths}")
    devices = {d["device"] for d in run.values()}
    if len(devices) > 1:
        raise SystemExit(f"the JSONs come from different devices ({sorted(devices)}): ratios would not compare")
    return run


def _fmt_s(sec):
    return f"{sec / 3600:.1f} h" if sec >= 3600 else f"{sec / 60:.1f} min" if sec >= 60 else f"{sec:.1f} s"


def run_table(run) -> str:
    """The README's results from the GPU run: sampling, projections, kernels, smoke, tests."""
    any_part = next(iter(run.values()))
    rehearsal = any(d.get("rehearsal") for d in run.values())
    lines = []
    if rehearsal:
        lines += ["**REHEARSAL on the CPU (Triton's interpreter, tiny sizes): no figure below is a GPU figure.**", ""]
    incomplete = [f"{d['_path']} ({d.get('incomplete_reason')})" for d in run.values() if not d.get("complete")]
    lines.append(f"Device: **{any_part['device']}**, torch {any_part['torch']}, triton {any_part['triton']}, "
                 f"{any_part['started'][:10]} (`bash benchmarks/run_gpu.sh`: "
                 f"{', '.join(d['_path'] for d in sorted(run.values(), key=lambda d: d['part']))})."
                 + (f" Incomplete parts: {'; '.join(incomplete)}." if incomplete else ""))
    if 4 in run:
        lines += sampling_table(run[4])
    if 3 in run:
        lines += kernel_table(run[3])
    if 2 in run:
        lines += smoke_lines(run[2])
    if 5 in run:
        lines += ["", "Tests on the device: " + "; ".join(test_summary(r) for r in run[5]["rows"]) + "."]
    return "\n".join(lines)


def test_summary(r):
    if isinstance(r.get("skipped"), str):
        return f"`pytest {r['selection']}`: {r['skipped']}"
    cut = " (cut off by its budget)" if r["timed_out"] else ""
    return (f"`pytest {r['selection']}`: {r['passed']} passed, {r['failed']} failed, {r['errors']} errors, "
            f"{r['skipped']} skipped{cut}")


def sampling_table(d):
    rows = [r for r in d["rows"] if "ms_per_step" in r]
    backends = [b for b in ("graph", "fused", "reference", "diffusers") if any(r["backend"] == b for r in rows)]
    out = ["", f"Sampling, {d.get('model')} ({d.get('parameters', 0) / 1e6:.1f}M parameters), "
               f"{rows[0]['steps'] if rows else '?'} steps a call: ms per step (lower is better).", "",
           "| method | batch | " + " | ".join(backends) + " | graph vs reference | graph vs diffusers |",
           "|---|---:|" + "---:|" * (len(backends) + 2)]
    by = {(r["method"], r["batch"], r["backend"]): r for r in rows}
    for method, batch in dict.fromkeys((r["method"], r["batch"]) for r in rows):
        cells = [f"{by[method, batch, b]['ms_per_step']:.3g}" if (method, batch, b) in by else "-" for b in backends]
        g = by.get((method, batch, "graph"))
        ratio = lambda other: (f"{by[method, batch, other]['ms_per_step'] / g['ms_per_step']:.2f}x"  # noqa: E731
                               if g and (method, batch, other) in by else "-")
        out.append(f"| {method} | {batch} | " + " | ".join(cells) + f" | {ratio('reference')} | {ratio('diffusers')} |")
    proj = {}
    for r in rows:
        key = (r["method"], r["backend"])
        if key not in proj or r["projected_50k_s"] < proj[key]["projected_50k_s"]:
            proj[key] = r
    if proj:
        out += ["", "Projected wall time of 50,000 CIFAR-10-sized samples (ms/step x steps x batches, "
                    "at each backend's fastest measured batch):", "",
                "| method, steps | " + " | ".join(backends) + " |", "|---|" + "---:|" * len(backends)]
        for method in dict.fromkeys(r["method"] for r in rows):
            steps = next(r["projected_steps"] for r in rows if r["method"] == method)
            cells = [(f"{_fmt_s(proj[method, b]['projected_50k_s'])} (batch {proj[method, b]['batch']})"
                      if (method, b) in proj else "-") for b in backends]
            out.append(f"| {method}, {steps} | " + " | ".join(cells) + " |")
    return out


def kernel_table(d):
    rows = d["rows"]
    by = {(r["op"], tuple(r["shape"]), r["layout"], r["dtype"], r["contender"]): r for r in rows}
    out = ["", f"Step kernels: us per call, GB/s, and the fraction of the measured device-to-device copy "
               f"bandwidth ({d['copy_bytes_per_s'] / 1e9:.0f} GB/s, bytes read + written); bytes credited to "
               "every contender are the fused op's.", "",
           "| op | shape | layout | dtype | fused us | fused GB/s (of copy) | eager us | torch.compile us "
           "(compile s) | fused vs eager | fused vs torch.compile |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for op, shape, layout, dtype in dict.fromkeys(k[:4] for k in by):
        f, e, c = (by.get((op, shape, layout, dtype, n)) for n in ("fused", "eager", "torch.compile"))
        if not f or "us" not in f:
            continue
        measured = lambda r: r is not None and "us" in r  # noqa: E731
        eager_us = f"{e['us']:.1f}" if measured(e) else "-"
        compile_us = f"{c['us']:.1f} ({c['compile_s']:.1f})" if measured(c) else (c or {}).get("skipped", "-")
        vs_eager = f"{e['us'] / f['us']:.2f}x" if measured(e) else "-"
        vs_compile = f"{c['us'] / f['us']:.2f}x" if measured(c) else "-"
        out.append(f"| {op} | {'x'.join(map(str, shape))} | {layout} | {dtype} | {f['us']:.1f} | "
                   f"{f['gb_per_s']:.3g} ({f['frac_of_copy_bw']:.0%}) | {eager_us} | {compile_us} | {vs_eager} | "
                   f"{vs_compile} |")
    return out


def smoke_lines(d):
    worst = {}
    first = {}
    for r in d["rows"]:
        worst[r["backend"]] = max(worst.get(r["backend"], 0.0), r["rel_l2_vs_reference"])
        first[r["backend"]] = max(first.get(r["backend"], 0.0), r["first_call_s"])
    models = ", ".join(dict.fromkeys(r["model"] for r in d["rows"]))
    methods = ", ".join(dict.fromkeys(r["method"] for r in d["rows"]))
    return ["", f"Smoke ({models}; {methods}; same seed): largest relative L2 difference from the reference: "
                + ", ".join(f"{b} {v:.1e}" for b, v in worst.items() if b != "reference")
                + "; slowest first call (capture / compile): "
                + ", ".join(f"{b} {v:.1f} s" for b, v in first.items()) + "."]


def run_chart(run, path):
    rows = []
    if 4 in run:
        by = {(r["method"], r["batch"], r["backend"]): r["ms_per_step"] for r in run[4]["rows"] if "ms_per_step" in r}
        rows.append(("sampling: the graph backend's speed-up (ms/step)", None))
        for method, batch, b in by:
            if b in ("reference", "diffusers") and (method, batch, "graph") in by:
                rows.append((f"{method} b{batch} vs {b}", by[method, batch, b] / by[method, batch, "graph"]))
    if 3 in run:
        by = {(r["op"], tuple(r["shape"]), r["layout"], r["dtype"], r["contender"]): r for r in run[3]["rows"]
              if "us" in r}
        rows.append(("kernels: the fused op's speed-up (us/call)", None))
        for (op, shape, layout, dtype, name), r in by.items():
            f = by.get((op, shape, layout, dtype, "fused"))
            if name != "fused" and f:
                short = {"channels_last": "cl", "float32": "f32", "bfloat16": "bf16", "torch.compile": "compile"}
                label = " ".join(short.get(w, w) for w in (op, "x".join(map(str, shape)), layout, dtype, "vs", name))
                rows.append((label, r["us"] / f["us"]))
    device = next(iter(run.values()))["device"]
    rehearsal = any(d.get("rehearsal") for d in run.values())
    draw_bars(rows, f"fastddpm speed-ups - {device}" + (" - REHEARSAL, not GPU figures" if rehearsal else ""), path)


def update_readme(readme, text):
    with open(readme) as f:
        s = f.read()
    if START not in s or END not in s:
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    s = s[:s.index(START) + len(START)] + "\n" + text + "\n" + s[s.index(END):]
    with open(readme, "w") as f:
        f.write(s)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="the GPU run's OUT folder or part files, or JSONs written by "
                                           "pytest benchmarks on one device (records merged)")
    p.add_argument("--readme", help="README to update between the results markers")
    p.add_argument("--png", help="chart to write")
    a = p.parse_args(argv)
    if any(os.path.isdir(path) or "part" in load(path) for path in a.json):
        run = load_run(a.json)
        text = run_table(run)
        if a.readme and any(d.get("rehearsal") for d in run.values()):
            raise SystemExit("these are a rehearsal's figures (CPU): they never go into the README; run "
                             "benchmarks/run_gpu.sh on a GPU machine (the README is unchanged)")
        if a.png:
            run_chart(run, a.png)
    else:
        data = merge([load(path) for path in a.json])
        data["_path"] = ", ".join(os.path.basename(path) for path in a.json)
        text = table(data)
        if a.png:
            chart(data, a.png)
    if a.readme:
        update_readme(a.readme, text)
    else:
        print(text)


if __name__ == "__main__":
    main()

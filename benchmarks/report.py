"""Turn a benchmark JSON (written by `pytest benchmarks`) into the README's results table and a PNG chart.

    python benchmarks/report.py benchmarks/results/cuda-latest.json --readme README.md --png docs/results.png
    python benchmarks/report.py cuda-latest.json cuda-compile.json ...   # runs split over calls, one device

The table replaces the text between <!-- results:start --> and <!-- results:end --> in the
README; the chart shows, per group, each contender's speed-up over the group's baseline.
Nothing here is typed by hand: every figure comes from the JSON.
"""
from __future__ import annotations

import argparse
import json
import os

START, END = "<!-- results:start -->", "<!-- results:end -->"
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


def chart(data, path, width=900):
    from PIL import Image, ImageDraw

    rows = []
    for g, recs in groups(data).items():
        base = baseline_of(recs)
        rows.append((g, None))
        rows += [(r["name"], base["us_per_call"] / r["us_per_call"]) for r in recs]
    top = max([v for _, v in rows if v] + [1.0])
    h = 22 * len(rows) + 40
    img = Image.new("RGB", (width, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"speed-up over each group's baseline - {data['device']}", fill="black")
    x0, bar_w = 300, width - 380
    for i, (name, v) in enumerate(rows):
        y = 34 + 22 * i
        if v is None:
            d.text((10, y), name, fill="black")
            continue
        d.text((30, y), name[:40], fill="black")
        w = int(bar_w * v / top)
        d.rectangle([x0, y + 2, x0 + max(w, 1), y + 16], fill=(60, 120, 200) if v >= 1 else (200, 90, 60))
        d.text((x0 + w + 6, y), f"{v:.2f}x", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


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
    p.add_argument("json", nargs="+", help="JSONs written by pytest benchmarks on one device (records merged)")
    p.add_argument("--readme", help="README to update between the results markers")
    p.add_argument("--png", help="chart to write")
    a = p.parse_args(argv)
    data = merge([load(path) for path in a.json])
    data["_path"] = ", ".join(os.path.basename(path) for path in a.json)
    text = table(data)
    if a.readme:
        update_readme(a.readme, text)
    else:
        print(text)
    if a.png:
        chart(data, a.png)


if __name__ == "__main__":
    main()

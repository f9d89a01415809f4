"""Class-conditional digits and classifier-free guidance (issue 22): quality against the guidance scale.

    python benchmarks/quality_guidance.py                          # w = 0, 1, 2, 4 and the unconditional baseline
    python benchmarks/quality_guidance.py --table-only --readme README.md   # README table from the JSON

Protocol: the shipped class-conditional model (fastddpm.load("digits-cond")) sampled as the CLI
samples by default (DDIM, 50 steps, eta 0, clip 1 with eps from the clipped x0, seed 0, the
reference backend), 1000 images with class_labels i % 10 for image i (each digit 100 times,
evenly spread over the first images too), guidance_scale w (out_u + w (out_c - out_u): w = 0
is the model's unconditional output alone, w = 1 its conditional output alone). The images are
quantised to uint8 as `fastddpm sample` writes them and scored with fastddpm.quality's digit
classifier (the one `fastddpm eval` uses):
- accuracy: the share of images the classifier labels as the digit asked for (and per digit);
  the classifier's accuracy on the 297 held-out real digits is the ceiling beside it;
- FD (Frechet distance of the classifier's 32-d features) of all 1000 images against the 297
  held-out real digits, and against the training digits (`fastddpm eval`'s reference, the
  README's other tables);
- per-digit FD: the 100 images of digit c against the held-out real digits of c (about 30 each:
  fewer than the 32 feature dimensions, so these FDs are biased upwards and noisy; the floor
  column scores 100 training digits of c against the same held-out ones);
- the unconditional shipped model (fastddpm.load()) under the same protocol (no labels): the
  baseline of w = 0 (issue 22's target: w = 0 within 10% of it).
Each run's uint8 images are kept in --samples-dir, its figures written to --out (JSON) as soon as
it finishes; a rerun skips the runs already in the JSON. --readme rewrites the table between
<!-- guidance:start --> and <!-- guidance:end -->.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import fastddpm

HERE = os.path.dirname(os.path.abspath(__file__))
N, STEPS, METHOD, SEED = 1000, 50, "ddim", 0
SCALES = (0.0, 1.0, 2.0, 4.0)
BASELINE = "unconditional digits model"


def _load_json(path):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {"protocol": None, "reference": None, "runs": {}}


def _save_json(data, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


class Judge:
    """The digit classifier's figures for uint8 NHWC images, with the requested labels."""

    def __init__(self):
        from fastddpm.data import digits_labels, load_digits
        from fastddpm.quality import load_classifier

        self.clf = load_classifier()
        with torch.no_grad():
            self.train_feats = self.clf.features(load_digits("train"))
            self.held_x, self.held_y = load_digits("heldout"), digits_labels("heldout")
            self.held_feats = self.clf.features(self.held_x)
        self.train_y = digits_labels("train")

    def reference(self) -> dict:
        """The real digits' figures: the classifier's held-out accuracy, the training digits' FD against the
        held-out ones, and the per-digit floor (100 training digits of c against the held-out digits of c)."""
        from fastddpm.quality import frechet_distance

        with torch.no_grad():
            acc = float((self.clf(self.held_x).argmax(1) == self.held_y).double().mean())
        floor = [frechet_distance(self.train_feats[self.train_y == c][:100], self.held_feats[self.held_y == c])
                 for c in range(10)]
        return {"heldout_n": len(self.held_y), "heldout_per_digit": torch.bincount(self.held_y, minlength=10).tolist(),
                "classifier_heldout_accuracy": acc,
                "fd_heldout_train_digits": frechet_distance(self.train_feats, self.held_feats),
                "fd_class_heldout_floor": floor, "fd_class_heldout_floor_mean": float(np.mean(floor))}

    @torch.no_grad()
    def __call__(self, images_uint8, labels=None) -> dict:
        from fastddpm.quality import frechet_distance, to_model_space

        x = to_model_space(images_uint8)
        feats = self.clf.features(x)
        probs = F.softmax(self.clf.head(feats), dim=1)
        pred = probs.argmax(1)
        res = {"n": len(x), "fd_heldout": frechet_distance(feats, self.held_feats),
               "fd_train": frechet_distance(feats, self.train_feats),
               "confidence": float(probs.max(1).values.mean()),
               "histogram": torch.bincount(pred, minlength=10).tolist()}
        if labels is not None:
            hit = pred == labels
            res["accuracy"] = float(hit.double().mean())
            res["accuracy_per_digit"] = [float(hit[labels == c].double().mean()) for c in range(10)]
            fd_c = [frechet_distance(feats[labels == c], self.held_feats[self.held_y == c]) for c in range(10)]
            res["fd_class_heldout"] = fd_c
            res["fd_class_heldout_mean"] = float(np.mean(fd_c))
        return res


def run_one(model, judge, key, w, batch_size, samples_dir):
    from fastddpm.images import to_uint8_nhwc

    labels = torch.arange(N) % 10 if w is not None else None
    guidance = {} if w is None else {"class_labels": labels, "guidance_scale": w}
    t0 = time.perf_counter()
    x = fastddpm.sample(model, N, steps=STEPS, method=METHOD, seed=SEED, batch_size=batch_size, backend="reference",
                        prediction=getattr(model, "fastddpm_prediction", "eps"), **guidance)
    seconds = time.perf_counter() - t0
    arr = to_uint8_nhwc(x)
    os.makedirs(samples_dir, exist_ok=True)
    np.savez(os.path.join(samples_dir, f"{key}.npz"), arr_0=arr)
    return {"model": BASELINE if w is None else "digits-cond", "guidance_scale": w, **judge(arr, labels),
            "seconds": seconds, "threads": torch.get_num_threads(), "batch_size": batch_size}


def _key(w):
    return "unconditional" if w is None else f"w={w:g}"


def table(data) -> str:
    runs, ref = data["runs"], data["reference"]
    base = runs.get(_key(None))
    lines = ["| model, guidance scale w | class accuracy | FD vs held-out (1000 vs 297) | FD vs training digits "
             "| per-digit FD vs held-out, mean | confidence |",
             "|---|---:|---:|---:|---:|---:|"]
    for w in sorted(r["guidance_scale"] for r in runs.values() if r["guidance_scale"] is not None):
        r = runs[_key(w)]
        rel = ""
        if w == 0 and base:
            rel = (f" ({100 * (r['fd_heldout'] / base['fd_heldout'] - 1):+.0f}%)",
                   f" ({100 * (r['fd_train'] / base['fd_train'] - 1):+.0f}%)")
        else:
            rel = ("", "")
        # w = 0 ignores the labels: its accuracy is chance (10%) and its per-digit FD compares unrelated sets
        acc = f"{100 * r['accuracy']:.1f}%" + (" (labels unused)" if w == 0 else "")
        per_fd = "-" if w == 0 else f"{r['fd_class_heldout_mean']:.1f}"
        lines.append(f"| digits-cond, w = {w:g}{' (unconditional)' if w == 0 else ''}"
                     f"{' (conditional, no guidance)' if w == 1 else ''} | {acc} "
                     f"| {r['fd_heldout']:.2f}{rel[0]} | {r['fd_train']:.2f}{rel[1]} "
                     f"| {per_fd} | {r['confidence']:.3f} |")
    if base:
        lines.append(f"| digits (the shipped unconditional model; w = 0's % against it) | - "
                     f"| {base['fd_heldout']:.2f} | {base['fd_train']:.2f} | - | {base['confidence']:.3f} |")
    if ref:
        lines.append(f"| real digits (held-out / training) | {100 * ref['classifier_heldout_accuracy']:.1f}% "
                     f"(held-out) | {ref['fd_heldout_train_digits']:.2f} (1500 training digits) | - | "
                     f"{ref['fd_class_heldout_floor_mean']:.1f} (100 training digits of c) | - |")
    per = ["", "Per digit (accuracy % / FD of its 100 images against its held-out real digits):", "",
           "| w | " + " | ".join(str(c) for c in range(10)) + " |", "|---|" + "---:|" * 10]
    for w in sorted(r["guidance_scale"] for r in runs.values() if r["guidance_scale"]):  # not w = 0
        r = runs[_key(w)]
        per.append(f"| {w:g} | " + " | ".join(f"{100 * a:.0f} / {f:.0f}" for a, f in
                                              zip(r["accuracy_per_digit"], r["fd_class_heldout"])) + " |")
    if ref:
        per.append("| real (floor) | " + " | ".join(f"- / {f:.0f}" for f in ref["fd_class_heldout_floor"]) + " |")
    return "\n".join(lines + per)


def update_readme(readme, text):
    start, end = "<!-- guidance:start -->", "<!-- guidance:end -->"
    with open(readme) as f:
        body = f.read()
    if start not in body or end not in body:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{start}\n{text}\n{end}{tail}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", type=float, nargs="+", default=list(SCALES), help="guidance scales w")
    p.add_argument("--no-baseline", action="store_true", help="skip the unconditional model's run")
    p.add_argument("--batch-size", type=int, default=250, help="images per model call (a guided call doubles it)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "quality_guidance.json"))
    p.add_argument("--samples-dir", default="/tmp/fastddpm-quality-guidance")
    p.add_argument("--readme", default=None, help="rewrite this README's guidance table")
    p.add_argument("--table-only", action="store_true", help="no sampling: the table (and README) from the JSON")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    data = _load_json(a.out)
    if not a.table_only:
        judge = Judge()
        data["protocol"] = {"model": "fastddpm.load('digits-cond')", "n": N, "steps": STEPS, "method": METHOD,
                            "seed": SEED, "backend": "reference", "class_labels": "i % 10 for image i",
                            "figures": "fastddpm.quality's classifier on the uint8 images (fastddpm eval)",
                            "baseline": f"{BASELINE}: fastddpm.load(), the same protocol without labels"}
        data["reference"] = judge.reference()
        todo = ([] if a.no_baseline else [None]) + list(a.scales)
        for w in todo:
            key = _key(w)
            if key in data["runs"]:
                continue
            model = fastddpm.load() if w is None else fastddpm.load("digits-cond")
            row = run_one(model, judge, key, w, a.batch_size, a.samples_dir)
            data["runs"][key] = row
            print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
            _save_json(data, a.out)
        _save_json(data, a.out)
    text = table(data)
    print(text)
    if a.readme:
        update_readme(a.readme, text)


if __name__ == "__main__":
    sys.exit(main())

"""The schema of the GPU run's files (benchmarks/gpu_run.py), checked by hand: no dependency.

    python -m benchmarks.gpu_schema OUT [--complete] [--rehearsal]   # exit 1 and list the problems

Every file: the common fields below; parts 1-4 the kernel-variant count; each row the fields
of its part (a row may instead say why it was "skipped"). --complete also requires every
part to have ended within its budget; --rehearsal that every file is a rehearsal's (CPU) and
that the smoke part's backends agree with the reference to SMOKE_TOL.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

NUM = (int, float)
SMOKE_TOL = 1e-4  # DESIGN.md: whole sampling loops against the reference, relative L2
OPT_STR = (str, type(None))
FILES = {1: "1-env.json", 2: "2-smoke.json", 3: "3-kernels.json", 4: "4-sampling.json", 5: "5-tests.json"}

COMMON = {"part": int, "name": str, "rehearsal": bool, "device": str, "cuda": (bool, type(None)),
          "torch": OPT_STR, "triton": OPT_STR, "started": str, "budget_s": NUM, "wall_s": (*NUM, type(None)),
          "complete": bool, "incomplete_reason": OPT_STR, "rows": list}
VARIANTS = {"variants": int, "per_kernel": dict, "method": str}
ROWS = {
    1: {"check": str, "backend": str, "max_abs_diff": NUM, "ok": bool},
    2: {"model": str, "n": int, "steps": int, "method": str, "backend": str, "first_call_s": NUM, "steady_s": NUM,
        "rel_l2_vs_reference": NUM, "max_abs_vs_reference": NUM, "finite": bool},
    3: {"op": str, "shape": list, "layout": str, "dtype": str, "contender": str, "bytes": int},
    4: {"backend": str, "method": str, "batch": int, "steps": int, "ms_per_step": NUM, "images_per_s": NUM,
        "first_call_s": NUM, "projected_50k_s": NUM, "projected_steps": int},
    5: {"selection": str},
}
MEASURED = {  # what a row that was not skipped also holds
    3: {"us": NUM, "gb_per_s": NUM, "frac_of_copy_bw": NUM},
    5: {"returncode": int, "timed_out": bool, "wall_s": NUM, "passed": int, "failed": int, "errors": int,
        "skipped": int, "failures": list},
}
PART_FIELDS = {3: {"copy_bytes_per_s": NUM}}
CHOICES = {2: {"backend": ("reference", "fused", "graph")},
           3: {"layout": ("contig", "channels_last"), "contender": ("fused", "eager", "torch.compile")},
           4: {"backend": ("reference", "fused", "graph", "diffusers")}}


def _fields(obj, spec, where):
    problems = []
    for key, kind in spec.items():
        if key not in obj:
            problems.append(f"{where}: missing {key!r}")
        elif isinstance(obj[key], bool) and kind in (int, NUM):
            problems.append(f"{where}: {key!r} must be a number, got a bool")
        elif not isinstance(obj[key], kind):
            problems.append(f"{where}: {key!r} must be {kind}, got {type(obj[key]).__name__} {obj[key]!r:.60}")
        elif isinstance(obj[key], float) and not (math.isfinite(obj[key]) and obj[key] >= 0):
            if key not in ("rel_l2_vs_reference", "max_abs_vs_reference", "max_abs_diff"):  # NaN there is a finding
                problems.append(f"{where}: {key!r} must be finite and >= 0, got {obj[key]}")
    return problems


def validate(data, part=None) -> list[str]:
    """The problems of one part's file (an empty list: valid)."""
    if not isinstance(data, dict):
        return [f"the file must hold a JSON object, got {type(data).__name__}"]
    problems = _fields(data, COMMON, "file")
    part = part if part is not None else data.get("part")
    if part not in ROWS:
        return problems + [f"file: 'part' must be one of {sorted(ROWS)}, got {part!r}"]
    if data.get("part") != part:
        problems.append(f"file: 'part' is {data.get('part')!r} in the file of part {part}")
    if data.get("complete") is True and data.get("incomplete_reason") is not None:
        problems.append("file: complete, yet an incomplete_reason is given")
    if data.get("complete") is False and not data.get("incomplete_reason"):
        problems.append("file: incomplete without an incomplete_reason")
    gpu = data.get("cuda") is True or not str(data.get("device")).startswith(("CPU", "unknown"))
    if data.get("rehearsal") is True and gpu:
        problems.append("file: a rehearsal must name a CPU device and cuda false")
    if data.get("complete"):
        if part <= 4:
            problems += _fields(data.get("variants", {}), VARIANTS, "file variants") if "variants" in data else [
                "file: missing 'variants' (kernel variants compiled)"]
        problems += _fields(data, PART_FIELDS.get(part, {}), "file")
        if not data.get("rows"):
            problems.append("file: complete with no rows")
    for i, row in enumerate(data.get("rows") or []):
        where = f"row {i}"
        if not isinstance(row, dict):
            problems.append(f"{where}: must be an object")
            continue
        problems += _fields(row, ROWS[part], where)
        skipped = isinstance(row.get("skipped"), str)  # why the row was not measured (part 5: a count)
        if part in MEASURED and not skipped:
            problems += _fields(row, MEASURED[part], where)
        for key, allowed in CHOICES.get(part, {}).items():
            if key in row and row[key] not in allowed:
                problems.append(f"{where}: {key!r} must be one of {allowed}, got {row[key]!r}")
    return problems


def validate_dir(out, complete=False, rehearsal=None) -> list[str]:
    """The problems of the five files in `out`, each prefixed with its file's name."""
    problems = []
    for part, name in FILES.items():
        path = os.path.join(out, name)
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            problems.append(f"{name}: cannot be read: {e}")
            continue
        problems += [f"{name}: {p}" for p in validate(data, part)]
        if complete and data.get("complete") is not True:
            problems.append(f"{name}: incomplete ({data.get('incomplete_reason')})")
        if rehearsal is not None and data.get("rehearsal") is not rehearsal:
            problems.append(f"{name}: rehearsal is {data.get('rehearsal')!r}, expected {rehearsal}")
        if rehearsal and part == 2:  # on the CPU every backend runs the reference's numbers (3 steps)
            problems += [f"{name}: row {i}: {r.get('backend')} differs from the reference by "
                         f"{r.get('rel_l2_vs_reference')} (relative L2; at most {SMOKE_TOL} in a rehearsal)"
                         for i, r in enumerate(data.get("rows") or [])
                         if not (r.get("finite") and r.get("rel_l2_vs_reference", 1.0) <= SMOKE_TOL)]
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the folder the GPU run wrote")
    p.add_argument("--complete", action="store_true", help="require every part to have completed")
    p.add_argument("--rehearsal", action="store_true", help="require every file to be a rehearsal's")
    a = p.parse_args(argv)
    problems = validate_dir(a.out, a.complete, True if a.rehearsal else None)
    for line in problems:
        print(line, file=sys.stderr)
    print(f"{a.out}: {len(problems)} problem(s) in {len(FILES)} files")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

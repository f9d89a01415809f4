"""pytest hooks and fixtures of the benchmark suite (the helpers live in harness.py)."""
import datetime
import json
import os

import pytest
import torch

from harness import BASELINES, CUDA, DEVICE, RECORDS, device_name, sync


@pytest.fixture
def record(benchmark):
    def _record(group, name, seconds, baseline=False, **figures):
        rec = {"group": group, "name": name, "us_per_call": seconds * 1e6, "baseline": bool(baseline), **figures}
        RECORDS.append(rec)
        if baseline:
            BASELINES[group] = seconds
        benchmark.extra_info.update(rec)
        return rec

    return _record


@pytest.fixture(scope="session")
def copy_bandwidth():
    """Device-to-device copy bandwidth (bytes read + written per second) on a 256 MB tensor."""
    n = (64 if CUDA else 4) * 2**20
    a = torch.empty(n, device=DEVICE)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync()
    import time

    reps = 20 if CUDA else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync()
    return 8 * n * reps / (time.perf_counter() - t0)


def pytest_sessionfinish(session, exitstatus):
    if not RECORDS:
        return
    import triton

    out = os.environ.get("FASTDDPM_BENCH_JSON") or os.path.join(
        os.path.dirname(__file__), "results", ("cuda-" if CUDA else "cpu-") + "latest.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    payload = {"device": device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "torch": torch.__version__, "triton": triton.__version__, "cuda": CUDA, "records": RECORDS}
    with open(out, "w") as f:
        json.dump(payload, f, indent=1)
    session.config._fastddpm_json = out


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RECORDS:
        return
    tr = terminalreporter
    tr.section(f"fastddpm benchmark summary: {device_name()}")
    tr.write_line(f"{'group':<34} {'name':<28} {'us/call':>11} {'vs base':>8}  figures")
    for r in RECORDS:
        base = BASELINES.get(r["group"])
        ratio = f"{base / (r['us_per_call'] / 1e6):7.2f}x" if base else "       "
        figs = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                         if k not in ("group", "name", "us_per_call", "baseline"))
        tr.write_line(f"{r['group']:<34} {r['name']:<28} {r['us_per_call']:11.1f} {ratio}  {figs}")
    path = getattr(config, "_fastddpm_json", None)
    if path:
        tr.write_line(f"full numbers: {path}")
    if not CUDA:
        tr.write_line("CPU run: the fused kernels ran under Triton's interpreter; their times say nothing "
                      "about GPU speed. Ratios are speedups over each group's baseline (higher is faster).")

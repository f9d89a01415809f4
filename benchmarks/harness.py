"""Benchmark harness helpers: pytest-benchmark timing, rotated inputs, a JSON record, a summary table.

Each benchmark calls `record(group, name, seconds_per_call, **figures)`. At the end of the
session the records are written to benchmarks/results/<device>.json (override with
FASTDDPM_BENCH_JSON) with the device, torch and triton versions, and a short table of
ratios against each group's baseline is printed.

Timing rules: warm-up outside the measurement; on CUDA one synchronize after K calls
(never per call), so host clocks read finished work; inputs rotate over enough copies
to exceed the L2 cache; the figure kept is the median round.
"""
import os
import platform

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
RECORDS = []
BASELINES = {}


def device_name():
    return torch.cuda.get_device_name() if CUDA else f"CPU ({platform.processor() or platform.machine()}, " \
                                                     f"{torch.get_num_threads()} threads)"


def sync():
    if CUDA:
        torch.cuda.synchronize()


def run_rounds(benchmark, fns, calls_per_round=None, rounds=None):
    """Time `fns` (a list of zero-argument callables over rotated inputs) with pytest-benchmark;
    returns the median seconds per call."""
    k = calls_per_round or (50 if CUDA else 3)
    rounds = rounds or (20 if CUDA else 3)

    def one_round():
        for j in range(k):
            fns[j % len(fns)]()
        sync()

    for _ in range(2 if CUDA else 1):  # warm-up: compilation, autotuning, allocator
        one_round()
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    return benchmark.stats.stats.median / k


def rotations(bytes_per_set):
    """How many input copies to cycle through so the working set exceeds a 50 MB L2."""
    if not CUDA:
        return 1
    return max(1, min(16, int(2 * 50e6 // max(bytes_per_set, 1)) + 1))




def median_seconds(fn, reps=None, warmup=2):
    """Median wall time of fn() (synchronised), for figures beside the pytest-benchmark one."""
    import statistics
    import time

    reps = reps or (20 if CUDA else 3)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

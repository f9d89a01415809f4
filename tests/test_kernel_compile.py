"""Every kernel variant fastddpm launches compiles for an H100 (sm_90) through Triton's real
compiler, specialised as a real launch is, also on machines without a GPU (see
kernel_compile_check.py): the interpreter, which runs the kernels in the other CPU tests,
does not prove that they compile. Also: how many kernels a whole sampling run compiles."""
import os
import subprocess
import sys

import pytest
import torch

import fastddpm
from fastddpm import graphs


def test_all_kernel_variants_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's own default; silences a 3.9 notice
    script = os.path.join(os.path.dirname(__file__), "kernel_compile_check.py")
    res = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=1200)
    print(res.stdout[-8000:], res.stderr[-4000:])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert ", 0 failures" in res.stdout


@pytest.mark.parametrize("backend", ["fused", "graph"])
@pytest.mark.parametrize("method,steps,cl", [("ddpm", 1000, False), ("ddim", 50, False), ("ddpm", 1000, True),
                                             ("dpmsolver++", 20, False), ("sde-dpmsolver++", 20, True)])
def test_a_sampling_run_compiles_a_handful_of_kernels(monkeypatch, backend, method, steps, cl):
    """Count the kernels Triton's JIT would compile for every launch of a whole sampling run.

    The kernels' launches are recorded, not run (tests/kernel_launches.py): the sampler's
    numbers are not looked at here, only the launch arguments. Each launch is bound through
    Triton's own binder for an sm_90 target and keyed by Triton's own cache key
    (compute_cache_key), which is what decides, on a GPU, whether a launch reuses a compiled
    kernel. Before the step index, seed halves, sample offset and tag were unspecialised, a
    1000-step DDPM run compiled a kernel for t == 1 and one per divisible-by-16 pattern of t.
    The graph loop on the CPU is emulated (graphs.EMULATE_ON_CPU: the same launches, eager)."""
    pytest.importorskip("triton.backends.nvidia")
    import kernel_launches as kl

    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear_cache()

    def model(x, t):
        y = 0.1 * x
        return y.contiguous(memory_format=torch.channels_last) if cl else y

    with kl.record() as (launches, _):
        fastddpm.sample(model, 3, shape=(3, 8, 8), steps=steps, method=method, eta=0.0, seed=5,
                        sample_offset=2**31 + 1, backend=backend, batch_size=2)
    graphs.clear_cache()
    variants = kl.distinct_variants(launches)
    per_kernel = {}
    for name, _ in variants:
        per_kernel[name] = per_kernel.get(name, 0) + 1
    print(len(launches), "launches", per_kernel)
    kernel = "step_kernel" if method in ("ddpm", "ddim") else "dpm_step_kernel"
    # every step of both batches (the graph loop adds its warm-up steps)
    assert sum(1 for launch in launches if launch.name == kernel) >= 2 * steps
    # one step kernel for the whole run although the step index, seed and batch offset vary
    # per launch (DPM-Solver++: also its first-order first and last steps, which read the zeroed
    # previous x0 with a zero coefficient); the graph loop also draws x_T in a kernel (one more
    # variant; two when the model returns channels_last but has no weights to tell the layout
    # before its first call, which then draws x_T contiguous)
    assert per_kernel.get(kernel) == 1, per_kernel
    assert set(per_kernel) <= {kernel, "normal_kernel"}, per_kernel
    assert per_kernel.get("normal_kernel", 0) == (0 if backend == "fused" else 2 if cl else 1), per_kernel

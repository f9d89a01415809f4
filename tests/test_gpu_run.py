"""The GPU run (benchmarks/run_gpu.sh, benchmarks/gpu_run.py) rehearsed on the CPU: its files,
their schema (benchmarks/gpu_schema.py), a part cut off by its budget, and the report on a
rehearsal's files (printed, never written into a README). CI also runs the whole rehearsal
(.ci/run); here a minimal one: parts 1, 3 and 4."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)

from benchmarks import gpu_run, gpu_schema  # noqa: E402


def run(*args, check=True):
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-run")
    run("-m", "benchmarks.gpu_run", "--rehearsal", str(out), "--parts", "1,3,4")
    return out


def load(out, part):
    with open(os.path.join(out, gpu_schema.FILES[part])) as f:
        return json.load(f)


def test_rehearsal_files_are_valid_complete_and_marked(rehearsal):
    for part in (1, 3, 4):
        d = load(rehearsal, part)
        assert gpu_schema.validate(d, part) == []
        assert d["complete"] and d["rehearsal"] and not d["cuda"] and d["device"].startswith("CPU")
        assert d["variants"]["variants"] >= 1, d["variants"]  # the kernels a GPU would compile for it
    assert load(rehearsal, 1)["rows"][0]["ok"]
    kernels = load(rehearsal, 3)
    assert {(r["op"], r["layout"], r["dtype"], r["contender"]) for r in kernels["rows"]} == {
        (op, lay, dt, c) for op in ("ddpm_step", "q_sample") for lay in ("contig", "channels_last")
        for dt in ("float32", "bfloat16") for c in ("fused", "eager", "torch.compile")}
    # one step and one q_sample kernel per (shape, layout, model-output dtype)
    assert kernels["variants"]["per_kernel"] == {"step_kernel": 8, "q_sample_kernel": 8}
    sampling = load(rehearsal, 4)
    cfg = gpu_run.Config(rehearsal=True)
    got = {(r["backend"], r["method"], r["batch"]) for r in sampling["rows"]}
    assert {(b, m, n) for b in gpu_run.BACKENDS for m in gpu_run.PROJECTIONS for n in cfg.batches} <= got


def test_rehearsal_sampling_has_guided_rows_after_the_unguided_ones(rehearsal):
    """Part 4 ends with classifier-free guided DPM-Solver++ rows (w = 4) per batch and backend
    (graph, fused, diffusers' guidance loop), each with its cost over the unguided row."""
    d = load(rehearsal, 4)
    method = f"{gpu_run.GUIDED_METHOD} w={gpu_run.GUIDANCE_SCALE:g}"
    rows = [r for r in d["rows"] if r["method"] == method]
    first = next(i for i, r in enumerate(d["rows"]) if r["method"] == method)
    assert all(r["method"] == method for r in d["rows"][first:])  # never in place of an unguided row
    info = d["guided"]
    assert info["stopped"] is None and info["rows"] == len(rows) and info["guidance_scale"] == 4.0
    cfg = gpu_run.Config(rehearsal=True)
    others = {r["backend"] for r in d["rows"][:first]} - {"reference"}
    assert {(r["backend"], r["batch"]) for r in rows} == {(b, n) for b in others for n in cfg.batches}
    assert all(r["vs_unguided"] > 0 and r["guidance_scale"] == 4.0 for r in rows)


def test_a_part_cut_off_by_its_budget_keeps_its_rows_and_says_so(tmp_path):
    res = run("-m", "benchmarks.gpu_run", "--rehearsal", str(tmp_path), "--parts", "2", "--budget-scale", "0.0001",
              check=False)
    assert res.returncode == 1  # an incomplete part
    d = load(tmp_path, 2)
    assert gpu_schema.validate(d, 2) == []
    assert d["complete"] is False and d["incomplete_reason"].startswith("budget of")
    assert len(d["rows"]) < len(gpu_run.METHODS) * len(gpu_run.BACKENDS) * 2  # stopped between rows


def test_a_part_that_wrote_nothing_or_died_is_marked_incomplete(tmp_path):
    path = str(tmp_path / "4-sampling.json")
    gpu_run.mark_incomplete(path, 4, True, 5.0, "cut off")
    d = json.load(open(path))
    assert d["complete"] is False and d["incomplete_reason"] == "cut off" and gpu_schema.validate(d, 4) == []
    d.update(device="CPU (x)", cuda=False, rows=[{"backend": "graph", "method": "ddpm", "batch": 1, "steps": 3,
                                                   "ms_per_step": 1.0, "images_per_s": 1.0, "first_call_s": 1.0,
                                                   "projected_50k_s": 1.0, "projected_steps": 1000}])
    json.dump(d, open(path, "w"))
    gpu_run.mark_incomplete(path, 4, True, 5.0, "its process exited with -9")
    d = json.load(open(path))
    assert len(d["rows"]) == 1 and d["incomplete_reason"] == "its process exited with -9"


def test_compiled_variants_are_counted_from_the_jits_own_cache():
    """On a GPU the count is the growth of each kernel's in-memory JIT cache: device_caches[device]
    is (kernel_cache, kernel_key_cache, target, backend, binder) and JITFunction.run stores one
    compiled kernel per key in kernel_cache, in Triton 3.6 and 3.9 alike (read from its source here;
    the launch itself needs a GPU)."""
    import inspect

    from triton.runtime.jit import JITFunction

    from benchmarks import gpu_variants

    src = inspect.getsource(JITFunction)
    assert "kernel_cache, kernel_key_cache, target, backend, binder = self.device_caches[device]" in src
    assert "kernel_cache[key] = kernel" in src
    kl = gpu_variants._kernel_launches()
    step = kl.jit_function(gpu_variants.fastddpm_kernels()["step.step_kernel"])  # a JITFunction even when interpreted
    kernels = {"step": step}
    assert gpu_variants.jit_cache_sizes(kernels) == {"step": 0}
    step.device_caches[0] = ({"key a": object(), "key b": object()}, {}, None, None, None)
    step.device_caches[1] = ({"key a": object()}, {}, None, None, None)
    assert gpu_variants.jit_cache_sizes(kernels) == {"step": 3}


def test_the_schema_names_what_is_wrong(rehearsal):
    d = load(rehearsal, 3)
    assert gpu_schema.validate(d, 3) == []
    bad = json.loads(json.dumps(d))
    del bad["rows"][0]["us"]
    bad["rows"][1]["contender"] = "numpy"
    bad["cuda"] = True
    bad["variants"]["variants"] = "many"
    problems = gpu_schema.validate(bad, 3)
    assert any("row 0: missing 'us'" in p for p in problems), problems
    assert any("row 1: 'contender' must be one of" in p for p in problems), problems
    assert any("rehearsal must name a CPU device" in p for p in problems), problems
    assert any("'variants' must be" in p for p in problems), problems
    bad = dict(d, complete=False, incomplete_reason=None)
    assert any("incomplete without" in p for p in gpu_schema.validate(bad, 3))
    assert gpu_schema.validate(d, 4)  # part 3's file is not part 4's


def test_the_report_prints_a_rehearsal_and_never_writes_it_into_the_readme(rehearsal, tmp_path):
    readme = tmp_path / "README.md"
    text = "intro\n<!-- results:start -->\nGPU figures pending (no GPU run yet).\n<!-- results:end -->\n"
    readme.write_text(text)
    png = tmp_path / "results.png"
    res = run("-m", "benchmarks.report", str(rehearsal), "--png", str(png))
    assert res.stdout.startswith("**REHEARSAL on the CPU")
    assert "| ddpm_step | 4x3x8x8 | contig | float32 |" in res.stdout and "| dpmsolver++ | 2 |" in res.stdout
    assert png.stat().st_size > 1000
    res = run("-m", "benchmarks.report", str(rehearsal), "--readme", str(readme), check=False)
    assert res.returncode != 0 and "never go into the README" in res.stderr
    assert readme.read_text() == text


def test_the_report_writes_gpu_files_into_the_readme(rehearsal, tmp_path):
    """The same files as if a GPU had written them: the table names the device and its figures."""
    out = tmp_path / "out"
    out.mkdir()
    for part in (3, 4):
        d = load(rehearsal, part)
        d.update(rehearsal=False, cuda=True, device="NVIDIA H100 80GB HBM3", triton="3.6.0")
        d.pop("note", None)
        (out / gpu_schema.FILES[part]).write_text(json.dumps(d))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\nrest\n")
    run("-m", "benchmarks.report", str(out), "--readme", str(readme), "--png", str(tmp_path / "r.png"))
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("rest")
    assert "Device: **NVIDIA H100 80GB HBM3**" in text and "REHEARSAL" not in text
    fused = next(r for r in load(rehearsal, 3)["rows"] if r["contender"] == "fused")
    assert f"| {fused['us']:.1f} |" in text


def test_a_carried_cache_entry_is_named_by_the_key_a_launch_computes(tmp_path):
    """benchmarks/triton_cache.py: one launch of the GPU run, bound for sm_90 and compiled into a
    cache folder, lands in the entry its own key computation names (what a GPU's JIT looks up)."""
    pytest.importorskip("triton.backends.nvidia")
    script = f"""
import os, sys
os.environ["TRITON_CACHE_DIR"] = {str(tmp_path)!r}
sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]
import torch, kernel_launches as kl
from fastddpm import Schedule, ops
from benchmarks import triton_cache
ops._use_kernels = lambda x: True
with kl.record() as (launches, _):
    ops.ddpm_step(Schedule.linear(1000), torch.randn(2, 3, 8, 8), 5, torch.randn(2, 3, 8, 8), seed=1)
(bound, _), = kl.distinct_variants(launches).values()
entry = triton_cache.expected_entry(bound)
assert not os.path.exists(os.path.join({str(tmp_path)!r}, entry))
bound.compile()
assert sorted(os.listdir(os.path.join({str(tmp_path)!r}, entry)))[-1].endswith(".ttir"), entry
print("entry", entry)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "entry " in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]


def test_the_key_of_another_build_swaps_only_libtritons_hash(tmp_path):
    """--key-of WHEEL: the same Triton version built for another Python gets the local key with its
    libtriton's hash; a wheel whose Python files differ is refused (not the same Triton)."""
    import hashlib
    import zipfile

    import triton
    from triton.runtime.cache import triton_key

    from benchmarks import triton_cache

    local = os.path.dirname(triton.__file__)

    def wheel(name, changed=None):
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as z:
            for d, _, files in os.walk(local):
                for f in files:
                    if f.endswith(".py"):
                        rel = os.path.relpath(os.path.join(d, f), local)
                        z.writestr("triton/" + rel, b"# another version" if rel == changed else
                                   open(os.path.join(d, f), "rb").read())
            z.writestr("triton/_C/libtriton.so", b"another build")
        return str(path)

    key = triton_cache.key_of_wheel(wheel("same.whl"))
    assert key != triton_key() and hashlib.sha256(b"another build").hexdigest() in key
    assert len(key) == len(triton_key())
    with pytest.raises(SystemExit, match="Python files differ"):
        triton_cache.key_of_wheel(wheel("other.whl", changed=os.path.join("language", "core.py")))

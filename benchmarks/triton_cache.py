"""Compile, without a GPU, the Triton kernels the GPU run (benchmarks/gpu_run.py, parts 1-4)
will launch, into a Triton cache that can travel to the GPU machine and be hit there.

    python benchmarks/triton_cache.py benchmarks/triton-cache-sm90   # no TRITON_INTERPRET; see below

How: the GPU run's launches are recorded on CPU tensors of the GPU run's shapes (the kernels
are not run: tests/kernel_launches.py), each is bound through Triton's own binder for sm_90 (the
specialisation a launch on an H100 gets), and each distinct variant is compiled by
`triton.compile` with TRITON_CACHE_DIR pointing at the folder, exactly the call the JIT makes
on a cache miss. Triton names each cache entry by sha256 of get_cache_key(source, backend,
options, cache-invalidating environment variables), where the first term, triton_key(), hashes
Triton's own Python files AND its compiled libtriton: the entries can only be hit by the same
Triton wheel (version, Python ABI, platform) as the one that wrote them. The GPU machine has
Triton 3.6.0 under Python 3.12. Where no CPU torch exists for that Python (this project's
machines have one for 3.11 only), `--key-of WHEEL` compiles with the local Triton of the same
version and names the entries with the wheel's triton_key: it checks that every Python file of
the wheel's triton/ is byte-identical to the local one, so the keys differ only by the hash of
libtriton, which it swaps (the compiled code of two builds of one Triton version for two
Python ABIs is assumed identical; only a hit on the GPU confirms it). Leave the environment
as the GPU run will have it (no TRITON_* variables). manifest.json records the triton_key
hash and, per variant, the cache entry computed for the launch and whether the folder holds
it; part 1 of the GPU run compares the GPU's triton_key hash with it, and each part's
`disk_cache_new` says how many variants missed the cache there (0: every one hit).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def triton_key_sha256() -> str:
    """sha256 of triton_key(): equal on two machines iff their Triton files and libtriton are."""
    import triton.runtime.cache as tcache

    return hashlib.sha256(tcache.triton_key().encode()).hexdigest()


def key_of_wheel(wheel) -> str:
    """triton_key() of another build of the local Triton version (a wheel file): the local key with
    libtriton's hash swapped, after checking that the wheel's Python files are the local ones."""
    import zipfile

    import triton
    from triton.runtime.cache import triton_key

    local = os.path.dirname(triton.__file__)
    sha = lambda data: hashlib.sha256(data).hexdigest()  # noqa: E731
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.startswith("triton/")]
        lib = [n for n in names if n.startswith("triton/_C/libtriton.")]
        if len(lib) != 1:
            raise SystemExit(f"{wheel}: expected one triton/_C/libtriton.*, found {lib}")
        differ = [n for n in names if n.endswith(".py") and (
            not os.path.exists(os.path.join(local, n[len("triton/"):])) or
            sha(z.read(n)) != sha(open(os.path.join(local, n[len("triton/"):]), "rb").read()))]
        if differ:
            raise SystemExit(f"{wheel}: {len(differ)} Python files differ from Triton {triton.__version__} here "
                             f"(e.g. {differ[:3]}): not the same Triton version")
        theirs = sha(z.read(lib[0]))
    ext = sysconfig.get_config_var("EXT_SUFFIX").split(".")[-1]
    with open(os.path.join(local, "_C", f"libtriton.{ext}"), "rb") as f:
        ours = sha(f.read())
    key = triton_key()
    assert key.count(ours) == 1, "triton_key() does not hold libtriton's hash once: its layout changed"
    return key.replace(ours, theirs)


def expected_entry(bound) -> str:
    """The cache folder `triton.compile` uses for this bound launch (its own key computation)."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.cache import _base32, get_cache_key  # get_cache_key reads the module's triton_key

    src = ASTSource(bound.jit_fn, bound.signature, bound.constexprs, bound.attrs)
    backend = make_backend(bound_target())
    options = backend.parse_options(dict(bound.options.__dict__, **src.parse_options()))
    key = get_cache_key(src, backend, options, env_vars=get_cache_invalidating_env_vars())
    return _base32(hashlib.sha256(key.encode("utf-8")).hexdigest())


def bound_target():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import kernel_launches

    return kernel_launches.SM90


def record_gpu_run_launches():
    """The fastddpm kernel launches of the GPU run's parts 1-4, recorded (not run) on the CPU."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import kernel_launches as kl

    import fastddpm
    from fastddpm import Schedule, graphs, ops
    from benchmarks import gpu_run

    cfg = gpu_run.Config(rehearsal=False)
    ops._use_kernels = lambda x: True  # CPU tensors, no interpreter: launch (record) the kernels anyway
    graphs.EMULATE_ON_CPU = True       # the graph loop's launches, eagerly
    s = Schedule.linear(1000)

    def stand_in(channels):  # a model of the right output shape: the kernels see only shapes and layouts
        return lambda x, t: 0.1 * x[:, :channels]

    with kl.record() as (launches, label):
        label[0] = "part 1"
        x = torch.randn(3, 3, 17, 29)
        ops.ddpm_step(s, x, 5, x, x)
        for model_name, _ in cfg.smoke_models + [(cfg.sampling_model, 0)]:
            c, size = (1, 16) if model_name == "digits" else (3, 32)
            for method in gpu_run.METHODS:
                for backend in ("fused", "graph"):
                    label[0] = f"{model_name} {method} {backend}"
                    graphs.clear_cache()
                    fastddpm.sample(stand_in(c), 2, shape=(c, size, size), steps=3, method=method,
                                    backend=backend, seed=0)
        for op, shape, layout, dtype in gpu_run.kernel_rows(cfg):
            label[0] = f"part 3 {op} {shape} {layout} {dtype}"
            mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            dt = getattr(torch, dtype)
            x = torch.randn(shape).to(memory_format=mf)
            t = torch.randint(1, 1000, (shape[0],))
            if op == "ddpm_step":
                ops.ddpm_step(s, x, t, x.to(dt), seed=1)
            else:
                ops.q_sample(s, x.to(dt), t, seed=1)
    graphs.clear_cache()
    return launches


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the cache folder to write (e.g. benchmarks/triton-cache-sm90)")
    p.add_argument("--key-of", metavar="WHEEL", help="name the entries for this build of the local Triton version")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the compiler writes the cache")
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = out
    sys.path.insert(0, ROOT)
    import triton
    import triton.runtime.cache as tcache

    keyed_for = f"the local Triton {triton.__version__} (python {platform.python_version()})"
    if a.key_of:
        key = key_of_wheel(a.key_of)
        tcache.triton_key = lambda: key  # what get_cache_key reads
        keyed_for = os.path.basename(a.key_of)

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import kernel_launches as kl

    variants = kl.distinct_variants(record_gpu_run_launches())
    rows = []
    for bound, labels in variants.values():
        entry = expected_entry(bound)
        bound.compile()
        path = os.path.join(out, entry)
        rows.append({"kernel": bound.name, "launch": labels[0], "launches": len(labels), "entry": entry,
                     "written": os.path.isdir(path),
                     "bytes": sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
                     if os.path.isdir(path) else 0})
    entries = [e for e in os.listdir(out) if os.path.isdir(os.path.join(out, e))]
    manifest = {"triton": triton.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "keyed_for": keyed_for, "triton_key_sha256": triton_key_sha256(), "target": "cuda sm_90",
                "variants": len(rows),
                "entries": len(entries), "bytes": sum(r["bytes"] for r in rows), "rows": rows,
                "env": {k: v for k, v in os.environ.items() if k.startswith("TRITON_") and k != "TRITON_CACHE_DIR"}}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    missing = [r for r in rows if not r["written"]]
    print(f"triton {triton.__version__} (python {manifest['python']}): {len(rows)} variants compiled for sm_90 "
          f"into {out}, {manifest['bytes'] / 2**20:.2f} MiB; {len(entries)} cache entries; "
          f"{len(missing)} launches whose computed entry is absent")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())

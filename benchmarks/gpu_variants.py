"""How many Triton kernel variants a block of code makes fastddpm compile, on Triton 3.6 and 3.9 alike.

Compiled kernels (a GPU): each fastddpm kernel is a `JITFunction` whose in-memory cache,
`device_caches[device][0]`, holds one entry per distinct specialisation it launched (the same
tuple layout, (kernel_cache, kernel_key_cache, target, backend, binder), in 3.6 and 3.9). The
count is the growth of those dicts. An entry is a variant the process needed: compiled, or
loaded from Triton's on-disk cache (a carried cache, say); the growth of the disk cache's
folder count says how many were really compiled.

Interpreted kernels (TRITON_INTERPRET=1, the CPU rehearsal): nothing is compiled, so each
launch is bound through Triton's own binder for an sm_90 target (tests/kernel_launches.py:
the specialisation and cache key a GPU launch would have) and the distinct keys are counted:
what the same code would compile on an H100.
"""
from __future__ import annotations

import os
import sys

_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests")


def _kernel_launches():
    if _TESTS not in sys.path:
        sys.path.insert(0, _TESTS)
    import kernel_launches

    return kernel_launches


def fastddpm_kernels():
    """{name: kernel object} of every `*_kernel` in fastddpm.kernels' modules."""
    kl = _kernel_launches()
    out = {}
    for mod in kl.kernel_modules():
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "run"):
                out[f"{mod.__name__.rsplit('.', 1)[-1]}.{name}"] = obj
    return out


def jit_cache_sizes(kernels=None) -> dict:
    """{kernel: entries in its in-memory JIT cache, all devices} (compiled kernels only)."""
    sizes = {}
    for name, k in (kernels or fastddpm_kernels()).items():
        caches = getattr(k, "device_caches", None)
        if caches is None:
            continue
        sizes[name] = sum(len(entry[0]) for entry in list(caches.values()))
    return sizes


def disk_cache_dir() -> str:
    from triton import knobs

    return knobs.cache.dir


def disk_cache_entries(path=None) -> int:
    """Folders (one per compiled kernel, keyed by its hash) in Triton's on-disk cache."""
    path = path or disk_cache_dir()
    return sum(1 for e in os.scandir(path) if e.is_dir()) if os.path.isdir(path) else 0


class VariantCounter:
    """`with VariantCounter() as vc: ...` then `vc.result()`: {"variants": n, "per_kernel": {...},
    "method": how it was counted, "disk_cache_new": folders the disk cache gained (compiled runs)}."""

    def __init__(self):
        self.interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        self.keys = {}
        self._saved = []

    def __enter__(self):
        if self.interpreted:
            kl = _kernel_launches()
            binder = kl.Binder()
            for mod in kl.kernel_modules():
                for name, obj in list(vars(mod).items()):
                    if name.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "run"):
                        self._saved.append((mod, name, obj))
                        setattr(mod, name, _Counting(obj, binder, self.keys, kl))
        else:
            self._before = jit_cache_sizes()
            self._disk_before = disk_cache_entries()
        return self

    def __exit__(self, *exc):
        for mod, name, obj in self._saved:
            setattr(mod, name, obj)
        self._saved = []
        return False

    def result(self) -> dict:
        """The count so far (inside the block) or in all (after it)."""
        if self.interpreted:
            per = {}
            for name, _ in self.keys:
                per[name] = per.get(name, 0) + 1
            return {"variants": len(self.keys), "per_kernel": per,
                    "method": "interpreter: launches bound for sm_90 by Triton's binder, distinct cache keys"}
        per = {k: v - self._before.get(k, 0) for k, v in jit_cache_sizes().items() if v > self._before.get(k, 0)}
        return {"variants": sum(per.values()), "per_kernel": per,
                "method": "growth of the kernels' in-memory JIT caches (compiled or loaded from the disk cache)",
                "disk_cache_new": disk_cache_entries() - self._disk_before}


class _Counting:
    """Stands in for a kernel while counting: binds each launch for sm_90, then launches it."""

    def __init__(self, kernel, binder, keys, kl):
        self.kernel, self.binder, self.keys, self.kl = kernel, binder, keys, kl

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound = self.binder.bind(self.kl.Launch(self.kernel, grid, args, kwargs, ""))
            self.keys.setdefault(bound.key, 0)
            self.keys[bound.key] += 1
            return self.kernel[grid](*args, **kwargs)

        return launch

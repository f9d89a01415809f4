"""The kernel launches fastddpm really makes, as Triton's JIT specialises them (no GPU needed).

`record()` swaps every `*_kernel` of the fastddpm.kernels modules for a recorder while the
public API (fastddpm.ops, the samplers, the graph loop's LoopPlan) runs; each launch keeps
its kernel, positional arguments and keyword arguments (the launch itself is skipped).

`Binder.bind()` then does what `JITFunction.run` does before it compiles, with Triton's own
code: the binder `create_function_from_signature` builds (the per-argument specialisation:
dtype, `== 1`, divisible-by-16 and 16-byte pointer alignment, except for `do_not_specialize`
arguments), `compute_cache_key` (the key of Triton's in-memory kernel cache: one key = one
compiled kernel) and `_pack_args` (signature, constexprs, attributes, options), for an sm_90
target. Kernels defined under TRITON_INTERPRET=1 are InterpretedFunctions; they are rebuilt
as JITFunctions of the same Python function and `do_not_specialize` lists.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

import fastddpm.kernels

SM90 = GPUTarget("cuda", 90, 32)


class Launch:
    def __init__(self, kernel, grid, args, kwargs, label):
        self.kernel, self.grid, self.args, self.kwargs, self.label = kernel, grid, args, kwargs, label

    @property
    def name(self):
        return self.kernel.fn.__name__


class _Recorder:
    def __init__(self, kernel, launches, label):
        self.kernel, self.launches, self.label = kernel, launches, label

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, grid, args, kwargs, self.label[0]))


def kernel_modules():
    """Every module of fastddpm.kernels (a new kernel file is picked up without edits here)."""
    names = [m.name for m in pkgutil.iter_modules(fastddpm.kernels.__path__)]
    return [importlib.import_module(f"fastddpm.kernels.{name}") for name in names]


@contextlib.contextmanager
def record():
    """Yields (launches, label): launches collects every kernel launch made inside the block;
    set label[0] to tag the launches that follow (e.g. the configuration being recorded)."""
    launches, label, saved = [], [""], []
    for mod in kernel_modules():
        for name, obj in list(vars(mod).items()):
            if name.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "run"):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, launches, label))
    try:
        yield launches, label
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def jit_function(kernel) -> JITFunction:
    if isinstance(kernel, JITFunction):
        return kernel
    kw = {k: v for k, v in kernel.kwargs.items() if k in ("do_not_specialize", "do_not_specialize_on_alignment")}
    return JITFunction(kernel.fn, **kw)


class Bound:
    """One launch as Triton's JIT sees it for the target: `key` names the compiled kernel."""

    def __init__(self, name, key, signature, constexprs, attrs, options, jit_fn):
        self.name, self.key, self.signature, self.constexprs = name, key, signature, constexprs
        self.attrs, self.options, self.jit_fn = attrs, options, jit_fn

    def compile(self, target=SM90):
        src = ASTSource(self.jit_fn, self.signature, self.constexprs, self.attrs)
        return triton.compile(src, target=target, options=self.options.__dict__)


class Binder:
    def __init__(self, target=SM90):
        self.target = target
        self.backend = make_backend(target)
        self._jit = {}

    def bind(self, launch: Launch) -> Bound:
        kernel = launch.kernel
        if kernel.fn not in self._jit:
            jf = jit_function(kernel)
            self._jit[kernel.fn] = (jf, create_function_from_signature(jf.signature, jf.params, self.backend))
        jf, binder = self._jit[kernel.fn]
        kwargs = dict(launch.kwargs)
        # the options JITFunction.run adds before binding (3.6: debug, instrumentation_mode; 3.9 also fpsan)
        kwargs["debug"] = kwargs.get("debug", jf.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
            kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        bound_args, specialization, options = binder(*launch.args, **kwargs)
        key = compute_cache_key({}, specialization, options)
        options, signature, constexprs, attrs = jf._pack_args(self.backend, kwargs, bound_args, specialization,
                                                              options)
        return Bound(jf.fn.__name__, (jf.fn.__name__, key), signature, constexprs, attrs, options, jf)


def distinct_variants(launches, binder=None):
    """{key: (Bound, [labels])}: the kernels Triton would compile for these launches."""
    binder = binder or Binder()
    out = {}
    for launch in launches:
        b = binder.bind(launch)
        out.setdefault(b.key, (b, []))[1].append(launch.label)
    return out

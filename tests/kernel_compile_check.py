"""Compile every kernel variant fastddpm launches for real GPUs (sm_80, sm_90), without a GPU.

The CPU tests run the kernels under Triton's interpreter, which accepts code the compiler
rejects (and vice versa). This script records the exact arguments of real launches (the
launchers run on CPU tensors; the kernel objects are swapped for recorders) and compiles
each recorded variant through Triton's NVIDIA backend down to a cubin (ptxas ships with
Triton's wheel). Run by tests/test_kernel_compile.py in a fresh process without
TRITON_INTERPRET; prints one line per variant and exits 1 on any failure.
"""
import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET: the compiler is under test"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastddpm import Schedule, rng  # noqa: E402
from fastddpm.kernels import dpm as dpm_mod  # noqa: E402
from fastddpm.kernels import noise as noise_mod  # noqa: E402
from fastddpm.kernels import q_sample as q_mod  # noqa: E402
from fastddpm.kernels import step as step_mod  # noqa: E402

DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
          torch.int32: "i32"}
LAUNCHES = []


class Recorder:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            LAUNCHES.append((self.fn, args, kwargs))
        return launch


def signature(fn, args, kwargs):
    sig, constexprs = {}, {}
    for name, value in zip(fn.arg_names, list(args) + [None] * (len(fn.arg_names) - len(args))):
        if name in kwargs:
            sig[name] = "constexpr"
            constexprs[name] = kwargs[name]
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + DTYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot type {value!r}")
    return sig, constexprs


def step_configs():
    """One option changed at a time from a base launch, plus the captured loop's launches."""
    base = dict(ddim=False, prediction="eps", variance="fixed_small", clip=1.0, noise="seed", t_kind="int",
                mo_dtype=torch.float32, graph=False, x0=False, clipped=False)
    choices = dict(ddim=(True,), prediction=("x0", "v"), variance=("fixed_large", "learned_range"), clip=(None,),
                   noise=("tensor", "none"), t_kind=("tensor",), mo_dtype=(torch.bfloat16, torch.float16),
                   x0=(True,))
    yield base
    for key, values in choices.items():
        for v in values:
            yield {**base, key: v}
    yield {**base, "ddim": True, "clipped": True}  # DDIM's eps re-derived from the clipped x0 (USE_CLIPPED)
    yield {**base, "ddim": True, "clipped": True, "noise": "none", "graph": True}
    # self-conditioning in the captured loop: x0 written to a static buffer
    yield {**base, "x0": True, "graph": True}
    yield {**base, "ddim": True, "clipped": True, "noise": "none", "graph": True, "x0": True}
    for (ddim, variance, noise), mo_dtype in itertools.product(
            ((False, "fixed_small", "seed"), (False, "learned_range", "seed"), (True, "fixed_small", "none"),
             (True, "fixed_small", "seed")), (torch.float32, torch.bfloat16)):
        yield {**base, "ddim": ddim, "variance": variance, "noise": noise, "mo_dtype": mo_dtype, "graph": True}


def dpm_configs():
    """DPM-Solver++ launches: one option changed at a time, plus the captured loop's launches."""
    base = dict(method="sde-dpmsolver++", order=2, prediction="eps", clip=None, noise="seed", t_kind="int",
                mo_dtype=torch.float32, graph=False, prev=True)
    choices = dict(method=("dpmsolver++",), order=(1,), prediction=("x0", "v"), clip=(1.0,), noise=("tensor",),
                   t_kind=("tensor",), mo_dtype=(torch.bfloat16, torch.float16), prev=(False,))
    yield base
    for key, values in choices.items():
        for v in values:
            yield {**base, key: v}
    for method, mo_dtype in itertools.product(("dpmsolver++", "sde-dpmsolver++"), (torch.float32, torch.bfloat16)):
        yield {**base, "method": method, "mo_dtype": mo_dtype, "graph": True}


def record_launches():
    step_mod.step_kernel = Recorder(step_mod.step_kernel)
    q_mod.q_sample_kernel = Recorder(q_mod.q_sample_kernel)
    noise_mod.normal_kernel = Recorder(noise_mod.normal_kernel)
    dpm_mod.dpm_step_kernel = Recorder(dpm_mod.dpm_step_kernel)
    s = Schedule.linear(100)
    flag = torch.full((), -1, dtype=torch.long)
    args = torch.zeros(3, dtype=torch.long)
    for shape, cl in (((2, 3, 8, 8), False), ((2, 3, 8, 8), True), ((2, 3, 64, 64), False)):
        x = torch.randn(shape)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        for cfg in step_configs():
            ddim, variance, graph = cfg["ddim"], cfg["variance"], cfg["graph"]
            C = shape[1] * (2 if variance == "learned_range" else 1)
            mo = torch.randn(shape[0], C, *shape[2:]).to(cfg["mo_dtype"])
            if cl:
                mo = mo.contiguous(memory_format=torch.channels_last)
            t = torch.full((shape[0],), 5) if cfg["t_kind"] == "tensor" or graph else 5
            z = torch.randn(shape) if cfg["noise"] == "tensor" else None
            seed = 3 if cfg["noise"] == "seed" and not graph else None
            step_mod.step_forward(s, x, t, mo, z, ddim=ddim, eta=0.0 if cfg["noise"] == "none" else 0.5,
                                  prediction=cfg["prediction"], variance=variance, clip=cfg["clip"], seed=seed,
                                  sample_offset=0, return_x0=cfg["x0"], out=x if graph else None,
                                  rng=args if graph else None, flag=flag if graph else None,
                                  use_clipped_model_output=cfg["clipped"])
        for draw, t_kind in itertools.product((True, False), ("int", "tensor")):
            t = torch.full((shape[0],), 5) if t_kind == "tensor" else 5
            q_mod.q_sample_forward(s, x, t, None if draw else torch.randn(shape), 3 if draw else None, 0)
        noise_mod.normal_forward(torch.empty(shape), rng.TAG_INIT, rng=args)
        for cfg in dpm_configs():
            graph = cfg["graph"]
            mo = torch.randn(shape).to(cfg["mo_dtype"])
            if cl:
                mo = mo.contiguous(memory_format=torch.channels_last)
            t = torch.full((shape[0],), 5) if cfg["t_kind"] == "tensor" or graph else 5
            dpm_mod.dpm_step_forward(s, x, t, mo, x.clone() if cfg["prev"] else None,
                                     torch.randn(shape) if cfg["noise"] == "tensor" else None,
                                     method=cfg["method"], order=cfg["order"], solver_type="midpoint",
                                     prediction=cfg["prediction"], clip=cfg["clip"],
                                     seed=3 if cfg["noise"] == "seed" and not graph else None, sample_offset=0,
                                     out=x if graph else None, rng=args if graph else None,
                                     flag=flag if graph else None)
        noise_mod.normal_forward(torch.empty(shape), rng.TAG_INIT, seed=3)


def main():
    record_launches()
    variants = {}
    for fn, args, kwargs in LAUNCHES:
        num_warps = kwargs.pop("num_warps", 4)
        sig, constexprs = signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), num_warps)
        variants[key] = (fn, sig, constexprs, num_warps)
    failures = 0
    for arch in (90,):  # the H100s this project targets
        target = GPUTarget("cuda", arch, 32)
        for (name, _, consts, _), (fn, sig, constexprs, num_warps) in variants.items():
            try:
                k = triton.compile(ASTSource(fn, sig, constexprs), target=target, options=dict(num_warps=num_warps))
                assert k.asm.get("cubin"), "no cubin"
            except Exception as e:  # noqa: BLE001 - report every failing variant
                failures += 1
                print(f"FAIL sm_{arch} {name} {dict(consts)}: {type(e).__name__}: {str(e)[-2000:]}")
        print(f"sm_{arch}: compiled {len(variants)} variants, {failures} failures so far")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

"""Compile exactly what fastddpm's real launches compile, for an H100 (sm_90), without a GPU.

The CPU tests run the kernels under Triton's interpreter, which accepts code the compiler
rejects (and vice versa). This script runs the public API (fastddpm.ops for every step
option, q_sample, the x_T noise kernel, ops.dpm_solver_step, ops.sigma_step, the graph loop's
LoopPlan / SigmaLoopPlan with its rng / flag pointers for DDPM/DDIM, DPM-Solver++ and the
k-diffusion samplers) on CPU tensors of a small and a large
shape, both layouts, records each launch (tests/kernel_launches.py), binds it through Triton's
own JIT binder for sm_90 (so the specialisation, 16-byte alignment and divisibility attributes
are those of a GPU launch) and compiles each distinct variant down to a cubin with the ptxas
in Triton's wheel. It reads the registers from `cuobjdump -res-usage`, the spills from
ptxas's own report of that compilation (`-v`, which Triton prints with TRITON_DUMP_PTXAS_LOG:
"N bytes spill stores"; cuobjdump's LOCAL counts local arrays, not spills, and its STACK
holds libdevice's sin/cos range-reduction array on 3.6) and the global load widths from the
SASS (LDG.E.128 = 128-bit), prints a table, and exits 1 if a variant fails to compile,
spills, or is a contiguous variant without a 128-bit global load.

Add launches by appending a function to RECIPES: it gets (shape, channels_last, label) and
calls the public API; set label[0] to describe what follows.

Run by tests/test_kernel_compile.py in a fresh process without TRITON_INTERPRET.
"""
import collections
import contextlib
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET: the compiler is under test"

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_launches as kl  # noqa: E402

from fastddpm import Schedule, graphs, ops, rng  # noqa: E402
from fastddpm.kernels import noise as noise_mod  # noqa: E402

SHAPES = ((2, 3, 8, 8), (16, 3, 256, 256))
S = Schedule.linear(1000)


def _like(shape, cl, dtype=torch.float32, channels=None):
    x = torch.randn(shape[0], channels or shape[1], *shape[2:]).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def step_options():
    """The fused step: a base launch and every option changed once (the kernel's constexprs)."""
    base = dict(method="ddpm", prediction="eps", variance="fixed_small", clip=1.0, noise="seed", t="int",
                mo_dtype=torch.float32, return_x0=False, eta=0.5, clipped=False)
    yield base
    for key, values in dict(method=("ddim",), prediction=("x0", "v"), variance=("fixed_large", "learned_range"),
                            clip=(None,), noise=("tensor",), t=("tensor",), return_x0=(True,),
                            mo_dtype=(torch.bfloat16, torch.float16)).items():
        for v in values:
            yield {**base, key: v}
    yield {**base, "method": "ddim", "eta": 0.0, "noise": "none"}
    yield {**base, "method": "ddim", "clipped": True}  # DDIM's eps re-derived from the clipped x0 (USE_CLIPPED)


def recipe_ops_steps(shape, cl, label):
    for o in step_options():
        label[0] = "step " + " ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in o.items() if base_differs(k, v))
        x = _like(shape, cl)
        mo = _like(shape, cl, o["mo_dtype"], 2 * shape[1] if o["variance"] == "learned_range" else None)
        t = torch.full((shape[0],), 5) if o["t"] == "tensor" else 5
        kw = dict(prediction=o["prediction"], clip=o["clip"], return_x0=o["return_x0"])
        if o["noise"] == "seed":
            kw.update(seed=3, sample_offset=7)
        noise = _like(shape, cl) if o["noise"] == "tensor" else None
        if o["method"] == "ddpm":
            ops.ddpm_step(S, x, t, mo, noise, variance=o["variance"], **kw)
        else:
            ops.ddim_step(S, x, t, mo, noise, eta=o["eta"], use_clipped_model_output=o["clipped"], **kw)


def base_differs(k, v):
    return v != dict(method="ddpm", prediction="eps", variance="fixed_small", clip=1.0, noise="seed", t="int",
                     mo_dtype=torch.float32, return_x0=False, eta=0.5, clipped=False).get(k)


def recipe_half_inputs(shape, cl, label):
    """Half-precision inputs the public API accepts (loaded and upcast to float32): x_t and the
    model output, a noise tensor, q_sample's x0, learned_range's 2C-channel output, DPM-Solver++'s
    x_t. The sampler state stays float32 in fastddpm's own loops; a caller's tensors need not."""
    for dt in (torch.bfloat16, torch.float16):
        name = str(dt).replace("torch.", "")
        x, mo = _like(shape, cl, dt), _like(shape, cl, dt)
        label[0] = f"half step x_t={name} model_output={name}"
        ops.ddpm_step(S, x, 5, mo, seed=3)
        label[0] = f"half step noise={name}"
        ops.ddpm_step(S, _like(shape, cl), 5, _like(shape, cl), _like(shape, cl, dt))
        label[0] = f"half step learned_range model_output={name}"
        ops.ddpm_step(S, _like(shape, cl), 5, _like(shape, cl, dt, 2 * shape[1]), seed=3, variance="learned_range")
        label[0] = f"half ddim x_t={name}"
        ops.ddim_step(S, x, 5, mo, eta=0.5, seed=3)
        label[0] = f"half q_sample x0={name} seed"
        ops.q_sample(S, _like(shape, cl, dt), 5, seed=3)
        label[0] = f"half q_sample x0={name} noise={name}"
        ops.q_sample(S, _like(shape, cl, dt), 5, _like(shape, cl, dt))
        label[0] = f"half dpm x_t={name}"
        ops.dpm_solver_step(S, x, 5, mo, _like(shape, cl), method="sde-dpmsolver++", seed=3)


def recipe_q_sample(shape, cl, label):
    for draw, per_sample in itertools.product((True, False), (False, True)):
        label[0] = f"q_sample {'seed' if draw else 'noise'} t={'tensor' if per_sample else 'int'}"
        t = torch.full((shape[0],), 5) if per_sample else 5
        x0 = _like(shape, cl)
        if draw:
            ops.q_sample(S, x0, t, seed=3)
        else:
            ops.q_sample(S, x0, t, _like(shape, cl))


def recipe_noise(shape, cl, label):
    label[0] = "x_T seed"
    noise_mod.normal_forward(_like(shape, cl), rng.TAG_INIT, seed=3)


def recipe_graph_loop(shape, cl, label):
    """The graph loop's launches: x_T and steps reading (seed, offset) and the flag from device memory."""
    for method, variance, eta, mo_dtype, extra in (
            ("ddpm", "fixed_small", 0.0, torch.float32, {}),
            ("ddpm", "learned_range", 0.0, torch.float32, {}),
            ("ddim", "fixed_small", 0.0, torch.float32, {}),
            ("ddim", "fixed_small", 1.0, torch.float32, {}),
            ("ddpm", "fixed_small", 0.0, torch.bfloat16, {}),
            ("ddim", "fixed_small", 0.0, torch.float32, dict(use_clipped_model_output=True)),
            ("ddpm", "fixed_small", 0.0, torch.float32, dict(self_condition=True)),  # x0 to a static buffer
            ("ddim", "fixed_small", 0.0, torch.float32, dict(use_clipped_model_output=True, self_condition=True))):
        label[0] = f"graph {method} {variance} eta={eta} {str(mo_dtype).replace('torch.', '')} " + \
            " ".join(f"{k}" for k in extra)
        channels = 2 * shape[1] if variance == "learned_range" else shape[1]
        mo = _like(shape, cl, mo_dtype, channels)
        opts = {**dict(method=method, eta=eta, prediction="eps", variance=variance, clip=1.0,
                       use_clipped_model_output=False, self_condition=False), **extra}
        plan = graphs.LoopPlan(lambda x, t, *cond: mo, S, shape, torch.device("cpu"), opts,
                               layout=torch.channels_last if cl else torch.contiguous_format)
        plan.begin()
        plan.step()


def dpm_options():
    """The fused DPM-Solver++ step: a base launch (second-order SDE with in-kernel noise) and
    every option changed once."""
    base = dict(method="sde-dpmsolver++", order=2, solver_type="midpoint", prediction="eps", clip=None,
                noise="seed", t="int", mo_dtype=torch.float32, in_place=False)
    yield base
    for key, values in dict(method=("dpmsolver++",), order=(1,), solver_type=("heun",), prediction=("x0", "v"),
                            clip=(1.0,), noise=("tensor",), t=("tensor",), mo_dtype=(torch.bfloat16, torch.float16),
                            in_place=(True,)).items():
        for v in values:
            yield {**base, key: v}
    yield {**base, "method": "dpmsolver++", "order": 1, "noise": "none"}  # ODE first step: no prev_x0, no noise


def recipe_dpm(shape, cl, label):
    """ops.dpm_solver_step for every option, then the graph loop's DPM launches (t, the rng and
    the flag read from device memory, the previous x0 in a static buffer)."""
    base = next(dpm_options())
    for o in dpm_options():
        label[0] = "dpm " + (" ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in o.items() if v != base[k])
                             or "sde 2nd-order seed")
        x = _like(shape, cl)
        mo = _like(shape, cl, o["mo_dtype"])
        t = torch.full((shape[0],), 5) if o["t"] == "tensor" else 5
        prev = _like(shape, cl) if o["order"] == 2 or o["in_place"] else None
        noise = _like(shape, cl) if o["noise"] == "tensor" and o["method"] == "sde-dpmsolver++" else None
        kw = dict(method=o["method"], order=o["order"], solver_type=o["solver_type"], prediction=o["prediction"],
                  clip=o["clip"])
        if o["noise"] == "seed":
            kw.update(seed=3, sample_offset=7)
        if o["in_place"]:
            kw.update(out=x, x0_out=prev)
        ops.dpm_solver_step(S, x, t, mo, prev, noise, **kw)
    for method, order, mo_dtype in itertools.product(("dpmsolver++", "sde-dpmsolver++"), (1, 2),
                                                     (torch.float32, torch.bfloat16)):
        label[0] = f"graph {method} order={order} {str(mo_dtype).replace('torch.', '')}"
        mo = _like(shape, cl, mo_dtype)
        opts = dict(method=method, order=order, solver_type="midpoint", eta=0.0, prediction="eps",
                    variance="fixed_small", clip=None, use_clipped_model_output=False, self_condition=False)
        plan = graphs.LoopPlan(lambda x, t, *cond: mo, S, shape, torch.device("cpu"), opts,
                               layout=torch.channels_last if cl else torch.contiguous_format)
        plan.begin()
        plan.step()


def recipe_sigma(shape, cl, label):
    """ops.sigma_step (k-diffusion's samplers): every history depth (0..3) with seed noise, then one
    option changed at a time on dpmpp_2m_sde; then the graph loop's first input (the noise kernel
    with two draws) and stage launches (k, the rng and the flag from device memory)."""
    from fastddpm import karras, methods, sigmas

    def plan_of(method, clip=None, **opts):
        o = methods.resolve(method, **opts)
        return karras.build_plan(method, sigmas.get_sigmas("karras", 6, S), S, "eps", o, clip=clip)

    def launch(plan, k=1, mo_dtype=torch.float32, noise="seed", in_place=False):
        x, mo = _like(shape, cl), _like(shape, cl, mo_dtype)
        hist = tuple(_like(shape, cl) for _ in range(plan.num_history))
        kw = dict(seed=3, sample_offset=7) if noise == "seed" else {}
        z = _like(shape, cl) if noise == "tensor" else None
        if in_place:
            kw.update(out=x, history_out=hist)
        ops.sigma_step(plan, x, k, mo, hist, z, **kw)

    for method, extra in (("euler", dict(s_churn=1.0)), ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {}),
                          ("lms", {})):
        label[0] = f"sigma {method}"
        launch(plan_of(method, **extra))
    base = plan_of("dpmpp_2m_sde")
    for name, kw in (("clip=1.0", dict(plan=plan_of("dpmpp_2m_sde", clip=1.0))),
                     ("noise=tensor", dict(noise="tensor")), ("k=tensor", dict(k=torch.full((shape[0],), 1))),
                     ("mo_dtype=bfloat16", dict(mo_dtype=torch.bfloat16)),
                     ("mo_dtype=float16", dict(mo_dtype=torch.float16)), ("in_place", dict(in_place=True))):
        label[0] = f"sigma dpmpp_2m_sde {name}"
        launch(**{"plan": base, **kw})
    for method, mo_dtype in (("dpmpp_2m", torch.float32), ("heun", torch.bfloat16), ("euler", torch.float32)):
        label[0] = f"graph sigma {method} {str(mo_dtype).replace('torch.', '')}"
        mo = _like(shape, cl, mo_dtype)
        opts = dict(method=method, plan=plan_of(method, **(dict(s_churn=1.0) if method == "euler" else {})))
        plan = graphs.SigmaLoopPlan(lambda x, t: mo, S, shape, torch.device("cpu"), opts,
                                    layout=torch.channels_last if cl else torch.contiguous_format)
        plan.begin()
        plan.step()


def recipe_guidance(shape, cl, label):
    """Classifier-free guidance: the step kernels reading both halves of the doubled model output
    (w a launch argument, w from device memory, per-sample coefficients from the coefficient kernel
    for rescale / parallel removal), each step op; then the graph loop's guided and single-call
    steps (w from device memory, the state also written into the doubled input's second half)."""
    from fastddpm import guidance, karras, methods, sigmas

    B = shape[0]
    for name, cfg in (("w", 3.0), ("w=device", torch.tensor([3.0])), ("rescale", guidance.CFG(3.0, 0.7)),
                      ("parallel", guidance.CFG(3.0, 0.0, 0.0)),
                      ("rescale w=device", guidance.CFG(torch.tensor([3.0]), 0.7, 0.5))):
        label[0] = f"guided ddpm {name}"
        ops.ddpm_step(S, _like(shape, cl), 5, _like((2 * B, *shape[1:]), cl), seed=3, guidance=cfg)
    label[0] = "guided ddpm learned_range rescale"
    ops.ddpm_step(S, _like(shape, cl), 5, _like((2 * B, *shape[1:]), cl, channels=2 * shape[1]), seed=3,
                  variance="learned_range", guidance=guidance.CFG(3.0, 0.7))
    label[0] = "guided ddim bfloat16"
    ops.ddim_step(S, _like(shape, cl), 5, _like((2 * B, *shape[1:]), cl, torch.bfloat16), guidance=3.0)
    label[0] = "guided dpm++ pair"
    ops.dpm_solver_step(S, _like(shape, cl), 5, (_like(shape, cl), _like(shape, cl)), _like(shape, cl),
                        guidance=3.0)
    plan = karras.build_plan("dpmpp_2m", sigmas.get_sigmas("karras", 6, S), S, "eps", methods.resolve("dpmpp_2m"))
    label[0] = "guided sigma dpmpp_2m rescale"
    ops.sigma_step(plan, _like(shape, cl), 1, _like((2 * B, *shape[1:]), cl), (_like(shape, cl),),
                   guidance=guidance.CFG(3.0, 0.7))

    class Labelled(torch.nn.Module):
        num_classes, null_class = 4, 4

        def forward(self, x, t, y):
            return x

    layout = torch.channels_last if cl else torch.contiguous_format
    for method, rescale in (("ddim", 0.0), ("ddpm", 0.7), ("dpmpp_2m", 0.0)):
        label[0] = f"graph guided {method} rescale={rescale}"
        cond = guidance.resolve(Labelled(), B, class_labels=1, guidance_scale=3.0, guidance_rescale=rescale)
        mo2 = _like((2 * B, *shape[1:]), cl)
        mo1 = mo2[:B]

        def forward(x, t, *c, **kw):
            return mo2 if x.shape[0] == 2 * B else mo1

        if method == "dpmpp_2m":
            opts = dict(method=method, plan=plan)
            modes = ("guided", "cond") * 3
            lp = graphs.SigmaLoopPlan(forward, S, shape, torch.device("cpu"), opts, layout,
                                      graphs.StaticGuide(cond, modes, B, torch.device("cpu")))
        else:
            opts = dict(method=method, eta=0.0, prediction="eps", variance="fixed_small", clip=1.0,
                        use_clipped_model_output=False, self_condition=False)
            modes = ("guided", "cond") * 500
            lp = graphs.LoopPlan(forward, S, shape, torch.device("cpu"), opts, layout,
                                 graphs.StaticGuide(cond, modes, B, torch.device("cpu")))
        lp.begin()
        lp.step("guided")
        lp.step("cond")


RECIPES = [recipe_ops_steps, recipe_q_sample, recipe_noise, recipe_graph_loop, recipe_dpm, recipe_half_inputs,
           recipe_sigma, recipe_guidance]


def record_launches():
    ops._use_kernels = lambda x: True  # CPU tensors, no interpreter: launch (record) the kernels anyway
    with kl.record() as (launches, label):
        for shape, cl in itertools.product(SHAPES, (False, True)):
            for recipe in RECIPES:
                n = len(launches)
                recipe(shape, cl, label)
                for launch in launches[n:]:
                    launch.label = f"{'x'.join(map(str, shape))} {'cl' if cl else 'contig'} {launch.label}"
    return launches


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _widths(sass, op):
    """{access width in bits: count} of the global loads (LDG) or stores (STG) in SASS; the
    LDG.E.CONSTANT loads of libdevice's sin/cos range-reduction table are left out."""
    widths = collections.Counter()
    for suffix in re.findall(rf"\b{op}\.E(\S*)", sass):
        if ".CONSTANT" in suffix:
            continue
        bits = re.search(r"\.(128|64|U8|S8|U16|S16)\b", suffix)
        widths[{"128": 128, "64": 64, "U8": 8, "S8": 8, "U16": 16, "S16": 16}[bits.group(1)] if bits else 32] += 1
    return widths


def compile_with_ptxas_report(bound):
    """(compiled kernel, bytes of spill stores a thread) from ptxas's `-v` report of Triton's own
    ptxas run (always compiled: a cache hit would run no ptxas)."""
    from triton import knobs

    buf = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(buf):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        k = bound.compile()
    spills = re.findall(r"(\d+) bytes spill stores", buf.getvalue())
    if not spills:
        raise RuntimeError(f"no ptxas report of spills in: {buf.getvalue()[-500:]!r}")
    return k, sum(map(int, spills))


def inspect_cubin(cubin: bytes):
    """(registers, local memory bytes, load widths, store widths) of the kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True)
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", res.stdout, re.S)
    return int(m.group(1)), int(m.group(2)), _widths(sass.stdout, "LDG"), _widths(sass.stdout, "STG")


def widest_load(bound):
    """The global load width (bits) a contiguous variant must reach: 128 (4 float32 elements a
    thread), or 64 where an operand is half precision (its 4 elements)."""
    return 64 if any(str(t) in ("*bf16", "*fp16") for t in bound.signature.values()) else 128


def _fmt(widths):
    return " ".join(f"{w}x{n}" for w, n in sorted(widths.items(), reverse=True)) or "-"


def main():
    launches = record_launches()
    variants = kl.distinct_variants(launches)
    print(f"triton {triton.__version__}, sm_90: {len(launches)} recorded launches, {len(variants)} distinct variants")
    print("regs: registers a thread; spill B: bytes a thread spills (ptxas's report); loads / stores: global accesses,")
    print("bits x count (128 = LDG.E.128 / STG.E.128). A contiguous variant must load 128 bits at a time")
    print("(64 with half-precision operands: 4 elements a thread; the x_T kernel, which loads nothing per")
    print("element, must store 128 bits at a time).")
    print(f"{'variant (shape layout launch)':<66} {'regs':>4} {'spill B':>7}  {'loads':<22} stores")
    failures = 0
    for bound, labels in variants.values():
        label = labels[0] + (f" (+{len(labels) - 1})" if len(labels) > 1 else "")
        try:
            k, spilled = compile_with_ptxas_report(bound)
            regs, _, loads, stores = inspect_cubin(k.asm["cubin"])
        except Exception as e:  # noqa: BLE001 - report every failing variant
            failures += 1
            print(f"FAIL {bound.name} {label}: {type(e).__name__}: {str(e)[-1500:]}")
            continue
        problems = []
        if spilled:
            problems.append("SPILLS")
        if " contig " in f" {label} ":
            if bound.name == "normal_kernel" and not stores.get(128):
                problems.append("NO 128-BIT STORE")
            elif bound.name != "normal_kernel" and max(loads, default=0) < widest_load(bound):
                problems.append(f"NO {widest_load(bound)}-BIT LOAD")
        failures += bool(problems)
        print(f"{label[:66]:<66} {regs:>4} {spilled:>7}  {_fmt(loads):<22} {_fmt(stores)} {' '.join(problems)}")
    print(f"sm_90: compiled {len(variants)} variants, {failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

"""The first GPU run: five parts, most important figures first, one JSON file per part.

    python -m benchmarks.gpu_run OUT                # on a CUDA machine (benchmarks/run_gpu.sh calls this)
    python -m benchmarks.gpu_run --rehearsal OUT    # the same code on the CPU: Triton's interpreter, tiny sizes

Parts, in order, each with its own time budget (seconds, BUDGETS; --budget-scale scales them):
  1 env       GPU, driver, clocks, torch / Triton, the install, a one-launch kernel check
  2 smoke     graph, fused and reference backends on the ddpm-cifar10 preset and the shipped
              digits model for each of METHODS, same seed: each backend's largest difference
              from the reference; first call (capture / compile) apart from the steady call
  3 kernels   the fused step and q_sample against eager PyTorch and torch.compile: time, GB/s,
              fraction of the measured device-to-device copy bandwidth
  4 sampling  ms/step per (backend, method, batch), diffusers' loop when importable, and the
              projected wall time of 50,000 CIFAR-10 samples (1000 DDPM / 20 DPM-Solver++ steps);
              then, where the budget leaves time, classifier-free guided DPM-Solver++ (w = 4, method
              "dpmsolver++ w=4") on the same preset with 10 classes, graph and fused (and diffusers'
              guidance loop when importable), each row's cost over the unguided row (vs_unguided)
  5 tests     `pytest -m gpu` first, then the rest of the suite while time remains

Each part runs in its own process (a hang or a crash costs that part only) and writes
OUT/<k>-<name>.json after every row, marked "complete": false until it ends; a part cut off
by its budget keeps what it wrote, marked incomplete with the reason. Every file names the
device, torch and Triton, whether it is a rehearsal, and (parts 1-4) how many Triton kernel
variants fastddpm compiled (benchmarks/gpu_variants.py). benchmarks/gpu_schema.py checks them;
benchmarks/report.py turns them into the README's table (never a rehearsal's figures).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

PARTS = {1: "env", 2: "smoke", 3: "kernels", 4: "sampling", 5: "tests"}
BUDGETS = {1: 40, 2: 90, 3: 100, 4: 130, 5: 150}  # seconds on the GPU; parts 1-4: 6 minutes at most
REHEARSAL_BUDGET = 600  # seconds a part, on a CPU that CI may share: the rehearsal checks the code, not the time
METHODS = ["ddpm", "ddim", "dpmsolver++", "dpmpp_2m", "euler_ancestral", "heun"]  # smoke-tested samplers
BACKENDS = ["reference", "fused", "graph"]


class Config:
    """Sizes and repetitions: the GPU's, or the rehearsal's tiny ones (same code path)."""

    def __init__(self, rehearsal: bool):
        self.rehearsal = rehearsal
        if not rehearsal:
            self.smoke_models = [("ddpm-cifar10", 16), ("digits", 16)]  # (model, n)
            self.smoke_steps = 20
            self.kernel_shapes = [(256, 3, 32, 32), (16, 3, 256, 256)]
            self.kernel_dtypes = ["float32", "bfloat16"]
            self.compile_backend = "inductor"
            self.compile_budget_s = 50  # torch.compile's compile time, all rows together (part 3's budget: 100 s)
            self.sampling_model = "ddpm-cifar10"
            self.batches = [1, 128, 512]
            self.sampling_steps = 20
            self.reps = 3
            self.test_phases = [["-m", "gpu", "tests", "benchmarks"], ["-m", "not gpu", "tests"]]
        else:
            self.smoke_models = [("tiny", 2), ("digits", 2)]
            self.smoke_steps = 3
            self.kernel_shapes = [(4, 3, 8, 8), (2, 3, 16, 16)]
            self.kernel_dtypes = ["float32", "bfloat16"]
            self.compile_backend = "eager"  # Dynamo traces, no inductor: the code path, not a CPU compile
            self.compile_budget_s = 20
            self.sampling_model = "tiny"
            self.batches = [1, 2]
            self.sampling_steps = 3
            self.reps = 1
            self.test_phases = [["-m", "gpu", "tests/test_schedule.py"], ["-m", "not gpu", "tests/test_schedule.py"]]


# ------------------------------------------------------------------------------ the part file
def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class PartFile:
    """OUT/<k>-<name>.json, rewritten atomically after every row, complete only at the end."""

    def __init__(self, out, part, rehearsal, budget_s):
        import torch

        self.path = os.path.join(out, f"{part}-{PARTS[part]}.json")
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + budget_s
        self.counter = None
        self.data = {"part": part, "name": PARTS[part], "rehearsal": rehearsal, "device": device_name(),
                     "cuda": torch.cuda.is_available(), "torch": torch.__version__, "triton": triton_version(),
                     "started": now(), "budget_s": budget_s, "wall_s": 0.0, "complete": False,
                     "incomplete_reason": "running", "rows": []}
        if rehearsal:
            self.data["note"] = "REHEARSAL on the CPU (Triton's interpreter, tiny sizes): no figure here is a GPU one"
        self.write()

    def left(self):
        return self.deadline - time.perf_counter()

    def add(self, row):
        self.data["rows"].append(row)
        self.write()

    def counting(self):
        """`with pf.counting():` every write records the kernel variants compiled so far."""
        from benchmarks.gpu_variants import VariantCounter

        self.counter = VariantCounter()
        return self.counter

    def write(self):
        self.data["wall_s"] = round(time.perf_counter() - self.t0, 3)
        if self.counter is not None:
            self.data["variants"] = self.counter.result()
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def finish(self, reason=None):
        self.data["complete"] = reason is None
        self.data["incomplete_reason"] = reason
        self.write()


def device_name():
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn, reps):
    """Median wall time of fn() over reps calls after one warm-up (synchronised)."""
    import statistics

    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_first(fn):
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------ part 1
def part_env(pf, cfg):
    import torch

    import fastddpm
    from fastddpm import Schedule, diffusion, ops
    from benchmarks import gpu_variants, triton_cache

    d = pf.data
    d["python"] = sys.version.split()[0]
    d["cpu_count"] = os.cpu_count()
    d["install"] = {"fastddpm": fastddpm.__file__, "kernels": ops.kernels_available(),
                    "how": os.environ.get("FASTDDPM_INSTALL", "not set (run outside run_gpu.sh)")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                    "memory_gib": round(p.total_memory / 2**30, 1), "cuda_runtime": torch.version.cuda}
        d["nvidia_smi"] = nvidia_smi()
    try:
        import diffusers

        d["diffusers"] = diffusers.__version__
    except Exception as e:  # noqa: BLE001 - absent (the GPU machine) or broken: recorded, not fatal
        d["diffusers"] = f"not importable: {type(e).__name__}"
    cache = gpu_variants.disk_cache_dir()
    d["triton_cache"] = {"dir": cache, "entries_at_start": gpu_variants.disk_cache_entries(cache),
                         "carried": os.environ.get("FASTDDPM_TRITON_CACHE_CARRIED", "no"),
                         "triton_key_sha256": triton_cache.triton_key_sha256()}
    manifest = os.path.join(cache, "manifest.json")
    if os.path.exists(manifest):  # a carried cache (benchmarks/triton_cache.py): can it be hit here?
        with open(manifest) as f:
            m = json.load(f)
        d["triton_cache"].update(manifest_triton_key_sha256=m.get("triton_key_sha256"), manifest_keyed_for=m.get(
            "keyed_for"), keys_match=m.get("triton_key_sha256") == d["triton_cache"]["triton_key_sha256"])
    pf.write()
    # one launch of the fused step against the reference: the install really runs kernels
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = Schedule.linear(1000)
    x, eps, z = (torch.randn(3, 3, 17, 29, device=dev) for _ in range(3))
    with pf.counting():
        got = ops.ddpm_step(s, x, 5, eps, z)
    sync()
    want = diffusion.ddpm_step(s, x, 5, eps, z)
    err = float((got - want).abs().max())
    pf.add({"check": "ops.ddpm_step vs diffusion.ddpm_step, (3, 3, 17, 29)", "backend": ops.backend_for(x),
            "max_abs_diff": err, "ok": err <= 1e-5})


def nvidia_smi():
    q = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        return dict(zip(q.split(","), (v.strip() for v in r.stdout.strip().split(","))))
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


# ------------------------------------------------------------------------------ models
def build_model(name):
    import torch

    import fastddpm

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    m = fastddpm.load() if name == "digits" else fastddpm.UNet.from_preset(name)
    return m.to(dev).eval(), dev


def shape_of(m):
    return (m.config.in_channels, m.config.image_size, m.config.image_size)


def rel_l2(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------ part 2
def part_smoke(pf, cfg):
    import torch

    import fastddpm
    from fastddpm import graphs

    with pf.counting():
        for model_name, n in cfg.smoke_models:
            model, dev = build_model(model_name)
            for method in METHODS:
                if pf.left() < 0:
                    return pf.finish(f"budget of {pf.data['budget_s']} s spent before {model_name} {method}")
                graphs.clear_cache()
                ref = None
                for backend in BACKENDS:  # the reference first
                    run = lambda b=backend: fastddpm.sample(  # noqa: E731
                        model, n, shape=shape_of(model), steps=cfg.smoke_steps, method=method, backend=b, seed=0)
                    x, first = timed_first(run)
                    steady = seconds(run, 1)
                    ref = x.float() if ref is None else ref
                    pf.add({"model": model_name, "n": n, "steps": cfg.smoke_steps, "method": method,
                            "backend": backend, "first_call_s": first, "steady_s": steady,
                            "rel_l2_vs_reference": rel_l2(x, ref),
                            "max_abs_vs_reference": float((x.float() - ref).abs().max()),
                            "finite": bool(torch.isfinite(x).all())})
            graphs.clear_cache()
    worst = {}
    for r in pf.data["rows"]:
        worst[r["backend"]] = max(worst.get(r["backend"], 0.0), r["rel_l2_vs_reference"])
    pf.data["worst_rel_l2_vs_reference"] = worst
    pf.data["tolerance_note"] = ("DESIGN.md: loops <= 1e-4 relative L2 for the same noise; deterministic loops "
                                 "(ddim, dpmsolver++) on a random U-Net (ddpm-cifar10 preset) amplify rounding, "
                                 "so read those rows as a smoke figure, the digits rows as the check")


# ------------------------------------------------------------------------------ part 3
def copy_bandwidth(dev, rehearsal):
    """Device-to-device copy, bytes read + written per second, on a 256 MB tensor (CPU: 16 MB)."""
    import torch

    n = (64 if not rehearsal else 4) * 2**20
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)
    return 8 * n / bench(lambda: b.copy_(a), rehearsal)


def bench(fn, rehearsal):
    """Seconds per call: triton.testing.do_bench's median on a GPU (device events), else wall time."""
    if not rehearsal:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return seconds(fn, 2)


def step_formula(tab, x, t, eps, z):
    """The DDPM step (eps, fixed_small, clip 1) as code bases write it in PyTorch, without
    argument checks (so torch.compile sees one graph): Ho et al. 2020 eq. 15 and 7."""
    from fastddpm.schedule import ROW

    c = lambda row: tab[ROW[row]][t].view(-1, 1, 1, 1)  # noqa: E731
    x0 = (c("sqrt_recip_abar") * x - c("sqrt_recipm1_abar") * eps.float()).clamp(-1, 1)
    mean = c("coef_x0") * x0 + c("coef_xt") * x
    return mean + (t > 0).float().view(-1, 1, 1, 1) * c("std_small") * z


def q_sample_formula(tab, x0, t):
    """x_t and eps of the forward process (Ho et al. eq. 4), the noise drawn by torch."""
    import torch

    from fastddpm.schedule import ROW

    eps = torch.randn(x0.shape, device=x0.device)
    x_t = tab[ROW["sqrt_abar"]][t].view(-1, 1, 1, 1) * x0.float() + tab[ROW["sqrt_one_minus_abar"]][t].view(
        -1, 1, 1, 1) * eps
    return x_t, eps


def kernel_rows(cfg):
    """(op, shape, layout, dtype) in the order of importance: the float32 step first."""
    out = []
    for op in ("ddpm_step", "q_sample"):
        for dtype in cfg.kernel_dtypes:
            for layout in ("contig", "channels_last"):
                for shape in cfg.kernel_shapes:
                    out.append((op, shape, layout, dtype))
    return out


def part_kernels(pf, cfg):
    import torch

    from fastddpm import Schedule, ops
    from benchmarks.harness import rotations

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = Schedule.linear(1000)
    tab = s.table(dev)
    pf.data["contenders"] = {"fused": "fastddpm.ops (one Triton launch, noise drawn in the kernel)",
                             "eager": "the formula in eager PyTorch (gathered coefficients, x0, clip, mean, noise)",
                             "torch.compile": "the same formula under torch.compile (dynamic=False)"}
    pf.data["copy_bytes_per_s"] = bw = copy_bandwidth(dev, cfg.rehearsal)
    pf.data["bytes_note"] = ("bytes credited to every contender: what the fused op must move (step: read x_t "
                             "float32 and the model output, write x_{t-1} float32; q_sample: read x0, write x_t and "
                             "eps float32); the eager ones move more than they are credited with")
    compile_spent = 0.0
    with pf.counting():
        for op, shape, layout, dtype in kernel_rows(cfg):
            if pf.left() < 0:
                return pf.finish(f"budget of {pf.data['budget_s']} s spent before {op} {shape} {layout} {dtype}")
            dt = getattr(torch, dtype)
            numel = math.prod(shape)
            esize = torch.finfo(dt).bits // 8
            nbytes = (4 + esize + 4) * numel if op == "ddpm_step" else (esize + 8) * numel
            mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            sets = []
            for _ in range(rotations(3 * 4 * numel) if not cfg.rehearsal else 1):
                x = torch.randn(shape, device=dev).to(memory_format=mf)
                sets.append(dict(x=x, mo=torch.randn(shape, device=dev).to(dt).to(memory_format=mf),
                                 x0=torch.randn(shape, device=dev).to(dt).to(memory_format=mf),
                                 z=torch.randn(shape, device=dev).to(memory_format=mf),
                                 t=torch.randint(1, 1000, (shape[0],), device=dev)))
            if op == "ddpm_step":
                fused = lambda d: ops.ddpm_step(s, d["x"], d["t"], d["mo"], seed=1)  # noqa: E731
                eager = lambda d: step_formula(tab, d["x"], d["t"], d["mo"], d["z"])  # noqa: E731
            else:
                fused = lambda d: ops.q_sample(s, d["x0"], d["t"], seed=1)  # noqa: E731
                eager = lambda d: q_sample_formula(tab, d["x0"], d["t"])  # noqa: E731
            contenders = [("fused", fused), ("eager", eager), ("torch.compile", None)]
            for name, fn in contenders:
                row = {"op": op, "shape": list(shape), "layout": layout, "dtype": dtype, "contender": name,
                       "bytes": nbytes}
                if name == "torch.compile":
                    if compile_spent >= cfg.compile_budget_s:
                        pf.add({**row, "skipped": f"torch.compile budget of {cfg.compile_budget_s} s spent"})
                        continue
                    torch._dynamo.reset()
                    fn = torch.compile(eager, backend=cfg.compile_backend, dynamic=False)
                    _, row["compile_s"] = timed_first(lambda: fn(sets[0]))
                    compile_spent += row["compile_s"]
                    row["compile_backend"] = cfg.compile_backend
                k = [0]

                def call(fn=fn):
                    k[0] += 1
                    return fn(sets[k[0] % len(sets)])

                sec = bench(call, cfg.rehearsal)
                row.update(us=sec * 1e6, gb_per_s=nbytes / sec / 1e9, frac_of_copy_bw=nbytes / sec / bw)
                pf.add(row)
    pf.data["compile_s_total"] = compile_spent


# ------------------------------------------------------------------------------ part 4
FID_SAMPLES = 50_000
PROJECTIONS = {"ddpm": 1000, "dpmsolver++": 20}  # method -> steps of the projected 50,000-sample run


def diffusers_loop(model, batch, steps, method, dev):
    import diffusers
    import torch

    cls = diffusers.DDPMScheduler if method == "ddpm" else diffusers.DPMSolverMultistepScheduler
    sched = cls(num_train_timesteps=1000)
    gen = torch.Generator(device=dev).manual_seed(0)

    def loop():
        sched.set_timesteps(steps)
        x = torch.randn((batch, *shape_of(model)), device=dev, generator=gen)
        with torch.no_grad():
            for t in sched.timesteps:
                out = model(x, t.to(dev).expand(batch))
                x = sched.step(out, t, x, generator=gen).prev_sample
        return x

    return loop


def part_sampling(pf, cfg):
    import fastddpm
    from fastddpm import graphs

    model, dev = build_model(cfg.sampling_model)
    pf.data["model"] = cfg.sampling_model
    pf.data["parameters"] = sum(p.numel() for p in model.parameters())
    contenders = BACKENDS[::-1]
    try:
        import diffusers  # noqa: F401

        contenders.append("diffusers")
    except Exception as e:  # noqa: BLE001 - not on the GPU machine unless its wheel is carried
        pf.data["diffusers"] = f"not importable ({type(e).__name__}): no diffusers rows"
    steps = cfg.sampling_steps
    with pf.counting():
        for batch in cfg.batches:
            for method in PROJECTIONS:
                for contender in contenders:
                    if pf.left() < 0:
                        return pf.finish(f"budget of {pf.data['budget_s']} s spent before {contender} {method} "
                                         f"batch {batch}")
                    if contender == "diffusers":
                        fn = diffusers_loop(model, batch, steps, method, dev)
                    else:
                        fn = lambda b=contender, m=method, n=batch: fastddpm.sample(  # noqa: E731
                            model, n, shape=shape_of(model), steps=steps, method=m, backend=b, seed=0)
                    _, first = timed_first(fn)
                    sec = seconds(fn, cfg.reps)
                    ms = 1e3 * sec / steps
                    row = {"backend": contender, "method": method, "batch": batch, "steps": steps,
                           "ms_per_step": ms, "images_per_s": batch / sec, "first_call_s": first,
                           "projected_50k_s": ms * PROJECTIONS[method] * math.ceil(FID_SAMPLES / batch) / 1e3,
                           "projected_steps": PROJECTIONS[method]}
                    pf.add(row)
            graphs.clear_cache()
    pf.data["projection_note"] = ("projected_50k_s = ms_per_step x projected_steps x ceil(50,000 / batch) / 1000: "
                                  "50,000 samples in batches of this size")
    guided_rows(pf, cfg, [c for c in contenders if c != "reference"])


GUIDANCE_SCALE = 4.0
GUIDED_METHOD = "dpmsolver++"
NUM_CLASSES = 10


def diffusers_guided_loop(model, batch, steps, null, dev):
    """diffusers' class-conditional guidance loop (DiTPipeline's structure: cat, one model call on
    2B rows, split, combine, scheduler.step on B rows) over a fastddpm UNet (labels under y)."""
    import diffusers
    import torch

    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000)
    gen = torch.Generator(device=dev).manual_seed(0)
    labels = torch.arange(batch, device=dev) % NUM_CLASSES
    y = torch.cat([labels, torch.full_like(labels, null)])

    def loop():
        sched.set_timesteps(steps)
        x = torch.randn((batch, *shape_of(model)), device=dev, generator=gen)
        with torch.no_grad():
            for t in sched.timesteps:
                out = model(torch.cat([x, x]), t.to(dev).expand(2 * batch), y=y)
                out_c, out_u = out.split(batch)
                x = sched.step(out_u + GUIDANCE_SCALE * (out_c - out_u), t, x, generator=gen).prev_sample
        return x

    return loop


def guided_rows(pf, cfg, contenders):
    """Classifier-free guided sampling (w = GUIDANCE_SCALE) after the unguided rows, never in their
    place: rows while the part's budget lasts (the part stays complete; pf.data["guided"] says
    what ran). vs_unguided: the row's ms/step over the unguided row of the same method, batch and
    backend (the same architecture without its label embedding)."""
    import torch

    import fastddpm
    from fastddpm import graphs

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = fastddpm.UNet.from_preset(cfg.sampling_model, num_classes=NUM_CLASSES).to(dev).eval()
    null = model.label_emb.num_embeddings - 1  # the null class, label K (K - 1 where the UNet has no null row yet)
    method = f"{GUIDED_METHOD} w={GUIDANCE_SCALE:g}"
    info = pf.data["guided"] = {"method": method, "guidance_scale": GUIDANCE_SCALE, "num_classes": NUM_CLASSES,
                                "null_class": null, "rows": 0, "stopped": None}
    unguided = {(r["batch"], r["backend"]): r["ms_per_step"] for r in pf.data["rows"] if r["method"] == GUIDED_METHOD}
    steps = cfg.sampling_steps
    for batch in cfg.batches:
        labels = torch.arange(batch, device=dev) % NUM_CLASSES
        for contender in contenders:
            if pf.left() < 0:
                info["stopped"] = f"budget of {pf.data['budget_s']} s spent before {contender} batch {batch}"
                pf.write()
                return
            if contender == "diffusers":
                fn = diffusers_guided_loop(model, batch, steps, null, dev)
            else:
                fn = lambda b=contender, n=batch, y=labels: fastddpm.sample(  # noqa: E731
                    model, n, shape=shape_of(model), steps=steps, method=GUIDED_METHOD, backend=b, seed=0,
                    class_labels=y, guidance_scale=GUIDANCE_SCALE, null_class=null)
            _, first = timed_first(fn)
            sec = seconds(fn, cfg.reps)
            ms = 1e3 * sec / steps
            row = {"backend": contender, "method": method, "batch": batch, "steps": steps, "ms_per_step": ms,
                   "images_per_s": batch / sec, "first_call_s": first,
                   "projected_50k_s": ms * PROJECTIONS[GUIDED_METHOD] * math.ceil(FID_SAMPLES / batch) / 1e3,
                   "projected_steps": PROJECTIONS[GUIDED_METHOD], "guidance_scale": GUIDANCE_SCALE}
            if (batch, contender) in unguided:
                row["vs_unguided"] = ms / unguided[batch, contender]
            pf.add(row)
            info["rows"] += 1
        graphs.clear_cache()


# ------------------------------------------------------------------------------ part 5
def part_tests(pf, cfg):
    """pytest in a subprocess per phase; SIGINT at the budget (pytest then still writes its
    summary and junit XML), SIGKILL 20 s later."""
    import signal
    import xml.etree.ElementTree as ET

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for i, sel in enumerate(cfg.test_phases):
        left = pf.left()
        if left < 10:
            pf.add({"selection": " ".join(sel), "skipped": "no time left in the part's budget"})
            continue
        xml = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastddpm-gpu-run-{os.getpid()}-{i}.xml")
        cmd = [sys.executable, "-m", "pytest", *sel, "-q", "-p", "no:cacheprovider", "--junitxml", xml, "-rfE"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timed_out = False
        try:
            out, _ = proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGINT)
            try:
                out, _ = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
        row = {"selection": " ".join(sel), "returncode": proc.returncode, "timed_out": timed_out,
               "wall_s": time.perf_counter() - t0, "summary": (out.strip().splitlines() or [""])[-1][-300:],
               "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
        if os.path.exists(xml):
            for case in ET.parse(xml).getroot().iter("testcase"):
                kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
                row[{"failure": "failed", "error": "errors"}.get(kind, kind)] += 1
                if kind in ("failure", "error"):
                    row["failures"].append(f"{case.get('classname')}::{case.get('name')}")
            os.remove(xml)
        row["output_tail"] = out[-3000:]
        pf.add(row)


RUNNERS = {1: part_env, 2: part_smoke, 3: part_kernels, 4: part_sampling, 5: part_tests}


def run_part(part, out, rehearsal, budget):
    """Child process: one part, its file kept up to date; exceptions recorded in the file."""
    cfg = Config(rehearsal)
    if rehearsal:
        import torch

        from fastddpm import graphs

        graphs.EMULATE_ON_CPU = True  # the graph loop's body, eagerly: the same launches as a capture
        torch.set_num_threads(1)  # on a shared CI CPU two threads thrash (median forward 0.5-2 s against 8 ms)
    pf = PartFile(out, part, rehearsal, budget)
    try:
        RUNNERS[part](pf, cfg)
    except Exception:  # noqa: BLE001 - keep what was measured, say what broke
        pf.data["error"] = traceback.format_exc()[-4000:]
        pf.finish("error: " + pf.data["error"].strip().splitlines()[-1][:300])
        print(pf.data["error"], file=sys.stderr)
        return 1
    if not pf.data["complete"] and pf.data["incomplete_reason"] == "running":
        pf.finish()
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for the JSON files (the device tool's $OUT)")
    p.add_argument("--rehearsal", action="store_true", help="on the CPU: Triton's interpreter, tiny sizes")
    p.add_argument("--parts", default="1,2,3,4,5", help="comma-separated parts to run (default all, in order)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    p.add_argument("--part", type=int, help=argparse.SUPPRESS)  # child process: run this one part
    a = p.parse_args(argv)
    if a.rehearsal:
        os.environ["TRITON_INTERPRET"] = "1"  # before fastddpm's kernels are defined
    os.makedirs(a.out, exist_ok=True)
    if a.part is not None:
        return run_part(a.part, a.out, a.rehearsal, budget_of(a.part, a.rehearsal) * a.budget_scale)
    parts = [int(k) for k in a.parts.split(",")]
    for k in parts:
        if k not in PARTS:
            p.error(f"--parts must list parts of {sorted(PARTS)}; got {k}")
    failed = []
    for k in parts:
        budget = budget_of(k, a.rehearsal) * a.budget_scale
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "benchmarks.gpu_run", a.out, "--part", str(k), "--budget-scale",
               str(a.budget_scale)] + (["--rehearsal"] if a.rehearsal else [])
        print(f"== part {k} ({PARTS[k]}), budget {budget:.0f} s", flush=True)
        try:  # the part stops itself at its budget between rows; this is for a row that hangs
            rc = subprocess.run(cmd, timeout=budget + 60).returncode
            reason = None if rc == 0 else f"its process exited with {rc}"
        except subprocess.TimeoutExpired:
            reason = f"cut off: its process outlived the budget of {budget:.0f} s by 60 s"
        path = os.path.join(a.out, f"{k}-{PARTS[k]}.json")
        if reason is not None:
            mark_incomplete(path, k, a.rehearsal, budget, reason)
        if not is_complete(path):
            failed.append(k)
        print(f"== part {k} ({PARTS[k]}) done in {time.perf_counter() - t0:.1f} s -> {path}", flush=True)
    summary(a.out, parts)
    return 1 if failed else 0  # every file is written either way; 1 says that one is incomplete


def is_complete(path):
    try:
        with open(path) as f:
            return json.load(f).get("complete") is True
    except (OSError, ValueError):
        return False


def budget_of(part, rehearsal):
    return REHEARSAL_BUDGET if rehearsal else BUDGETS[part]


def mark_incomplete(path, part, rehearsal, budget, reason):
    """Keep what a killed or crashed part wrote; say why it is incomplete (a file if it wrote none)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {"part": part, "name": PARTS[part], "rehearsal": rehearsal, "device": "unknown (the part wrote nothing)",
                "cuda": None, "torch": None, "triton": None, "started": now(), "budget_s": budget, "wall_s": None,
                "rows": []}
    data["complete"] = False
    if not str(data.get("incomplete_reason") or "").startswith("error"):  # the part's own error says more
        data["incomplete_reason"] = reason
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def summary(out, parts):
    """A short table last: what each part wrote."""
    print(f"{'part':<12} {'complete':<9} {'rows':>5} {'variants':>9} {'wall s':>7}  note")
    for k in parts:
        try:
            with open(os.path.join(out, f"{k}-{PARTS[k]}.json")) as f:
                d = json.load(f)
        except (OSError, ValueError):
            print(f"{k}-{PARTS[k]:<10} missing")
            continue
        v = d.get("variants", {}).get("variants", "-")
        print(f"{k}-{PARTS[k]:<10} {str(d.get('complete')):<9} {len(d.get('rows', [])):>5} {v!s:>9} "
              f"{d.get('wall_s') or 0:>7.1f}  {d.get('incomplete_reason') or ''}")


if __name__ == "__main__":
    sys.exit(main())

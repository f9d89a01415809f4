"""The table of sampling methods: each name with the options it takes and their defaults, its
family and its model evaluations per step. `fastddpm.sample`, the CLI and `fastddpm.compat`
read it, so a new sampler is a row here plus its update, and an option a method does not take
is refused in one place (`resolve`).

Families:
  "timestep"  on the training timesteps (a Schedule, respaced by `steps`): DDPM (Ho et al.
              2020), DDIM (Song et al. 2021), DPM-Solver++ (Lu et al. 2022); their loops and
              fused steps: fastddpm.sampler, fastddpm.ops, fastddpm.graph_loop
  "sigma"     on continuous noise levels (`sigmas`, Karras et al. 2022): k-diffusion's samplers
              under their own names, as stage programs of fastddpm.karras
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _checks as C

__all__ = ["Method", "METHODS", "NAMES", "get", "resolve", "OPTIONS"]

INF = float("inf")

# Every method option, and the values that leave a method that does not take it unchanged: the
# first is what fastddpm.sample's signature gives it when it is not passed.
OPTIONS = {
    "eta": (None, 0, 0.0), "variance": ("fixed_small",), "order": (None,), "solver_type": ("midpoint",),
    "use_clipped_model_output": (None, False), "self_condition": (False,), "sigmas": (None,),
    "sigma_min": (None,), "sigma_max": (None,), "rho": (None,), "quantize": (False,), "s_churn": (0.0,),
    "s_tmin": (0.0,), "s_tmax": (INF,), "s_noise": (1.0,), "r": (0.5,),
}


# why an option does not apply, where that is not obvious
WHY_NOT = {
    "eta": {"ddpm": "DDPM's noise is set by variance=", "dpmsolver++": "the stochastic variant is "
            "method='sde-dpmsolver++'"},
    "use_clipped_model_output": {"ddpm": "DDPM's step reads only the clipped x0, so it would change nothing"},
}


@dataclass(frozen=True)
class Method:
    name: str
    family: str              # "timestep" | "sigma"
    options: dict            # the options it takes -> the method's default
    evals_per_step: int      # model evaluations per step (a two-evaluation step's last step takes one)
    clip: float | None       # clip="auto": 1.0 (DDPM / DDIM, diffusers' default) or None
    summary: str


_SIGMA = dict(sigmas="karras", sigma_min=None, sigma_max=None, rho=None, quantize=False)
_CHURN = dict(s_churn=0.0, s_tmin=0.0, s_tmax=INF, s_noise=1.0)
_NOISE = dict(eta=1.0, s_noise=1.0)

METHODS = {m.name: m for m in (
    Method("ddpm", "timestep", dict(variance="fixed_small", self_condition=False), 1, 1.0,
           "ancestral sampling (Ho et al. 2020 Algorithm 2)"),
    Method("ddim", "timestep", dict(eta=0.0, use_clipped_model_output=None, self_condition=False), 1, 1.0,
           "DDIM (Song et al. 2021), deterministic at eta 0"),
    Method("dpmsolver++", "timestep", dict(order=2, solver_type="midpoint", self_condition=False), 1, None,
           "DPM-Solver++ (2M) on the data prediction (Lu et al. 2022; diffusers' DPMSolverMultistep)"),
    Method("sde-dpmsolver++", "timestep", dict(order=2, solver_type="midpoint", self_condition=False), 1, None,
           "SDE-DPM-Solver++ (2M)"),
    Method("euler", "sigma", {**_SIGMA, **_CHURN}, 1, None, "Euler (Karras et al. 2022 Algorithm 2 with Euler steps)"),
    Method("euler_ancestral", "sigma", {**_SIGMA, **_NOISE}, 1, None, "ancestral Euler ('Euler a')"),
    Method("heun", "sigma", {**_SIGMA, **_CHURN}, 2, None, "Heun (Karras et al. 2022 Algorithm 2)"),
    Method("dpm_2", "sigma", {**_SIGMA, **_CHURN}, 2, None, "DPM-Solver-2 style midpoint steps"),
    Method("dpm_2_ancestral", "sigma", {**_SIGMA, **_NOISE}, 2, None, "ancestral DPM-Solver-2"),
    Method("lms", "sigma", {**_SIGMA, "order": 4}, 1, None, "linear multistep (order 4)"),
    Method("dpmpp_2s_ancestral", "sigma", {**_SIGMA, **_NOISE}, 2, None, "ancestral DPM-Solver++(2S)"),
    Method("dpmpp_sde", "sigma", {**_SIGMA, **_NOISE, "r": 0.5}, 2, None, "DPM-Solver++ (stochastic, two stages)"),
    Method("dpmpp_2m", "sigma", dict(_SIGMA), 1, None, "DPM-Solver++(2M) ('DPM++ 2M Karras')"),
    Method("dpmpp_2m_sde", "sigma", {**_SIGMA, **_NOISE, "solver_type": "midpoint"}, 1, None,
           "DPM-Solver++(2M) SDE"),
    Method("dpmpp_3m_sde", "sigma", {**_SIGMA, **_NOISE}, 1, None, "DPM-Solver++(3M) SDE"),
)}
NAMES = tuple(METHODS)
SIGMA_NAMES = tuple(n for n, m in METHODS.items() if m.family == "sigma")


def get(method) -> Method:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {NAMES}; got {method!r}")
    return METHODS[method]


def _takers(name):
    return " / ".join(repr(n) for n, m in METHODS.items() if name in m.options)


def _same(a, b) -> bool:
    """a == b for option values: None only equals None, a bool only a bool, a tensor nothing."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a is None or b is None:
        return a is b
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an exotic value compares unequal
        return False


def resolve(method: str, **given) -> dict:
    """The options of `method` with its defaults filled in and every value checked, from the
    keyword arguments of fastddpm.sample (every name in OPTIONS). An option the method does not
    take must keep a value that changes nothing (OPTIONS), else it is an error naming it."""
    m = get(method)
    unknown = set(given) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown method options {sorted(unknown)}")
    out = {}
    for name, neutral in OPTIONS.items():
        value = given.get(name, neutral[0])
        if name in ("use_clipped_model_output", "self_condition", "quantize") and value is not None:
            C.check_bool(value, name)
        if name not in m.options:
            if not any(_same(value, v) for v in neutral):
                why = WHY_NOT.get(name, {}).get(m.name)
                raise ValueError(f"{name} applies to method={_takers(name)} only; got {name}={value!r} with "
                                 f"method={m.name!r}{f' ({why})' if why else ''}; leave it out (or pass "
                                 f"{name}={neutral[-1]!r}) or choose one of those methods")
            continue
        out[name] = m.options[name] if _same(value, neutral[0]) else value
    return _check_values(m, out)


def _float(v, name, lo=None, hi=None, inf_ok=False, what=""):
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and (math.isfinite(v) or (inf_ok and v == INF))
    if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}" if lo is not None else "a float"
        raise ValueError(f"{name} must be a finite float {rng}{what}; got {v!r}")
    return float(v)


def _check_values(m: Method, o: dict) -> dict:
    if "eta" in o:
        if m.name == "ddim":
            # eta > 1 would make sigma exceed sqrt(1 - abar_prev): the direction term has no real coefficient
            o["eta"] = _float(o["eta"], "eta", 0.0, 1.0, what=" for method='ddim' (1 = DDPM's posterior variance; "
                              "above 1 the direction term sqrt(1 - abar_prev - sigma^2) has no real value)")
        else:
            o["eta"] = _float(o["eta"], "eta", 0.0)
    if "variance" in o:
        C.one_of(o["variance"], C.VARIANCES, "variance")
    if "order" in o:
        allowed = (1, 2) if m.family == "timestep" else (1, 2, 3, 4)
        if isinstance(o["order"], bool) or o["order"] not in allowed:
            raise ValueError(f"order must be one of {allowed} for method={m.name!r}; got {o['order']!r}")
        o["order"] = int(o["order"])
    if "solver_type" in o:
        C.one_of(o["solver_type"], ("midpoint", "heun"), "solver_type")
    if o.get("use_clipped_model_output") is not None:
        C.check_bool(o["use_clipped_model_output"], "use_clipped_model_output")
    if "self_condition" in o:
        C.check_bool(o["self_condition"], "self_condition")
    if "quantize" in o:
        C.check_bool(o["quantize"], "quantize")
    for name in ("s_churn", "s_noise"):
        if name in o:
            o[name] = _float(o[name], name, 0.0)
    for name in ("s_tmin", "s_tmax"):
        if name in o:
            o[name] = _float(o[name], name, 0.0, inf_ok=name == "s_tmax")
    if "r" in o:
        o["r"] = _float(o["r"], "r", 0.0, 1.0)
        if o["r"] == 0:
            raise ValueError("r must be in (0, 1] (the intermediate stage's fraction of the step in log sigma); got 0")
    return o

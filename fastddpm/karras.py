"""k-diffusion's samplers on continuous noise levels, as stage programs (Karras et al. 2022;
Katherine Crowson's k-diffusion 0.1.1, `k_diffusion/sampling.py`: each builder below reads
side by side with its `sample_*` function).

Every one of these samplers is, per model evaluation ("stage"), a linear combination:

    D    = denoised estimate from the model output at this stage's sigma (fastddpm.sigmas)
    out  = a x + b D + c0 h0 + c1 h1 + c2 h2 + s z          the next stage's input
    push = p x + q D   onto the history h0, h1, h2 (h0 newest), for the stages that push

where x is the stage's input, h the history (previous denoised estimates, derivatives, or a
partial sum a two-evaluation step carries from its first evaluation to its second) and z
standard normal noise. The builders compute a, b, c, s, p, q for every stage in float64 from
the sigmas, in k-diffusion's own variables (to_d, sigma_hat, sigma_down / sigma_up, t = -log
sigma, h, r ...), with `Lin`, a linear combination of the symbols x, D, h0..h2.

The state between stages is the MODEL INPUT c_in x (c_in = 1 / sqrt(sigma^2 + 1) of the stage
it feeds; = the DDPM state x_t), not k-diffusion's x: the per-stage scalars absorb the
rescaling (`SigmaPlan`), so one fused pass per model evaluation reads x, the model output and
the history it needs and writes the next model input (and the history), with nothing else
in between. After the last stage (sigma 0, c_in = 1) the state is the image.

Noise: euler / heun / dpm_2 draw their churn noise (Karras et al. Algorithm 2, s_churn) at
the start of each step, used or not (its coefficient is 0 where gamma is 0); the ancestral and
SDE samplers draw where k-diffusion calls its noise_sampler. `Stage.draw` marks those points,
in k-diffusion's order, so generator= noise reproduces k-diffusion given the same draws. In
seed= mode the draw j of step i (churn noise belongs to the step it precedes) is stream tag
2 i + j, drawn only where its coefficient is nonzero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import _checks as C
from . import guidance as guidance_mod
from . import rng
from .sigmas import ancestral_step, denoiser_scalings, recorded_timesteps, sigma_to_t

__all__ = ["K_METHODS", "Lin", "Stage", "SigmaPlan", "build_plan", "sigma_step", "initial_state",
           "initial_state_seeded", "ROWS"]


# ----------------------------------------------------------------------------- linear combinations
class Lin:
    """A linear combination of the symbols x, D, h0, h1, h2 with float64 coefficients."""

    __slots__ = ("c",)
    SYMBOLS = ("x", "D", "h0", "h1", "h2")

    def __init__(self, **coef):
        self.c = {k: float(v) for k, v in coef.items() if v != 0}

    def __add__(self, other):
        out = dict(self.c)
        for k, v in other.c.items():
            out[k] = out.get(k, 0.0) + v
        return Lin(**out)

    def __sub__(self, other):
        return self + other * -1.0

    def __mul__(self, a):
        return Lin(**{k: v * float(a) for k, v in self.c.items()})

    __rmul__ = __mul__

    def __truediv__(self, a):
        return self * (1.0 / float(a))

    def __neg__(self):
        return self * -1.0

    def __getitem__(self, k):
        return self.c.get(k, 0.0)


X, D = Lin(x=1), Lin(D=1)
H = (Lin(h0=1), Lin(h1=1), Lin(h2=1))


@dataclass
class Stage:
    """One model evaluation at noise level `sigma` (k-diffusion's x space): out = the next stage's
    input (a Lin over x, D, h), plus `noise` z (std) drawn where `draw` (stream tag `tag`);
    `push`: a Lin over x, D pushed onto the history, or None."""

    sigma: float
    out: Lin
    noise: float = 0.0
    draw: bool = False
    tag: int = 0
    push: Lin | None = None


def to_d(sigma):
    """Karras ODE derivative (x - D) / sigma, as a Lin."""
    return (X - D) / sigma


# ----------------------------------------------------------------------------- the samplers
def _churn(sig, o):
    """sigma_hat of every step, and the churn noise std of every step (Karras et al. Algorithm 2)."""
    n = len(sig) - 1
    hats, stds = [], []
    for i in range(n):
        gamma = min(o["s_churn"] / n, 2 ** 0.5 - 1) if o["s_tmin"] <= sig[i] <= o["s_tmax"] else 0.0
        hat = sig[i] * (gamma + 1)
        hats.append(hat)
        stds.append(o["s_noise"] * math.sqrt(hat ** 2 - sig[i] ** 2) if gamma > 0 else 0.0)
    return hats, stds


def _with_churn(stages, i, n, churn_std):
    """The last stage of step i carries step i + 1's churn noise (drawn at every step but the last)."""
    if i + 1 < n:
        st = stages[-1]
        st.noise, st.draw, st.tag = churn_std[i + 1], True, 2 * (i + 1)


def euler(sig, o):
    n = len(sig) - 1
    hats, churn = _churn(sig, o)
    stages = []
    for i in range(n):
        d = to_d(hats[i])
        stages.append(Stage(hats[i], X + d * (sig[i + 1] - hats[i])))  # Euler method
        _with_churn(stages, i, n, churn)
    return stages, churn[0]


def heun(sig, o):
    n = len(sig) - 1
    hats, churn = _churn(sig, o)
    stages = []
    for i in range(n):
        d = to_d(hats[i])
        dt = sig[i + 1] - hats[i]
        if sig[i + 1] == 0:
            stages.append(Stage(hats[i], X + d * dt))  # Euler method
        else:
            # Heun's method: x_2 = x + d dt; carry x + d dt / 2 to the second evaluation
            stages.append(Stage(hats[i], X + d * dt, push=X + d * (dt / 2)))
            stages.append(Stage(sig[i + 1], H[0] + to_d(sig[i + 1]) * (dt / 2)))  # x + (d + d_2) / 2 dt
        _with_churn(stages, i, n, churn)
    return stages, churn[0]


def dpm_2(sig, o):
    n = len(sig) - 1
    hats, churn = _churn(sig, o)
    stages = []
    for i in range(n):
        d = to_d(hats[i])
        if sig[i + 1] == 0:
            stages.append(Stage(hats[i], X + d * (sig[i + 1] - hats[i])))  # Euler method
        else:
            # DPM-Solver-2: x_2 = x + d dt_1 at sigma_mid; x + d_2 dt_2
            sigma_mid = math.exp((math.log(hats[i]) + math.log(sig[i + 1])) / 2)
            stages.append(Stage(hats[i], X + d * (sigma_mid - hats[i]), push=X))
            stages.append(Stage(sigma_mid, H[0] + to_d(sigma_mid) * (sig[i + 1] - hats[i])))
        _with_churn(stages, i, n, churn)
    return stages, churn[0]


def euler_ancestral(sig, o):
    stages = []
    for i in range(len(sig) - 1):
        down, up = ancestral_step(sig[i], sig[i + 1], o["eta"])
        st = Stage(sig[i], X + to_d(sig[i]) * (down - sig[i]))  # Euler method
        if sig[i + 1] > 0:
            st.noise, st.draw, st.tag = o["s_noise"] * up, True, 2 * i
        stages.append(st)
    return stages, 0.0


def dpm_2_ancestral(sig, o):
    stages = []
    for i in range(len(sig) - 1):
        down, up = ancestral_step(sig[i], sig[i + 1], o["eta"])
        d = to_d(sig[i])
        if down == 0:
            stages.append(Stage(sig[i], X + d * (down - sig[i])))  # Euler method
        else:
            # DPM-Solver-2 to sigma_down, then the ancestral noise
            sigma_mid = math.exp((math.log(sig[i]) + math.log(down)) / 2)
            stages.append(Stage(sig[i], X + d * (sigma_mid - sig[i]), push=X))
            stages.append(Stage(sigma_mid, H[0] + to_d(sigma_mid) * (down - sig[i]), o["s_noise"] * up, True, 2 * i))
    return stages, 0.0


def _linear_multistep_coeff(order, t, i, j):
    """k-diffusion's linear_multistep_coeff: the integral over [t_i, t_{i+1}] of the Lagrange basis
    polynomial j on t_i, t_{i-1}, ..., t_{i-order+1} (exact polynomial integration in float64)."""
    roots = [t[i - k] for k in range(order) if k != j]
    denom = math.prod(t[i - j] - r for r in roots)
    poly = np.polynomial.Polynomial.fromroots(roots) if roots else np.polynomial.Polynomial([1.0])
    anti = poly.integ()
    return float((anti(t[i + 1]) - anti(t[i])) / denom)


def lms(sig, o):
    order = o["order"]
    stages = []
    for i in range(len(sig) - 1):
        cur = min(i + 1, order)
        coeffs = [_linear_multistep_coeff(cur, sig, i, j) for j in range(cur)]
        # x + sum_j coeff_j d_{i-j}; d_i is this stage's derivative, d_{i-1-k} the history h_k
        x = X + to_d(sig[i]) * coeffs[0]
        for j in range(1, cur):
            x = x + H[j - 1] * coeffs[j]
        stages.append(Stage(sig[i], x, push=to_d(sig[i]) if order > 1 else None))
    return stages, 0.0


def dpmpp_2s_ancestral(sig, o):
    stages = []
    for i in range(len(sig) - 1):
        down, up = ancestral_step(sig[i], sig[i + 1], o["eta"])
        if down == 0:
            stages.append(Stage(sig[i], X + to_d(sig[i]) * (down - sig[i])))  # Euler method
        else:
            # DPM-Solver++(2S): t = -log sigma, h = t_next - t, s = t + h / 2
            t, t_next = -math.log(sig[i]), -math.log(down)
            h = t_next - t
            s = t + h / 2
            stages.append(Stage(sig[i], math.exp(t - s) * X - math.expm1(-h / 2) * D,
                                push=math.exp(t - t_next) * X))
            stages.append(Stage(math.exp(-s), H[0] - math.expm1(-h) * D))
        if sig[i + 1] > 0:  # noise addition
            st = stages[-1]
            st.noise, st.draw, st.tag = o["s_noise"] * up, True, 2 * i
    return stages, 0.0


def dpmpp_sde(sig, o):
    eta, r = o["eta"], o["r"]
    stages = []
    for i in range(len(sig) - 1):
        if sig[i + 1] == 0:
            stages.append(Stage(sig[i], X + to_d(sig[i]) * (sig[i + 1] - sig[i])))  # Euler method
            continue
        # DPM-Solver++ (stochastic): t = -log sigma, s = t + h r
        t, t_next = -math.log(sig[i]), -math.log(sig[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        # step 1: to sigma(s) ancestrally; exp(t - s_) = sd / sigma(t) (no log of sd = 0)
        sd, su = ancestral_step(sig[i], math.exp(-s), eta)
        x_2 = (sd / sig[i]) * X - (sd / sig[i] - 1) * D
        # step 2: to sigma(t_next) with D_d = (1 - fac) D + fac D_2; carry its x and D parts
        sd2, su2 = ancestral_step(sig[i], sig[i + 1], eta)
        carry = (sd2 / sig[i]) * X - (sd2 / sig[i] - 1) * (1 - fac) * D
        stages.append(Stage(sig[i], x_2, o["s_noise"] * su, True, 2 * i, push=carry))
        stages.append(Stage(math.exp(-s), H[0] - (sd2 / sig[i] - 1) * fac * D, o["s_noise"] * su2, True, 2 * i + 1))
    return stages, 0.0


def dpmpp_2m(sig, o):
    stages = []
    for i in range(len(sig) - 1):
        if sig[i + 1] == 0:
            stages.append(Stage(sig[i], D * 1.0, push=D))  # sigma_fn(t_next) = 0, expm1(-inf) = -1
            continue
        t, t_next = -math.log(sig[i]), -math.log(sig[i + 1])
        h = t_next - t
        if i == 0:
            d = D
        else:
            r = (t + math.log(sig[i - 1])) / h  # h_last / h
            d = (1 + 1 / (2 * r)) * D - (1 / (2 * r)) * H[0]
        stages.append(Stage(sig[i], (sig[i + 1] / sig[i]) * X - math.expm1(-h) * d, push=D))
    return stages, 0.0


def dpmpp_2m_sde(sig, o):
    eta, solver_type = o["eta"], o["solver_type"]
    stages, h_last = [], None
    for i in range(len(sig) - 1):
        if sig[i + 1] == 0:
            stages.append(Stage(sig[i], D * 1.0, push=D))  # denoising step
            continue
        t, s = -math.log(sig[i]), -math.log(sig[i + 1])
        h = s - t
        eta_h = eta * h
        x = sig[i + 1] / sig[i] * math.exp(-eta_h) * X + -math.expm1(-h - eta_h) * D
        if h_last is not None:
            r = h_last / h
            if solver_type == "heun":
                x = x + (-math.expm1(-h - eta_h) / (-h - eta_h) + 1) * (1 / r) * (D - H[0])
            else:
                x = x + 0.5 * -math.expm1(-h - eta_h) * (1 / r) * (D - H[0])
        st = Stage(sig[i], x, push=D)
        if eta:
            st.noise, st.draw, st.tag = sig[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * o["s_noise"], True, 2 * i
        stages.append(st)
        h_last = h
    return stages, 0.0


def dpmpp_3m_sde(sig, o):
    eta = o["eta"]
    stages, h_1, h_2 = [], None, None
    for i in range(len(sig) - 1):
        h = None
        if sig[i + 1] == 0:
            stages.append(Stage(sig[i], D * 1.0, push=D))  # denoising step
        else:
            t, s = -math.log(sig[i]), -math.log(sig[i + 1])
            h = s - t
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * X + -math.expm1(-h_eta) * D
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (D - H[0]) / r0
                d1_1 = (H[0] - H[1]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x = x + phi_2 * ((D - H[0]) / r)
            st = Stage(sig[i], x, push=D)
            if eta:
                std = sig[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * o["s_noise"]
                st.noise, st.draw, st.tag = std, True, 2 * i
            stages.append(st)
        h_1, h_2 = h if h is not None else h_1, h_1
    return stages, 0.0


# name -> (builder, history buffers it uses)
K_METHODS = {
    "euler": (euler, lambda o: 0), "euler_ancestral": (euler_ancestral, lambda o: 0), "heun": (heun, lambda o: 1),
    "dpm_2": (dpm_2, lambda o: 1), "dpm_2_ancestral": (dpm_2_ancestral, lambda o: 1),
    "lms": (lms, lambda o: o["order"] - 1), "dpmpp_2s_ancestral": (dpmpp_2s_ancestral, lambda o: 1),
    "dpmpp_sde": (dpmpp_sde, lambda o: 1), "dpmpp_2m": (dpmpp_2m, lambda o: 1),
    "dpmpp_2m_sde": (dpmpp_2m_sde, lambda o: 1), "dpmpp_3m_sde": (dpmpp_3m_sde, lambda o: 2),
}

# ----------------------------------------------------------------------------- the plan
# rows of the float32 device table SigmaPlan.table(device) (the kernel reads the same)
ROWS = ("cs", "co", "a", "b", "c0", "c1", "c2", "s", "p", "q")
ROW = {name: i for i, name in enumerate(ROWS)}


@dataclass
class SigmaPlan:
    """One sampler over one sigma schedule, in state space (the state is the model input c_in x).

    Per stage k (K = the number of model evaluations), float64 (K,) host tensors:
        cs, co        D = cs x + co model_output        (then clamped when clip is set)
        a, b, c0..c2  out = a x + b D + c0 h0 + c1 h1 + c2 h2 + s z
        s             noise std; p, q: push p x + q D onto the history (shift h0 -> h1 -> h2) where
                      p or q is nonzero
        sigma         the noise level the model is evaluated at; timestep: its training timestep
                      (sigma_to_t; float64, or int64 with quantize)
        tag           int64 stream tag of the stage's noise; draw: bool, k-diffusion draws here
    init: x_0 = init_std z_init + init_churn z_0 (z_0: step 0's churn noise, tag 0; drawn in
    generator mode when init_draws)."""

    method: str
    sigmas: torch.Tensor
    coef: torch.Tensor          # (len(ROWS), K) float64
    sigma: torch.Tensor
    timestep: torch.Tensor
    tag: torch.Tensor
    draw: torch.Tensor
    init_std: float
    init_churn: float
    init_draws: bool
    num_history: int
    clip: float | None
    steps: int

    @property
    def nfe(self) -> int:
        return self.coef.shape[1]

    def row(self, name) -> torch.Tensor:
        return self.coef[ROW[name]]

    def table(self, device) -> torch.Tensor:
        """(len(ROWS), K) float32 on device, rounded from float64 once, cached."""
        return self._cached(("table", str(torch.device(device))),
                            lambda d: self.coef.to(torch.float32).to(d).contiguous(), device)

    def tags_on(self, device) -> torch.Tensor:
        return self._cached(("tags", str(torch.device(device))), lambda d: self.tag.to(torch.int32).to(d), device)

    def timesteps_on(self, device) -> torch.Tensor:
        """The model's timestep per stage: float32, or int64 with quantize."""
        f = (lambda d: self.timestep.to(d)) if not self.timestep.is_floating_point() else \
            (lambda d: self.timestep.to(torch.float32).to(d))
        return self._cached(("timesteps", str(torch.device(device))), f, device)

    def key(self) -> str:
        """A digest of everything the loop reads: equal plans share a captured loop."""
        import hashlib

        h = hashlib.sha1()
        for t in (self.coef, self.timestep.to(torch.float64), self.tag, self.draw.long()):
            h.update(t.numpy().tobytes())
        h.update(repr((self.method, self.init_std, self.init_churn, self.num_history, self.clip,
                       self.timestep.dtype)).encode())
        return h.hexdigest()

    def _cached(self, key, make, device):
        cache = self.__dict__.setdefault("_device_cache", {})
        if key not in cache:
            cache[key] = make(torch.device(device))
        return cache[key]


def build_plan(method: str, sigmas: torch.Tensor, s, prediction: str, options: dict, clip=None,
               quantize: bool = False) -> SigmaPlan:
    """The SigmaPlan of `method` (a K_METHODS name) over `sigmas` (float64, decreasing, final 0) for
    a model trained on schedule s predicting `prediction`; options: the method's resolved options."""
    builder, hist = K_METHODS[method]
    sig = [float(v) for v in sigmas]
    stages, churn0 = builder(sig, options)
    K = len(stages)
    cin = [denoiser_scalings(prediction, st.sigma)[2] for st in stages] + [1.0]
    coef = torch.zeros(len(ROWS), K, dtype=torch.float64)
    for k, st in enumerate(stages):
        c_skip, c_out, _ = denoiser_scalings(prediction, st.sigma)
        here, nxt = cin[k], cin[k + 1]  # x = state / here; the next state = nxt * out
        coef[ROW["cs"], k] = c_skip / here
        coef[ROW["co"], k] = c_out
        coef[ROW["a"], k] = nxt * st.out["x"] / here
        coef[ROW["b"], k] = nxt * st.out["D"]
        for j in range(3):
            coef[ROW[f"c{j}"], k] = nxt * st.out[f"h{j}"]
        coef[ROW["s"], k] = nxt * st.noise
        if st.push is not None:
            coef[ROW["p"], k] = st.push["x"] / here
            coef[ROW["q"], k] = st.push["D"]
    sigma = torch.tensor([st.sigma for st in stages], dtype=torch.float64)
    # a peer scheduler's own timesteps and initial noise where s records them for these sigmas
    recorded = recorded_timesteps(sigma, sigmas, s)
    timestep, init_sigma = recorded if recorded is not None else (sigma_to_t(sigma, s, quantize=quantize), sig[0])
    return SigmaPlan(method=method, sigmas=sigmas, coef=coef, sigma=sigma, timestep=timestep,
                     tag=torch.tensor([st.tag for st in stages], dtype=torch.long),
                     draw=torch.tensor([st.draw for st in stages], dtype=torch.bool),
                     init_std=cin[0] * init_sigma, init_churn=cin[0] * churn0,
                     init_draws=method in ("euler", "heun", "dpm_2"), num_history=hist(options), clip=clip,
                     steps=len(sig) - 1)


# ----------------------------------------------------------------------------- reference update
def _at(row, k, x):
    return row[k] if isinstance(k, int) else row[k].view(-1, *([1] * (x.ndim - 1)))


def check_sigma_step_args(plan, x, k, model_output, history, noise, seed, sample_offset):
    """Validate one stage update's arguments (shared by the reference and the fused op); returns k."""
    if not isinstance(plan, SigmaPlan):
        raise TypeError(f"plan must be a fastddpm.karras.SigmaPlan; got {type(plan).__name__}")
    C.check_float_tensor(x, "x")
    k = C.check_index(k, plan.nfe, x, "k", "stage")
    C.check_model_output(model_output, x, "fixed_small")
    history = tuple(history or ())
    if len(history) != plan.num_history:
        raise ValueError(f"history must hold {plan.num_history} tensors like x for method={plan.method!r}; "
                         f"got {len(history)}")
    for j, h in enumerate(history):
        C.check_like(h, x, f"history[{j}]")
    stoch = bool((plan.row("s") != 0).any())
    quiet = isinstance(k, int) and float(plan.row("s")[k]) == 0  # this stage adds no noise
    C.check_noise_source(noise, seed, x, needs_noise=stoch and not quiet)
    C.check_sample_offset(sample_offset)
    if sample_offset + x.shape[0] > 2**32:
        raise ValueError(f"sample_offset + batch must not exceed 2**32; got {sample_offset} + {x.shape[0]}")
    return k, history


def sigma_step(plan: SigmaPlan, x: torch.Tensor, k, model_output: torch.Tensor, history=(), noise=None, *,
               seed: int | None = None, sample_offset: int = 0, guidance=None):
    """One stage of a k-diffusion sampler (the reference update; `fastddpm.ops.sigma_step` is the
    fused one): x (B, C, ...) the state (the model input of stage k), model_output the model's
    output on it, history the plan.num_history tensors like x (h0 newest). noise: standard normal
    like x, or None with seed=<int> to draw sample b's noise from the stream (tag plan.tag[k]).
    guidance: as in fastddpm.diffusion.ddpm_step (model_output then the doubled batch or a pair).
    Returns (the next state, the new history), float32."""
    if guidance is not None:
        model_output = guidance_mod.combine(model_output, guidance, x)
    k, history = check_sigma_step_args(plan, x, k, model_output, history, noise, seed, sample_offset)
    tab = plan.table(x.device)
    r = {name: _at(tab[ROW[name]], k, x) for name in ROWS}
    xf = x.float()
    d = r["cs"] * xf + r["co"] * model_output.float()
    if plan.clip is not None:
        d = d.clamp(-plan.clip, plan.clip)
    out = r["a"] * xf + r["b"] * d
    for j, h in enumerate(history):
        out = out + r[f"c{j}"] * h.float()
    s = r["s"]
    if (s != 0).any():
        if noise is not None:
            z = noise.float()
        else:
            tag = plan.tags_on(x.device)[k].long() if not isinstance(k, int) else int(plan.tag[k])
            z = rng.normal_like(x, seed, sample_offset, tag)
        out = out + torch.where(s != 0, s * z, torch.zeros_like(out))
    if history:
        pushes = (r["p"] != 0) | (r["q"] != 0)
        aux = r["p"] * xf + r["q"] * d
        shifted = (aux, *(h.float() for h in history[:-1]))
        history = tuple(torch.where(pushes, new, old.float()) for new, old in zip(shifted, history))
    return out, history


def initial_state(plan: SigmaPlan, z_init: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
    """The first model input: c_in (sigma_max z_init + step 0's churn noise z0)."""
    x = plan.init_std * z_init.float()
    if plan.init_churn != 0:
        x = x + plan.init_churn * z0.float()
    return x


def initial_state_seeded(plan: SigmaPlan, like: torch.Tensor, seed: int, sample_offset: int = 0) -> torch.Tensor:
    """initial_state with the stream's noise of samples sample_offset.. (z_init: TAG_INIT, z0: tag 0),
    shaped like `like` (B, ...)."""
    z0 = rng.normal_like(like, seed, sample_offset, 0) if plan.init_churn != 0 else None
    return initial_state(plan, rng.normal_like(like, seed, sample_offset, rng.TAG_INIT), z0)

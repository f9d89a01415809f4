"""Noise schedules: the tables every step of DDPM / DDIM reads.

A `Schedule` holds S steps. Step i corresponds to the ORIGINAL training timestep
`timesteps[i]` (ascending); for an un-respaced schedule timesteps[i] == i. Everything
is derived from alphas_cumprod (abar) in float64 on the host:

    abar_prev[i] = abar[i-1] (1 for i == 0)
    beta[i]      = 1 - abar[i] / abar_prev[i]          (the respaced beta, Nichol & Dhariwal 2021 App. B)
    posterior variance  = beta (1 - abar_prev) / (1 - abar)                (Ho et al. 2020 eq. 7)
    posterior mean      = coef_x0 * x0 + coef_xt * x_t, with
        coef_x0 = beta sqrt(abar_prev) / (1 - abar),  coef_xt = (1 - abar_prev) sqrt(1 - beta) / (1 - abar)

Every coefficient is computed in float64 first and only then rounded to float32 for the
device table: 1 - abar in float32 loses ~3 significant digits near t = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import _checks
from .diffusers_schedule import schedule_from_diffusers

__all__ = ["Schedule", "SPACINGS", "ROW"]

SPACINGS = ("leading", "trailing", "linspace")

# Row index of each float32 coefficient in the device table (Schedule.table(device)).
# The Triton kernels read the same rows; keep this in one place.
ROW = dict(
    sqrt_abar=0,            # sqrt(abar)
    sqrt_one_minus_abar=1,  # sqrt(1 - abar)
    sqrt_recip_abar=2,      # 1 / sqrt(abar)
    sqrt_recipm1_abar=3,    # sqrt(1 / abar - 1)
    coef_x0=4,              # posterior mean coefficient of predicted x0
    coef_xt=5,              # posterior mean coefficient of x_t
    std_small=6,            # sqrt(posterior variance)          ("fixed_small")
    std_large=7,            # sqrt(beta)                         ("fixed_large", diffusers)
    log_var_small=8,        # log(max(posterior variance, 1e-20))  (learned_range lower end)
    log_beta=9,             # log(beta)                          (learned_range upper end)
    sqrt_abar_prev=10,      # sqrt(abar_prev)
    ddim_sigma1=11,         # DDIM sigma at eta = 1 (Song et al. 2021 eq. 16)
    ddim_dir0=12,           # sqrt(1 - abar_prev): DDIM direction coefficient at eta = 0
)
NUM_ROWS = len(ROW)


def _as_float64_1d(values, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        t = values.detach().to("cpu", torch.float64)
    else:
        try:
            t = torch.as_tensor(np.asarray(values, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a 1-D tensor, array or list of floats; got {type(values).__name__}") from e
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be 1-D and non-empty; got shape {tuple(t.shape)}")
    return t


@dataclass(frozen=True)
class _DdimRows:
    sigma: torch.Tensor    # (S,) float32: eta * sigma1
    dir_coef: torch.Tensor  # (S,) float32: sqrt(1 - abar_prev - sigma^2)


class Schedule:
    """A DDPM noise schedule over S steps (possibly a respaced subset of the training steps).

    Build with `Schedule.linear`, `Schedule.cosine`, `Schedule.from_betas` or
    `Schedule.from_diffusers`; derive fewer-step schedules with `respace`.

    Attributes (float64 CPU tensors of shape (S,) unless noted):
        num_steps            S
        num_train_timesteps  T, the length of the schedule the model was trained on
        timesteps            LongTensor (S,): original training timestep of each step, ascending
        alphas_cumprod, alphas_cumprod_prev, betas, alphas
        posterior_variance, posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2
    """

    def __init__(self, alphas_cumprod, timesteps=None, num_train_timesteps: int | None = None):
        abar = _as_float64_1d(alphas_cumprod, "alphas_cumprod")
        if not torch.isfinite(abar).all() or (abar <= 0).any() or (abar >= 1).any():
            raise ValueError("alphas_cumprod must lie strictly inside (0, 1)")
        if (abar[1:] >= abar[:-1]).any():
            raise ValueError("alphas_cumprod must be strictly decreasing (every beta in (0, 1))")
        S = abar.numel()
        if timesteps is None:
            timesteps = torch.arange(S)
        timesteps = torch.as_tensor(timesteps, dtype=torch.long).flatten().cpu()
        if timesteps.numel() != S:
            raise ValueError(f"timesteps has {timesteps.numel()} entries, alphas_cumprod has {S}")
        if (timesteps[1:] <= timesteps[:-1]).any() or timesteps[0] < 0:
            raise ValueError("timesteps must be non-negative and strictly ascending")
        T = int(num_train_timesteps) if num_train_timesteps is not None else int(timesteps[-1]) + 1
        if T <= int(timesteps[-1]):
            raise ValueError(f"num_train_timesteps={T} must exceed the largest timestep {int(timesteps[-1])}")

        self.num_steps = S
        self.num_train_timesteps = T
        self.timesteps = timesteps
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.betas = 1.0 - abar / self.alphas_cumprod_prev
        self.alphas = 1.0 - self.betas
        one_m = 1.0 - abar
        one_m_prev = 1.0 - self.alphas_cumprod_prev
        self.posterior_variance = self.betas * one_m_prev / one_m
        # improved-diffusion's clipped log variance (index 0 would be log 0).
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2] if S > 1 else self.betas[:1], pv[1:]]))
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / one_m
        self.posterior_mean_coef2 = one_m_prev * self.alphas.sqrt() / one_m
        self._tables: dict = {}
        self._ddim: dict = {}
        # sampler options of the diffusers scheduler this came from (fastddpm.compat), else None
        self.source_options: dict | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_betas(cls, betas, timesteps=None, num_train_timesteps=None) -> "Schedule":
        """Schedule of the training betas (1-D tensor / array / list, every value in (0, 1))."""
        b = _as_float64_1d(betas, "betas")
        if not torch.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
            bad = b[~(torch.isfinite(b) & (b > 0) & (b < 1))][:3].tolist()
            raise ValueError(f"betas must lie strictly inside (0, 1); got values such as {bad}")
        return cls(torch.cumprod(1.0 - b, 0), timesteps, num_train_timesteps)

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        """Ho et al. 2020: betas linear from beta_start to beta_end (float64)."""
        _check_positive_int(num_timesteps, "num_timesteps")
        return cls.from_betas(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "Schedule":
        """Nichol & Dhariwal 2021 eq. 17: abar(t) = cos^2((t/T + s)/(1 + s) * pi/2), betas capped at max_beta."""
        _check_positive_int(num_timesteps, "num_timesteps")
        f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        T = num_timesteps
        betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
        return cls.from_betas(betas)

    @classmethod
    def from_diffusers(cls, scheduler) -> "Schedule":
        """Schedule of a diffusers DDPMScheduler / DDIMScheduler (its betas as configured).

        If `scheduler.set_timesteps(k)` was called, the result is respaced to exactly
        `scheduler.timesteps`. See `fastddpm.compat` for the options that are honoured.
        Euler / EulerAncestral / Heun / KDPM2 / LMS and DPM-Solver with Karras sigmas give the
        training schedule, recording the scheduler's noise levels and timesteps
        (fastddpm.diffusers_sigmas); pass it with the rest of `compat.sample_kwargs(scheduler)`.
        """
        return schedule_from_diffusers(cls, scheduler)

    # ------------------------------------------------------------------ respacing
    def respace(self, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> "Schedule":
        """Keep `num_steps` of this schedule's steps, chosen as diffusers' `set_timesteps` does.

        spacing (over this schedule's S steps, indices 0..S-1):
          "leading":  i * (S // k) + steps_offset                       (diffusers' default)
          "trailing": round(arange(S, 0, -S / k)) - 1
          "linspace": round(linspace(0, S - 1, k))
        The kept steps keep their original abar; betas are recomputed from consecutive
        kept steps (Nichol & Dhariwal 2021, App. B), so the model sees the same timesteps.
        """
        idx = respaced_indices(self.num_steps, num_steps, spacing, steps_offset)
        return self.select(idx)

    def select(self, indices) -> "Schedule":
        """Sub-schedule of the given (ascending, unique) step indices of this schedule."""
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        if idx.numel() == 0 or idx.min() < 0 or idx.max() >= self.num_steps:
            raise ValueError(f"indices must be non-empty and within 0..{self.num_steps - 1}")
        if (idx[1:] <= idx[:-1]).any():
            raise ValueError("indices must be strictly ascending")
        sub = Schedule(self.alphas_cumprod[idx], self.timesteps[idx], self.num_train_timesteps)
        sub.source_options = self.source_options
        return sub

    # ------------------------------------------------------------------ device tables
    def table(self, device) -> torch.Tensor:
        """(NUM_ROWS, S) float32 coefficient table on `device`, built once per device.

        Rows are named in `fastddpm.schedule.ROW`. Each row is computed in float64 and
        rounded to float32 once.
        """
        device = torch.device(device)
        key = str(device)
        tab = self._tables.get(key)
        if tab is None:
            abar, abar_prev, beta = self.alphas_cumprod, self.alphas_cumprod_prev, self.betas
            one_m, one_m_prev = 1.0 - abar, 1.0 - abar_prev
            rows = torch.empty(NUM_ROWS, self.num_steps, dtype=torch.float64)
            rows[ROW["sqrt_abar"]] = abar.sqrt()
            rows[ROW["sqrt_one_minus_abar"]] = one_m.sqrt()
            rows[ROW["sqrt_recip_abar"]] = abar.rsqrt()
            rows[ROW["sqrt_recipm1_abar"]] = (one_m / abar).sqrt()
            rows[ROW["coef_x0"]] = self.posterior_mean_coef1
            rows[ROW["coef_xt"]] = self.posterior_mean_coef2
            rows[ROW["std_small"]] = self.posterior_variance.sqrt()
            rows[ROW["std_large"]] = beta.sqrt()
            rows[ROW["log_var_small"]] = self.posterior_variance.clamp(min=1e-20).log()
            rows[ROW["log_beta"]] = beta.log()
            rows[ROW["sqrt_abar_prev"]] = abar_prev.sqrt()
            rows[ROW["ddim_sigma1"]] = (one_m_prev / one_m * beta).sqrt()
            rows[ROW["ddim_dir0"]] = one_m_prev.sqrt()
            tab = rows.to(torch.float32).to(device).contiguous()
            self._tables[key] = tab
        return tab

    def ddim_rows(self, device, eta: float) -> _DdimRows:
        """float32 (S,) DDIM sigma_t(eta) and direction coefficient sqrt(1 - abar_prev - sigma^2),
        computed in float64, cached per (device, eta)."""
        key = (str(torch.device(device)), float(eta))
        rows = self._ddim.get(key)
        if rows is None:
            one_m_prev = 1.0 - self.alphas_cumprod_prev
            var1 = one_m_prev / (1.0 - self.alphas_cumprod) * self.betas
            sigma = float(eta) * var1.sqrt()
            dir_coef = (one_m_prev - sigma**2).clamp(min=0.0).sqrt()
            rows = _DdimRows(sigma.float().to(device), dir_coef.float().to(device))
            self._ddim[key] = rows
        return rows

    def dpm_coefficients(self, method: str = "dpmsolver++", order: int = 2, solver_type: str = "midpoint"):
        """float64 per-step DPM-Solver++ coefficients (fastddpm.dpm_solver.DpmCoefficients), cached."""
        key = ("dpm64", method, order, solver_type)
        coef = self._tables.get(key)
        if coef is None:
            from .dpm_solver import dpm_coefficients

            coef = self._tables[key] = dpm_coefficients(self, method, order, solver_type)
        return coef

    def dpm_rows(self, device, method: str = "dpmsolver++", order: int = 2, solver_type: str = "midpoint"):
        """(4, S) float32 DPM-Solver++ step rows (fastddpm.dpm_solver.DPM_ROW) on `device`,
        computed in float64 and cached per (device, configuration)."""
        key = ("dpm", str(torch.device(device)), method, order, solver_type)
        rows = self._tables.get(key)
        if rows is None:
            rows = self._tables[key] = self.dpm_coefficients(method, order, solver_type).rows(device)
        return rows

    def timesteps_on(self, device) -> torch.Tensor:
        key = ("timesteps", str(torch.device(device)))
        ts = self._tables.get(key)
        if ts is None:
            ts = self._tables[key] = self.timesteps.to(device)
        return ts

    def __repr__(self) -> str:
        return (f"Schedule(num_steps={self.num_steps}, num_train_timesteps={self.num_train_timesteps}, "
                f"timesteps=[{int(self.timesteps[0])}..{int(self.timesteps[-1])}])")


_checks.SCHEDULE_TYPE = Schedule  # what _checks.check_schedule accepts


def _check_positive_int(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{name} must be a positive int; got {v!r}")


def respaced_indices(num_train: int, k: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """Ascending indices into 0..num_train-1 chosen as diffusers' set_timesteps chooses them."""
    _check_positive_int(k, "num_steps")
    if k > num_train:
        raise ValueError(f"num_steps={k} exceeds the schedule's {num_train} steps")
    if spacing == "leading":
        ratio = num_train // k
        idx = np.arange(0, k) * ratio + int(steps_offset)
    elif spacing == "trailing":
        idx = np.round(np.arange(num_train, 0, -num_train / k)).astype(np.int64)[::-1] - 1
    elif spacing == "linspace":
        idx = np.linspace(0, num_train - 1, k).round().astype(np.int64)
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}; got {spacing!r}")
    idx = np.asarray(idx, dtype=np.int64)
    if idx.min() < 0 or idx.max() >= num_train or len(np.unique(idx)) != k:
        raise ValueError(f"spacing={spacing!r} with steps_offset={steps_offset} gives invalid steps for "
                         f"{k} of {num_train}: {idx.tolist()[:8]}...")
    return idx

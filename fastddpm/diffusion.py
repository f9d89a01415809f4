"""Reference DDPM / DDIM math in plain PyTorch: the numbers every fast path must reproduce.

Forward process (Ho et al. 2020 eq. 4):   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
Predicted x0 from the model output (eq. 15 for eps; Salimans & Ho 2022 for v):
    eps: x0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps
    x0:  x0 = model_output
    v:   x0 = sqrt(abar) x_t - sqrt(1 - abar) v
DDPM step (Ho et al. eq. 6-7, Algorithm 2): x_{t-1} = coef_x0 x0 + coef_xt x_t + sigma_t z
    fixed_small:   sigma^2 = posterior variance beta (1 - abar_prev) / (1 - abar)
    fixed_large:   sigma^2 = beta_t                (diffusers; improved-diffusion uses the
                                                    posterior variance at t = 0 instead, which
                                                    never matters because step 0 adds no noise)
    learned_range: log sigma^2 = f log beta + (1 - f) log posterior variance, f = (v + 1) / 2
                   (Nichol & Dhariwal 2021 eq. 15); the model returns 2C channels [eps | v].
DPM-Solver++ (Lu et al. 2022), first and multistep second order, ODE and SDE: `dpm_solver_step`,
    x_{t-1} = a x_t + b x0 + d (x0 - x0_prev) + std z with float64-computed per-step rows
    (their derivation and the respacing: fastddpm/dpm_solver.py).
DDIM step (Song et al. 2021 eq. 12):
    x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)    (eq. 16)

Conventions (diffusers' wherever diffusers and improved-diffusion differ):
- t is a STEP INDEX 0..S-1 of the (possibly respaced) schedule, an int or a LongTensor (B,).
- Step 0 never adds noise (its noise argument is ignored).
- clip=c clamps predicted x0 to [-c, c] (DDPMScheduler's clip_sample); None disables.
- DDIM keeps the RAW model eps in the direction term when x0 is clipped (diffusers'
  use_clipped_model_output=False). With use_clipped_model_output=True it re-derives eps from
  the clipped x0, eps = (sqrt(1/abar) x_t - x0) / sqrt(1/abar - 1), as improved-diffusion
  (`_predict_eps_from_xstart`), denoising-diffusion-pytorch (`predict_noise_from_start`) and
  diffusers' option of that name do. DDPM's step reads only the clipped x0, so the option
  has no counterpart there.
- The learned_range lower end is log(max(posterior variance, 1e-20)) as in diffusers;
  improved-diffusion clips index 0 to the value at index 1 (again only at t = 0).
- Math runs in float32 from float32 coefficients that were computed in float64; the
  result is float32 whatever the input dtypes.
"""
from __future__ import annotations

import torch

from . import _checks as C
from . import dpm_solver, guidance, rng
from .schedule import ROW, Schedule

__all__ = ["q_sample", "predict_x0", "predict_eps", "eps_from_x0", "training_target", "posterior_mean",
           "ddpm_step", "ddim_step", "dpm_solver_step"]


def _coef(s: Schedule, name: str, t, x: torch.Tensor) -> torch.Tensor:
    """Coefficient row `name` at step(s) t, shaped to broadcast against x (B, ...)."""
    row = s.table(x.device)[ROW[name]]  # (S,) float32
    if isinstance(t, int):
        return row[t]
    return row[t].view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)


def _per_sample(t, x, value):
    return value if isinstance(t, int) else value.view(-1, *([1] * (x.ndim - 1)))


def _noise_or_draw(noise, seed, sample_offset, x, t, tag=None):
    if noise is not None:
        return noise.float()
    return rng.normal_like(x, seed, sample_offset, t if tag is None else tag)


# ---------------------------------------------------------------------- forward process
def q_sample(s: Schedule, x0: torch.Tensor, t, noise: torch.Tensor | None = None, *,
             seed: int | None = None, sample_offset: int = 0):
    """Draw x_t ~ q(x_t | x0) (Ho et al. eq. 4).

    x0: (B, ...) float; t: int or LongTensor (B,) of step indices; noise: like x0.
    Returns x_t (float32, shape of x0). With noise=None and seed=<int>, the noise is
    drawn from the counter-based stream (tag TAG_Q_SAMPLE) and (x_t, noise) is returned.
    """
    C.check_schedule(s)
    C.check_float_tensor(x0, "x0", min_ndim=1)
    t = C.check_t(s, t, x0)
    C.check_noise_source(noise, seed, x0, needs_noise=True)
    C.check_sample_offset(sample_offset)
    eps = _noise_or_draw(noise, seed, sample_offset, x0, t, tag=rng.TAG_Q_SAMPLE)
    x_t = _coef(s, "sqrt_abar", t, x0) * x0.float() + _coef(s, "sqrt_one_minus_abar", t, x0) * eps
    return x_t if noise is not None else (x_t, eps)


def training_target(s: Schedule, x0: torch.Tensor, t, noise: torch.Tensor, prediction: str = "eps"):
    """What a model trained with `prediction` should output: eps, x0, or v = sqrt(abar) eps - sqrt(1-abar) x0."""
    C.one_of(prediction, C.PREDICTIONS, "prediction")
    if prediction == "eps":
        return noise.float()
    if prediction == "x0":
        return x0.float()
    return _coef(s, "sqrt_abar", t, x0) * noise.float() - _coef(s, "sqrt_one_minus_abar", t, x0) * x0.float()


# ---------------------------------------------------------------------- model output → x0 / eps
def predict_x0(s: Schedule, x_t: torch.Tensor, t, model_output: torch.Tensor, prediction: str = "eps"):
    """Predicted x0 (float32) from x_t and a model output of kind `prediction` (eps / x0 / v)."""
    x, mo = x_t.float(), model_output.float()
    if prediction == "eps":
        return _coef(s, "sqrt_recip_abar", t, x) * x - _coef(s, "sqrt_recipm1_abar", t, x) * mo
    if prediction == "x0":
        return mo
    if prediction == "v":
        return _coef(s, "sqrt_abar", t, x) * x - _coef(s, "sqrt_one_minus_abar", t, x) * mo
    raise ValueError(f"prediction must be one of {C.PREDICTIONS}; got {prediction!r}")


def predict_eps(s: Schedule, x_t: torch.Tensor, t, model_output: torch.Tensor, prediction: str = "eps"):
    """Predicted eps (float32) from the RAW (unclipped) model output."""
    x, mo = x_t.float(), model_output.float()
    if prediction == "eps":
        return mo
    if prediction == "x0":
        return (x - _coef(s, "sqrt_abar", t, x) * mo) / _coef(s, "sqrt_one_minus_abar", t, x)
    if prediction == "v":
        return _coef(s, "sqrt_abar", t, x) * mo + _coef(s, "sqrt_one_minus_abar", t, x) * x
    raise ValueError(f"prediction must be one of {C.PREDICTIONS}; got {prediction!r}")


def eps_from_x0(s: Schedule, x_t: torch.Tensor, t, x0: torch.Tensor):
    """eps implied by x_t and a (clipped) x0, inverting eq. 4: (sqrt(1/abar) x_t - x0) / sqrt(1/abar - 1)."""
    x = x_t.float()
    return (_coef(s, "sqrt_recip_abar", t, x) * x - x0) / _coef(s, "sqrt_recipm1_abar", t, x)


def posterior_mean(s: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t):
    """Mean of q(x_{t-1} | x_t, x0) (Ho et al. eq. 7), float32."""
    return _coef(s, "coef_x0", t, x_t) * x0 + _coef(s, "coef_xt", t, x_t) * x_t.float()


def posterior_std(s: Schedule, t, x: torch.Tensor, variance: str, v: torch.Tensor | None = None):
    """Standard deviation of the reverse step for `variance` (v: learned_range interpolation, (B, C, ...))."""
    if variance == "fixed_small":
        return _coef(s, "std_small", t, x)
    if variance == "fixed_large":
        return _coef(s, "std_large", t, x)
    frac = (v.float() + 1.0) * 0.5
    log_var = frac * _coef(s, "log_beta", t, x) + (1.0 - frac) * _coef(s, "log_var_small", t, x)
    return torch.exp(0.5 * log_var)


def _split_learned(model_output, x, variance):
    if variance == "learned_range":
        C_ = x.shape[1]
        return model_output[:, :C_], model_output[:, C_:]
    return model_output, None


def _add_noise(t, x, mean, std, noise):
    if isinstance(t, int):
        return mean + std * noise if t > 0 else mean
    return torch.where(_per_sample(t, x, t > 0), mean + std * noise, mean)


# ---------------------------------------------------------------------- reverse steps
def guidance_apply(model_output, cfg, x):
    """A step's model output after classifier-free guidance (fastddpm.guidance.combine), or itself."""
    return model_output if cfg is None else guidance.combine(model_output, cfg, x)


def ddpm_step(s: Schedule, x_t: torch.Tensor, t, model_output: torch.Tensor, noise: torch.Tensor | None = None,
              *, prediction: str = "eps", variance: str = "fixed_small", clip: float | None = 1.0,
              seed: int | None = None, sample_offset: int = 0, return_x0: bool = False, guidance=None):
    """One ancestral DDPM step x_t -> x_{t-1} (Ho et al. Algorithm 2, eq. 7 and 11).

    x_t: (B, C, ...) float; t: step index int or LongTensor (B,);
    model_output: (B, C, ...), or (B, 2C, ...) for variance="learned_range";
    noise: (B, C, ...) standard normal (ignored where t == 0), or None with seed=<int> to
    draw sample b's noise from the stream at (seed, sample_offset + b, tag=t[b]).
    Returns x_{t-1} float32 (and the clipped predicted x0 if return_x0).
    guidance: classifier-free guidance (fastddpm.guidance): None, a scale w, or a
    fastddpm.guidance.CFG; model_output is then the doubled batch (2B, ...), conditional rows
    first, or a pair (out_c, out_u), combined before the step (all steps take it).
    """
    model_output = guidance_apply(model_output, guidance, x_t)
    t, _, clip = C.check_step_args(s, x_t, t, model_output, noise, ddim=False, eta=0.0, prediction=prediction,
                                   variance=variance, clip=clip, seed=seed, sample_offset=sample_offset,
                                   use_clipped_model_output=False)

    eps_or_x0, v = _split_learned(model_output, x_t, variance)
    x0 = predict_x0(s, x_t, t, eps_or_x0, prediction)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    mean = posterior_mean(s, x0, x_t, t)
    if isinstance(t, int) and t == 0:
        out = mean
    else:
        z = _noise_or_draw(noise, seed, sample_offset, x_t, t)
        out = _add_noise(t, x_t, mean, posterior_std(s, t, x_t, variance, v), z)
    return (out, x0) if return_x0 else out


def ddim_step(s: Schedule, x_t: torch.Tensor, t, model_output: torch.Tensor, noise: torch.Tensor | None = None,
              *, eta: float = 0.0, prediction: str = "eps", clip: float | None = 1.0,
              seed: int | None = None, sample_offset: int = 0, return_x0: bool = False,
              use_clipped_model_output: bool = False, guidance=None):
    """One DDIM step x_t -> x_{t-1} (Song et al. 2021 eq. 12), between consecutive steps of `s`.

    eta=0 is deterministic (noise may be None); eta=1 has DDPM's fixed_small variance.
    The direction term uses the raw model eps even when x0 is clipped (diffusers' default);
    use_clipped_model_output=True re-derives it from the clipped x0 (`eps_from_x0`), as
    improved-diffusion, denoising-diffusion-pytorch and diffusers' option of that name do.
    Shapes, noise and guidance as in `ddpm_step`; returns float32 x_{t-1} (and x0 if return_x0).
    """
    model_output = guidance_apply(model_output, guidance, x_t)
    t, eta, clip = C.check_step_args(s, x_t, t, model_output, noise, ddim=True, eta=eta, prediction=prediction,
                                     variance="fixed_small", clip=clip, seed=seed, sample_offset=sample_offset,
                                     use_clipped_model_output=use_clipped_model_output)
    adds_noise = eta > 0 and not (isinstance(t, int) and t == 0)

    x0 = predict_x0(s, x_t, t, model_output, prediction)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    if use_clipped_model_output:
        eps = eps_from_x0(s, x_t, t, x0)
    else:
        eps = predict_eps(s, x_t, t, model_output, prediction)
    rows = s.ddim_rows(x_t.device, eta)
    dir_coef = rows.dir_coef[t] if isinstance(t, int) else _per_sample(t, x_t, rows.dir_coef[t])
    out = _coef(s, "sqrt_abar_prev", t, x_t) * x0 + dir_coef * eps
    if adds_noise:
        sigma = rows.sigma[t] if isinstance(t, int) else _per_sample(t, x_t, rows.sigma[t])
        z = _noise_or_draw(noise, seed, sample_offset, x_t, t)
        out = _add_noise(t, x_t, out, sigma, z)
    return (out, x0) if return_x0 else out


def _row_at(row, t, x):
    return row[t] if isinstance(t, int) else row[t].view(-1, *([1] * (x.ndim - 1)))


def dpm_solver_step(s, x_t: torch.Tensor, t, model_output: torch.Tensor, prev_x0: torch.Tensor | None = None,
                    noise: torch.Tensor | None = None, *, method: str = "dpmsolver++", order: int = 2,
                    solver_type: str = "midpoint", prediction: str = "eps", clip: float | None = None,
                    seed: int | None = None, sample_offset: int = 0, guidance=None):
    """One DPM-Solver++ step from step t to t - 1 (sigma 0 after t = 0); the coefficients and their
    derivation (Lu et al. 2022) are in fastddpm/dpm_solver.py.

    x_t: (B, C, ...) float; t: step index int or LongTensor (B,); model_output: (B, C, ...);
    prev_x0: (B, C, ...) the x0 this function returned at step t + 1 (needed by second-order
    steps: order=2 except the first and last steps; ignored elsewhere, may be None there);
    noise: (B, C, ...) standard normal for method="sde-dpmsolver++" (ignored where t == 0,
    whose noise coefficient is 0), or None with seed=<int>: drawn from the stream at
    (seed, sample_offset + b, tag=t[b]). clip=c clamps x0 to [-c, c] (diffusers has none here).
    Returns (x_{t-1}, x0): the new state and this step's x0, both float32, the x0 to pass as
    prev_x0 to the next step. guidance: as in `ddpm_step`.
    """
    model_output = guidance_apply(model_output, guidance, x_t)
    t, clip = dpm_solver.check_dpm_step_args(s, x_t, t, model_output, prev_x0, noise, method, order, solver_type,
                                             prediction, clip, seed, sample_offset)
    at_zero = isinstance(t, int) and t == 0

    x0 = predict_x0(s, x_t, t, model_output, prediction)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    rows = s.dpm_rows(x_t.device, method, order, solver_type)  # (4, S) float32
    row = dpm_solver.DPM_ROW
    a, b = _row_at(rows[row["x_coef"]], t, x_t), _row_at(rows[row["x0_coef"]], t, x_t)
    out = a * x_t.float() + b * x0
    if prev_x0 is not None and order == 2:
        d = _row_at(rows[row["d_coef"]], t, x_t)
        out = out + torch.where(d != 0, d * (x0 - prev_x0.float()), torch.zeros_like(out))
    if method == "sde-dpmsolver++" and not at_zero:
        z = noise.float() if noise is not None else rng.normal_like(x_t, seed, sample_offset, t)
        std = _row_at(rows[row["noise_std"]], t, x_t)
        out = out + torch.where(std != 0, std * z, torch.zeros_like(out))
    return out, x0

"""Models with a known exact answer, for statistical and loop-level tests.

`GaussianDataModel`: data x0 ~ N(mu, diag(sd^2)) element-wise. Then x_t ~ N(sqrt(abar) mu,
abar sd^2 + 1 - abar) and the exact (Bayes-optimal) predictions are

    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar sd^2 + 1 - abar)
    E[x0  | x_t] = mu + sqrt(abar) sd^2 (x_t - sqrt(abar) mu) / (abar sd^2 + 1 - abar)
    v            = sqrt(abar) eps - sqrt(1 - abar) x0

A DDPM or DDIM loop on this model must produce samples with mean mu and std sd, and a
deterministic loop is well conditioned (unlike a random U-Net; DESIGN.md, Numerics).
"""
from __future__ import annotations

import torch
from torch import nn

from .schedule import Schedule


class GaussianDataModel(nn.Module):
    """model(x (B, *shape), t (B,) training timesteps) -> exact eps / x0 / v for data N(mu, sd^2):
    t a LongTensor, or a float tensor of continuous timesteps (the sigma methods), whose noise level
    is interpolated in log sigma as fastddpm.sigmas.sigma_to_t inverts it."""

    def __init__(self, schedule: Schedule, mu: torch.Tensor, sd: torch.Tensor, prediction: str = "eps"):
        super().__init__()
        if schedule.num_steps != schedule.num_train_timesteps:
            raise ValueError("pass the training schedule (not a respaced one): the model sees training timesteps")
        self.register_buffer("abar", schedule.alphas_cumprod.clone())  # float64 (T,)
        self.register_buffer("mu", mu.double())
        self.register_buffer("sd", sd.double())
        self.prediction = prediction
        self.config = type("Cfg", (), dict(in_channels=mu.shape[0], image_size=tuple(mu.shape[1:])))

    def forward(self, x, t):
        if t.is_floating_point():  # a continuous timestep (the sigma methods): its sigma, interpolated in log sigma
            log_var = ((1 - self.abar) / self.abar).log()  # log sigma^2: linear in log sigma as well
            t = t.double().clamp(0, len(log_var) - 1)
            lo = t.floor().long()
            hi = (lo + 1).clamp(max=len(log_var) - 1)
            sig2 = ((1 - t.frac()) * log_var[lo] + t.frac() * log_var[hi]).exp()
            abar = (1 / (1 + sig2)).view(-1, *([1] * (x.ndim - 1)))
        else:
            abar = self.abar[t].view(-1, *([1] * (x.ndim - 1)))
        a, sa, s1 = abar, abar.sqrt(), (1 - abar).sqrt()
        resid = (x.double() - sa * self.mu) / (a * self.sd**2 + 1 - a)
        eps = s1 * resid
        x0 = self.mu + sa * self.sd**2 * resid
        out = {"eps": eps, "x0": x0, "v": sa * eps - s1 * x0}[self.prediction]
        return out.to(x.dtype)


class SelfConditionedModel(nn.Module):
    """A self-conditioned model as denoising-diffusion-pytorch's Unet(self_condition=True) is
    called: model(x, t, x_self_cond) = base(x, t) + scale * tanh(x_self_cond), for tests of
    the samplers' self-conditioning plumbing (x_self_cond visibly changes the output)."""

    self_condition = True

    def __init__(self, base: nn.Module, scale: float = 0.3):
        super().__init__()
        self.base = base
        self.scale = scale
        self.config = getattr(base, "config", None)

    def forward(self, x, t, x_self_cond):
        return self.base(x, t) + self.scale * torch.tanh(x_self_cond)

"""The papers' formulas written out in float64, independent of fastddpm's code paths."""
import torch


def f64(s, name, t):
    """Per-sample float64 quantity shaped (B, 1, 1, 1)."""
    abar = s.alphas_cumprod[t]
    abar_prev = s.alphas_cumprod_prev[t]
    beta = 1 - abar / abar_prev
    q = dict(abar=abar, abar_prev=abar_prev, beta=beta, alpha=1 - beta)[name]
    return q.view(-1, 1, 1, 1)


def ho_step64(s, x, t, mo, z, prediction, variance, clip):
    """Ho et al. 2020 in float64: eq. 11 for unclipped eps, otherwise eq. 7 from predicted x0."""
    x, mo, z = x.double(), mo.double(), z.double()
    abar, abar_prev, beta, alpha = (f64(s, k, t) for k in ("abar", "abar_prev", "beta", "alpha"))
    if variance == "learned_range":
        mo, v = mo[:, : x.shape[1]], mo[:, x.shape[1]:]
    if prediction == "eps" and clip is None:
        mean = (x - beta / (1 - abar).sqrt() * mo) / alpha.sqrt()  # eq. 11
    else:
        if prediction == "eps":
            x0 = (x - (1 - abar).sqrt() * mo) / abar.sqrt()
        elif prediction == "x0":
            x0 = mo
        else:
            x0 = abar.sqrt() * x - (1 - abar).sqrt() * mo
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        mean = (abar_prev.sqrt() * beta * x0 + alpha.sqrt() * (1 - abar_prev) * x) / (1 - abar)  # eq. 7
    post_var = beta * (1 - abar_prev) / (1 - abar)
    if variance == "fixed_small":
        var = post_var
    elif variance == "fixed_large":
        var = beta
    else:
        frac = (v + 1) / 2
        var = torch.exp(frac * beta.log() + (1 - frac) * post_var.clamp(min=1e-20).log())
    nonzero = (torch.as_tensor(t) > 0).double().view(-1, 1, 1, 1)
    return mean + nonzero * var.sqrt() * z


def song_step64(s, x, t, mo, z, eta, prediction, clip, use_clipped=False):
    """Song et al. 2021 eq. 12 in float64 (eps from the raw model output, or with use_clipped
    re-derived from the clipped x0 by inverting eq. 4)."""
    x, mo, z = x.double(), mo.double(), z.double()
    abar, abar_prev = f64(s, "abar", t), f64(s, "abar_prev", t)
    if prediction == "eps":
        eps = mo
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    elif prediction == "x0":
        x0 = mo
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    else:
        x0 = abar.sqrt() * x - (1 - abar).sqrt() * mo
        eps = abar.sqrt() * mo + (1 - abar).sqrt() * x
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    if use_clipped:
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    return abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).sqrt() * eps + sigma * z

"""Classifier-free guidance (Ho & Salimans 2022): the combine, and how a sampling call conditions
the model.

The combine, on the model output (exact for eps, x0 and v prediction: all are affine in it):

    out = out_u + w (out_c - out_u)                          diffusers' pipelines, DiTPipeline

with two options:
- parallel = k < 1 (denoising-diffusion-pytorch's remove_parallel_component with
  keep_parallel_frac = k; Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of
  High Guidance Scales"): the part of the guidance direction d = out_c - out_u parallel to
  out_c (per sample, over all non-batch dimensions, in float64) is scaled by k:
  out = out_c + (w - 1) (d - (1 - k) (d . out_c / |out_c|^2) out_c);
- rescale = phi > 0 (Lin et al. 2024, section 3.4; diffusers' rescale_noise_cfg):
  out = phi out std(out_c) / std(out) + (1 - phi) out, std per sample over all non-batch
  dimensions.
A model with learned variance (2C channels for a C-channel state) is guided on its first C
channels; the others come from the conditional output (DiT's guided forward).

Both options make the result a per-sample linear combination out = g_c out_c + g_u out_u
(`coefficients`): the fused step kernels read both halves of the model output and apply
(g_c, g_u) in the same single launch; the options' per-sample reduction is one small kernel
(kernels/guidance.py) that writes (g_c, g_u).

The sampler's side (`resolve` -> `Conditioning`): class labels under the model's own keyword,
`cond` / `uncond` keyword dicts, the null class, the scale, the interval of noise levels where
guidance runs, and the model calls of each step: the doubled batch (conditional rows first)
where guidance runs, a single call elsewhere.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


__all__ = ["CFG", "combine", "coefficients", "resolve", "Conditioning", "class_keyword", "ClassConditioning"]


@dataclass(frozen=True)
class CFG:
    """The guidance of one step: scale w (a number, or a 1-element float tensor holding it: device
    data for captured loops), rescale phi in [0, 1], parallel k in [0, 1] (1: the whole guidance
    direction, as diffusers; 0: its part parallel to the conditional output removed, as
    denoising-diffusion-pytorch's default)."""
    scale: object = 1.0
    rescale: float = 0.0
    parallel: float = 1.0

    @property
    def needs_reduction(self) -> bool:
        return self.rescale != 0 or self.parallel != 1


def check_cfg(guidance, name="guidance") -> CFG | None:
    """None, a number w, a 1-element float tensor, or a CFG -> a validated CFG (or None)."""
    if guidance is None:
        return None
    g = guidance if isinstance(guidance, CFG) else CFG(scale=guidance)
    check_scale(g.scale, f"{name}.scale" if isinstance(guidance, CFG) else name)
    check_unit(g.rescale, "guidance_rescale", "0: no rescale; diffusers' guidance_rescale, Lin et al. 2024")
    check_unit(g.parallel, "guidance_parallel", "the fraction of the guidance direction's part parallel to the "
               "conditional output that is kept: 1 keeps it all (diffusers), 0 keeps none of it "
               "(denoising-diffusion-pytorch's default projection)")
    return g


def check_scale(w, name="guidance_scale"):
    if isinstance(w, torch.Tensor):
        if w.numel() != 1 or not w.is_floating_point():
            raise ValueError(f"{name} as a tensor must hold one float (device data for captured loops); got "
                             f"shape {tuple(w.shape)} {w.dtype}")
        return w
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
        raise ValueError(f"{name} must be a finite number w (out = out_u + w (out_c - out_u); 1: no guidance, "
                         f"0: unconditional); got {w!r}")
    return float(w)


def check_unit(v, name, what):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= float(v) <= 1:
        raise ValueError(f"{name} must be a number in [0, 1] ({what}); got {v!r}")
    return float(v)


# ------------------------------------------------------------------------------ the combine
def split_output(model_output, x, name="model_output"):
    """(out_c, out_u) of a guided step's model output: the doubled batch (2B, ...) with the
    conditional rows first, or a pair of tensors (B, ...)."""
    if isinstance(model_output, (tuple, list)):
        if len(model_output) != 2 or not all(isinstance(m, torch.Tensor) for m in model_output):
            raise TypeError(f"{name} with guidance must be the doubled batch (2B, ...) or a pair (out_c, out_u) of "
                            f"tensors; got a {type(model_output).__name__} of {len(model_output)}")
        mo_c, mo_u = model_output
        if mo_c.shape != mo_u.shape:
            raise ValueError(f"{name}: the conditional and unconditional outputs differ in shape: "
                             f"{tuple(mo_c.shape)} and {tuple(mo_u.shape)}")
        return mo_c, mo_u
    if not isinstance(model_output, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(model_output).__name__}")
    B = x.shape[0]
    if model_output.ndim < 1 or model_output.shape[0] != 2 * B:
        raise ValueError(f"{name} with guidance must be the doubled batch: {2 * B} rows (conditional rows first) for "
                         f"x of batch {B}; got shape {tuple(model_output.shape)}")
    return model_output[:B], model_output[B:]


def _std(v):
    return v.std(dim=tuple(range(1, v.ndim)), keepdim=True)


def combine(model_output, guidance, x) -> torch.Tensor:
    """The reference combine (module docstring) of a guided step's model output (doubled batch or
    pair) -> the guided output (B, ...) float32, as the peers compute it (in float32: for a
    half-precision model the peers combine in its dtype; fastddpm's step math is float32)."""
    g = check_cfg(guidance)
    mo_c, mo_u = split_output(model_output, x)
    C_ = x.shape[1] if x.ndim > 1 else None
    extra = C_ is not None and mo_c.ndim > 1 and mo_c.shape[1] == 2 * C_  # learned variance channels
    c, u = (mo_c[:, :C_], mo_u[:, :C_]) if extra else (mo_c, mo_u)
    c, u = c.float(), u.float()  # step math in float32 whatever the model's dtype (DESIGN.md, "Numerics")
    w = g.scale.to(c.device, c.dtype).reshape(()) if isinstance(g.scale, torch.Tensor) else g.scale
    if g.parallel != 1:  # denoising-diffusion-pytorch's forward_with_cond_scale (project() in float64)
        d = (c - u).flatten(1).double()
        unit = F.normalize(c.flatten(1).double(), dim=-1)
        par = (d * unit).sum(dim=-1, keepdim=True) * unit
        d = ((d - par) + par * g.parallel).to(c.dtype).view_as(c)
        out = c + d * (w - 1)
    else:  # diffusers: noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        out = u + w * (c - u)
    if g.rescale != 0:  # diffusers' rescale_noise_cfg
        out = g.rescale * (out * (_std(c) / _std(out))) + (1 - g.rescale) * out
    return torch.cat([out, mo_c[:, C_:].float()], dim=1) if extra else out


def coefficients(model_output, guidance, x, moments=None) -> torch.Tensor:
    """(B, 2) float32: the per-sample (g_c, g_u) with combine(...) == g_c out_c + g_u out_u (on the
    guided channels), from the per-sample moments (sum c, sum u, sum c^2, sum u^2, sum c u) over
    the guided channels, in float64. `moments` (B, 5) float64 when already computed (the kernel)."""
    g = check_cfg(guidance)
    mo_c, mo_u = split_output(model_output, x)
    C_ = x.shape[1]
    if moments is None:
        c = mo_c[:, :C_].flatten(1).double()
        u = mo_u[:, :C_].flatten(1).double()
        moments = torch.stack([c.sum(1), u.sum(1), (c * c).sum(1), (u * u).sum(1), (c * u).sum(1)], dim=1)
    return coefficients_from_moments(moments, g, mo_c[:, :C_][0].numel())


def coefficients_from_moments(m, g: CFG, N: int) -> torch.Tensor:
    """(B, 2) float32 (g_c, g_u) from moments (B, 5) float64 (see coefficients)."""
    w = g.scale.to(m.device, torch.float64).reshape(()) if isinstance(g.scale, torch.Tensor) else g.scale
    sc, su, scc, suu, scu = m.unbind(1)
    a = w * torch.ones_like(sc)
    b = (1 - w) * torch.ones_like(sc)
    if g.parallel != 1:  # d' = d - (1 - k) (d.c / c.c) c, out = c + (w - 1) d'
        alpha = (scc - scu) / torch.clamp(scc, min=1e-24)  # F.normalize's eps: |c| >= 1e-12
        a = a - (w - 1) * (1 - g.parallel) * alpha
    if g.rescale != 0:  # std(c) / std(a c + b u), the (N - 1) cancelling
        var_c = scc - sc * sc / N
        so = a * sc + b * su
        var_o = a * a * scc + 2 * a * b * scu + b * b * suu - so * so / N
        f = g.rescale * torch.sqrt(var_c / var_o) + (1 - g.rescale)
        a, b = a * f, b * f
    return torch.stack([a, b], dim=1).float()


# ------------------------------------------------------------------------- the sampler's side
_KEYWORDS = ("y", "class_labels", "classes")  # guided-diffusion / fastddpm, diffusers, denoising-diffusion-pytorch


def _is_ddp_cfg_unet(model) -> bool:
    return type(model).__name__ == "Unet" and type(model).__module__.endswith("classifier_free_guidance")


def _signature(model):
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _accepts(sig, name) -> bool:
    if sig is None:
        return True  # cannot tell: the model's own error will say
    ps = sig.parameters
    return name in ps or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps.values())


class ClassConditioning(NamedTuple):
    """How a model takes class labels: its keyword, how many classes (labels 0 .. classes - 1; None:
    unknown), how many label values it embeds (the null class included; None: unknown), its own
    null class (None: none), and extra keywords of its conditional / unconditional calls."""
    keyword: str | None = None
    classes: int | None = None
    embeds: int | None = None
    null: int | None = None
    cond_extra: dict = {}
    uncond_extra: dict = {}


def _int_attr(obj, name):
    v = getattr(obj, name, None)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def class_keyword(model) -> ClassConditioning:
    """How `model` takes class labels (ClassConditioning); keyword None: it takes none."""
    from .unet import UNet

    if isinstance(model, UNet):
        K = model.config.num_classes
        # fastddpm's UNet(num_classes=K): labels 0..K-1, the null class K
        return ClassConditioning("y", K, K + 1, K) if K else ClassConditioning()
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "num_class_embeds") and type(model).__name__ == "UNet2DModel":
        K = cfg.num_class_embeds  # which of them is the null class is the user's (null_class=)
        return ClassConditioning("class_labels", K, K) if K else ClassConditioning()
    if _is_ddp_cfg_unet(model):  # its null is a learned embedding chosen by cond_drop_prob=1
        K = model.classes_emb.num_embeddings
        return ClassConditioning("classes", K, K, None, {"cond_drop_prob": 0.0}, {"cond_drop_prob": 1.0})
    sig = _signature(model)
    if sig is not None:
        for name in _KEYWORDS:
            if name in sig.parameters:  # guided-diffusion style: `num_classes` and `null_class` attributes
                K, null = _int_attr(model, "num_classes"), _int_attr(model, "null_class")
                embeds = None if K is None else max(K, null + 1 if null is not None else K)
                return ClassConditioning(name, K, embeds, null)
    return ClassConditioning()


def _labels(v, n, name, classes):
    if isinstance(v, torch.Tensor):
        t = v
    elif isinstance(v, numbers.Integral) and not isinstance(v, bool):
        t = torch.full((n,), int(v), dtype=torch.long)
    else:
        try:
            t = torch.as_tensor(v)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be an int, a sequence of ints or a LongTensor of n = {n} labels; got "
                            f"{type(v).__name__}") from None
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integer class labels; got dtype {t.dtype}")
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must hold one label per image: shape ({n},); got shape {tuple(t.shape)}")
    t = t.long()
    lo = int(t.min()) if t.numel() else 0
    if lo < 0 or (classes is not None and t.numel() and int(t.max()) >= classes):
        allowed = f"in [0, {classes - 1}] for this model" if classes is not None else ">= 0"
        raise ValueError(f"{name} must be {allowed}; got values in [{lo}, {int(t.max())}]")
    return t


def _interval(iv):
    if iv is None:
        return None
    try:
        lo, hi = (float(v) for v in iv)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be a pair (lo, hi) of noise levels sigma = sqrt((1 - abar) / abar): "
                         f"guidance where lo < sigma <= hi; got {iv!r}") from None
    if not (0 <= lo < hi) or math.isnan(hi):
        raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo < hi (hi may be inf); got {iv!r}")
    return lo, hi


def _is_per_sample(v, n) -> bool:
    return isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n


def resolve(model, n, *, class_labels=None, cond=None, uncond=None, null_class=None, guidance_scale=1.0,
            guidance_interval=None, guidance_rescale=0.0, guidance_parallel=1.0, self_condition=False):
    """The conditioning of a sample() call, validated before any model call: a Conditioning, or
    None for an unconditional call (no labels, no cond, no guidance)."""
    w = check_scale(guidance_scale)
    if isinstance(w, torch.Tensor):
        raise TypeError("guidance_scale must be a number in sample() (the captured loops keep it as device data "
                        "themselves); got a tensor")
    rescale = check_unit(guidance_rescale, "guidance_rescale", "0: no rescale; diffusers' guidance_rescale")
    parallel = check_unit(guidance_parallel, "guidance_parallel", "1 keeps the whole guidance direction")
    interval = _interval(guidance_interval)
    for name, d in (("cond", cond), ("uncond", uncond)):
        if d is not None and (not isinstance(d, dict) or not all(isinstance(k, str) for k in d)):
            raise TypeError(f"{name} must be a dict of keyword arguments for the model call; got "
                            f"{type(d).__name__}")
    guided = w != 1
    if class_labels is None and not cond and not uncond and null_class is None:
        if guided or rescale or parallel != 1 or interval is not None:
            raise ValueError(f"guidance_scale={guidance_scale!r} (or another guidance option) needs a conditional "
                             "call: pass class_labels= (a class-conditional model) or cond= / uncond=")
        return None
    keyword, classes, embeds, null_default, cond_extra, uncond_extra = class_keyword(model)
    cond = {**cond_extra, **(cond or {})}
    if class_labels is not None:
        if keyword is None:
            raise ValueError(f"class_labels were given but this {type(model).__name__} is not class-conditional (no "
                             f"num_classes / num_class_embeds, no keyword among {_KEYWORDS}); pass cond= with the "
                             "model's own keyword")
        if keyword in cond:
            raise ValueError(f"class_labels and cond={{{keyword!r}: ...}} both set the model's {keyword!r}; pass one")
        cond[keyword] = _labels(class_labels, n, "class_labels", classes)
    uncond_given = uncond is not None
    uncond = {**uncond_extra, **(uncond or {})}
    if null_class is not None:
        if keyword is None:
            raise ValueError(f"null_class={null_class!r} was given but this {type(model).__name__} takes no class "
                             "labels; pass uncond= with the model's own keyword")
        if isinstance(null_class, bool) or not isinstance(null_class, numbers.Integral) or \
                int(null_class) < 0 or (embeds is not None and int(null_class) >= embeds):
            allowed = f"an int in [0, {embeds - 1}]" if embeds is not None else "an int >= 0"
            raise ValueError(f"null_class must be {allowed} (the label of the unconditional call); got "
                             f"{null_class!r}")
        uncond[keyword] = int(null_class)
    elif keyword is not None and keyword not in uncond and null_default is not None:
        uncond[keyword] = null_default
    needs_uncond = w != 1
    if needs_uncond and not uncond_given and null_class is None and null_default is None and not uncond_extra:
        raise ValueError(f"guidance_scale={guidance_scale!r} needs the model's unconditional call, and this "
                         f"{type(model).__name__} has no null class of its own: pass null_class= (e.g. the "
                         "label it was trained to drop to) or uncond={...}")
    sig = _signature(model)
    for name in sorted(set(cond) | set(uncond)):
        if not _accepts(sig, name):
            raise ValueError(f"the model's signature {sig} does not take the keyword {name!r} (from class_labels / "
                             "cond / uncond)")
    if self_condition and (cond or uncond):
        raise ValueError("self_condition=True cannot be combined with conditioning or guidance (the model's third "
                         "positional argument and keyword conditions together are not supported)")
    for name, d in (("cond", cond), ("uncond", uncond)):
        for k, v in d.items():
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] not in (n,) and v.shape[0] != 1:
                raise ValueError(f"{name}[{k!r}] has first dimension {v.shape[0]}: a per-sample value needs n = {n} "
                                 "rows (sample i gets row i); other values must broadcast (first dimension 1)")
    return Conditioning(n, cond, uncond, w, interval, CFG(w, rescale, parallel))


class Conditioning:
    """What a sample() call passes to the model: `cond` for every call, `uncond` overriding it for
    the unconditional one; per-sample tensors (first dimension n) are sliced per batch by the
    sample's index in the call. `mode(sigma)` says what a step at noise level sigma runs:
    "cond" (one call), "uncond" (one call, w = 0) or "guided" (the doubled batch)."""

    def __init__(self, n, cond, uncond, scale, interval, cfg: CFG):
        self.n, self.cond, self.uncond_over = n, cond, uncond
        self.uncond = {**cond, **uncond}
        self.scale, self.interval, self.cfg = scale, interval, cfg
        # one doubled call when every value either is per sample or the same in both calls
        self.doubled = all(self._mergeable(k) for k in set(self.cond) | set(self.uncond))

    def _mergeable(self, k):
        a, b = self.cond.get(k, _MISSING), self.uncond.get(k, _MISSING)
        if a is _MISSING or b is _MISSING:
            return False
        per_a, per_b = _is_per_sample(a, self.n), _is_per_sample(b, self.n)
        if per_a or per_b:
            other = b if per_a else a
            return _is_per_sample(other, self.n) or isinstance(other, numbers.Number)
        if a is b:
            return True
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return False
        try:
            return bool(a == b)
        except Exception:  # noqa: BLE001 - values that do not compare are not merged
            return False

    def mode(self, sigma: float) -> str:
        if self.scale == 1:
            return "cond"
        if self.interval is not None and not (self.interval[0] < sigma <= self.interval[1]):
            return "cond"
        # w = 0 is the unconditional output alone only without rescale / parallel removal: both
        # read the conditional output (w = 0 with parallel k: out_u + (1 - k) * the part of
        # out_c - out_u parallel to out_c, as denoising-diffusion-pytorch computes it)
        return "uncond" if self.scale == 0 and not self.cfg.needs_reduction else "guided"

    def modes(self, sigmas) -> list:
        return [self.mode(float(s)) for s in sigmas]

    def batch(self, start, B, device):
        """The keyword arguments of the batch of samples start .. start + B - 1 (indices in the call):
        {"cond": ..., "uncond": ..., "doubled": ... or None}."""
        def take(v, like=None):
            if _is_per_sample(v, self.n):
                return v[start:start + B].to(device)
            if like is not None and isinstance(v, numbers.Number):
                return torch.full_like(like, v)
            return v

        cond = {k: take(v) for k, v in self.cond.items()}
        # a number replacing a per-sample tensor (the null class for the labels) becomes a tensor like it
        uncond = {k: take(v, cond[k] if _is_per_sample(self.cond.get(k), self.n) else None)
                  for k, v in self.uncond.items()}
        doubled = None
        if self.doubled:
            doubled = {}
            for k in cond:
                a, b = cond[k], uncond[k]
                if _is_per_sample(self.cond[k], self.n) or _is_per_sample(self.uncond[k], self.n):
                    a = a if isinstance(a, torch.Tensor) else torch.full_like(b, a)
                    b = b if isinstance(b, torch.Tensor) else torch.full_like(a, b)
                    doubled[k] = torch.cat([a, b])
                else:
                    doubled[k] = a
        return {"cond": cond, "uncond": uncond, "doubled": doubled}


_MISSING = object()


def call(forward, x, t, mode, kw, *cond, x2=None):
    """The model call(s) of one step: "cond" / "uncond" -> the output (B, ...); "guided" -> the
    doubled batch's output (2B, ...), conditional rows first (one call on cat([x, x]) where the
    conditions merge, else the two calls' outputs as a pair). x2: the doubled input, when the
    caller keeps one (the captured loops' step kernels write both halves)."""
    if mode == "cond":
        return forward(x, t, *cond, **kw["cond"])
    if mode == "uncond":
        return forward(x, t, *cond, **kw["uncond"])
    if kw["doubled"] is not None:
        return forward(torch.cat([x, x]) if x2 is None else x2, torch.cat([t, t]), **kw["doubled"])
    return forward(x, t, **kw["cond"]), forward(x, t, **kw["uncond"])


def noise_level(abar) -> float:
    """sigma = sqrt((1 - abar) / abar), the noise level the interval is given in."""
    abar = float(abar)
    return math.sqrt((1 - abar) / abar) if abar > 0 else math.inf

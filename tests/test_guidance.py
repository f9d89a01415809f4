"""Classifier-free guidance (fastddpm.guidance): the combine, the fused ops that apply it inside the
step kernels, the loops (reference, fused, graph emulated on the CPU) and the argument checks.
Parity with the peers' own loops is tests/test_guidance_parity.py."""
import math

import pytest
import torch
from torch import nn

import fastddpm
from fastddpm import diffusion, graphs, karras, ops
from fastddpm import guidance as G

CFGS = [4.0, G.CFG(4.0, 0.7), G.CFG(3.0, 0.0, 0.0), G.CFG(2.5, 0.5, 0.3)]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


class LabelModel(nn.Module):
    """A small conditional model: model(x, t, y) with K classes and the null class K."""

    def __init__(self, K=4, C=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.emb = nn.Embedding(K + 1, C)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.calls = []
        self.num_classes, self.null_class = K, K  # read by fastddpm.guidance.class_keyword

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        scale = 1 + 0.001 * t.float().view(-1, 1, 1, 1)
        return torch.tanh(self.conv(x)) * scale + self.emb(y)[:, :, None, None]


# ------------------------------------------------------------------------------- the combine
@pytest.mark.parametrize("cfg", CFGS, ids=str)
def test_coefficients_reproduce_the_combine(cfg):
    torch.manual_seed(1)
    x = torch.randn(3, 2, 5, 7)
    mo = torch.randn(6, 2, 5, 7) + 0.3
    g = G.coefficients(mo, cfg, x)
    lin = g[:, 0, None, None, None] * mo[:3] + g[:, 1, None, None, None] * mo[3:]
    assert _rel(lin, G.combine(mo, cfg, x)) < 1e-6
    if isinstance(cfg, G.CFG) and cfg.needs_reduction:
        assert _rel(G.combine(mo, G.CFG(cfg.scale), x), G.combine(mo, cfg, x)) > 1e-3  # the option does something


def test_combine_formulas():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 4)
    c, u = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mo = torch.cat([c, u])
    torch.testing.assert_close(G.combine(mo, 1.0, x), c)
    torch.testing.assert_close(G.combine(mo, 0.0, x), u)
    torch.testing.assert_close(G.combine((c, u), 3.0, x), u + 3 * (c - u))
    # rescale 1: the guided output takes the conditional output's per-sample std
    out = G.combine(mo, G.CFG(5.0, 1.0), x)
    torch.testing.assert_close(out.flatten(1).std(1), c.flatten(1).std(1), rtol=1e-5, atol=1e-6)
    # parallel 0: the guidance direction is orthogonal to the conditional output
    out = G.combine(mo, G.CFG(5.0, 0.0, 0.0), x)
    d = (out - c).flatten(1).double()
    assert float((d * c.flatten(1).double()).sum(1).abs().max()) < 1e-4
    # learned variance: the extra channels come from the conditional half
    mo2 = torch.randn(4, 6, 4, 4)
    out = G.combine(mo2, 2.0, x)
    torch.testing.assert_close(out[:, 3:], mo2[:2, 3:])
    torch.testing.assert_close(out[:, :3], mo2[2:, :3] + 2 * (mo2[:2, :3] - mo2[2:, :3]))


# --------------------------------------------------------------------------------- fused ops
def _sched():
    return fastddpm.Schedule.linear(1000).respace(20)


@pytest.mark.parametrize("cfg", CFGS, ids=str)
@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_fused_ddpm_step_with_guidance(cfg, layout, variance):
    torch.manual_seed(3)
    s = _sched()
    B, C, H, W = 3, 3, 5, 7
    x = torch.randn(B, C, H, W)
    mo = torch.randn(2 * B, 2 * C if variance == "learned_range" else C, H, W)
    if layout == "cl":
        x, mo = x.contiguous(memory_format=torch.channels_last), mo.contiguous(memory_format=torch.channels_last)
    z = torch.randn(B, C, H, W)
    ref = diffusion.ddpm_step(s, x, 7, mo, z, variance=variance, guidance=cfg)
    out = torch.full_like(x, float("nan"))
    got = ops.ddpm_step(s, x, 7, mo, z, variance=variance, guidance=cfg, out=out)
    assert got is out
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    unguided = diffusion.ddpm_step(s, x, 7, mo[:B], z, variance=variance)
    assert _rel(got, unguided) > 1e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_fused_ddim_and_dpm_steps_with_guidance(dtype, tol):
    torch.manual_seed(4)
    s = _sched()
    x = torch.randn(2, 3, 6, 5)
    mo = torch.randn(4, 3, 6, 5).to(dtype)
    prev = torch.randn_like(x)
    for cfg in (3.0, G.CFG(3.0, 0.7, 0.0)):
        ref = diffusion.ddim_step(s, x, 9, mo, None, guidance=cfg)
        torch.testing.assert_close(ops.ddim_step(s, x, 9, mo, None, guidance=cfg), ref, rtol=tol, atol=tol)
        ref_x, ref_x0 = diffusion.dpm_solver_step(s, x, 9, mo, prev, guidance=cfg)
        got_x, got_x0 = ops.dpm_solver_step(s, x, 9, (mo[:2], mo[2:]), prev, guidance=cfg)  # the pair form
        torch.testing.assert_close(got_x, ref_x, rtol=tol, atol=tol)
        torch.testing.assert_close(got_x0, ref_x0, rtol=tol, atol=tol)


def test_fused_sigma_step_with_guidance_and_device_scale():
    torch.manual_seed(5)
    s = fastddpm.Schedule.linear(1000)
    plan = karras.build_plan("dpmpp_2m", fastddpm.sigmas.get_sigmas("karras", 6, s), s, "eps",
                             fastddpm.methods.resolve("dpmpp_2m"))
    x = torch.randn(3, 2, 4, 6)
    mo = torch.randn(6, 2, 4, 6)
    hist = (torch.randn_like(x),)
    w = torch.tensor([2.5])  # device data: what the captured loops pass
    for cfg in (w, G.CFG(w, 0.5, 0.5)):
        rx, rh = karras.sigma_step(plan, x, 2, mo, hist, guidance=cfg)
        fx, fh = ops.sigma_step(plan, x, 2, mo, hist, guidance=cfg)
        torch.testing.assert_close(fx, rx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fh[0], rh[0], rtol=1e-5, atol=1e-5)


def test_ops_refuse_bad_guided_outputs():
    s = _sched()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="doubled batch: 4 rows"):
        ops.ddim_step(s, x, 3, torch.randn(2, 3, 4, 4), guidance=2.0)
    with pytest.raises(ValueError, match="guidance_rescale must be a number in \\[0, 1\\]"):
        ops.ddim_step(s, x, 3, torch.randn(4, 3, 4, 4), guidance=G.CFG(2.0, 1.5))
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        ops.ddim_step(s, x, 3, torch.randn(4, 3, 4, 4), guidance=float("nan"))


# ------------------------------------------------------------------------------------ loops
def _sample(model, backend, **kw):
    kw = {"n": 5, "shape": (2, 6, 6), "steps": 6, "seed": 3, "class_labels": [0, 1, 2, 3, 1], **kw}
    return fastddpm.sample(model, kw.pop("n"), backend=backend, **kw)


@pytest.fixture
def emulate(monkeypatch):
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    yield
    graphs.clear_cache()


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmsolver++", "dpmpp_2m", "heun"])
def test_loops_agree_with_guidance(method, emulate):
    model = LabelModel()
    opts = dict(method=method, guidance_scale=3.0, guidance_rescale=0.5, guidance_interval=(0.3, 20.0))
    ref = _sample(model, "reference", **opts)
    for backend in ("fused", "graph"):
        assert _rel(_sample(model, backend, **opts), ref) < 1e-5, backend
    assert _rel(_sample(model, "reference", method=method), ref) > 1e-3  # guidance changed the images


def test_one_capture_serves_every_label_set_and_scale(emulate):
    model = LabelModel()
    kw = dict(method="ddim", guidance_interval=(0.5, 10.0))
    a = _sample(model, "graph", guidance_scale=4.0, **kw)
    assert graphs.cached_entries(model) == 1
    b = _sample(model, "graph", guidance_scale=2.0, class_labels=[3, 3, 0, 1, 2], **kw)
    assert graphs.cached_entries(model) == 1
    assert _rel(a, _sample(model, "reference", guidance_scale=4.0, **kw)) < 1e-5
    assert _rel(b, _sample(model, "reference", guidance_scale=2.0, class_labels=[3, 3, 0, 1, 2], **kw)) < 1e-5
    loop = next(iter(graphs._group(model, create=False).loops.values()))
    assert {m for m, _ in loop.runs} == {"cond", "guided"}  # single-call captures outside the interval


def test_model_calls_per_step():
    model = LabelModel()
    s = fastddpm.Schedule.linear(1000).respace(6)
    sig = [G.noise_level(a) for a in s.alphas_cumprod.tolist()]
    for w, rows in ((1.0, 5), (0.0, 5), (4.0, 10)):
        model.calls.clear()
        _sample(model, "reference", guidance_scale=w, schedule=s, steps=None)
        assert [r for r, _ in model.calls] == [rows] * 6
        nulls = sum(int((y == 4).sum()) for _, y in model.calls)
        assert nulls == {1.0: 0, 0.0: 30, 4.0: 30}[w]
    lo, hi = sig[1], sig[4]  # steps 2, 3, 4 in (lo, hi]
    model.calls.clear()
    _sample(model, "reference", guidance_scale=4.0, schedule=s, steps=None, guidance_interval=(lo, hi))
    assert [r for r, _ in model.calls] == [5, 10, 10, 10, 5, 5]  # steps run 5 .. 0


def test_images_do_not_depend_on_batch_size_or_other_labels():
    model = LabelModel()
    labels = torch.tensor([0, 1, 2, 3, 1])
    a = _sample(model, "reference", guidance_scale=3.0, method="ddpm")
    b = _sample(model, "reference", guidance_scale=3.0, method="ddpm", batch_size=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    perm = torch.tensor([4, 2, 0, 3, 1])
    # the same sample indices with other labels around them: images 0 and 3 keep their labels
    c = _sample(model, "reference", guidance_scale=3.0, method="ddpm", class_labels=labels[perm])
    torch.testing.assert_close(c[3], a[3], rtol=1e-5, atol=1e-5)
    assert _rel(c[0], a[0]) > 1e-3  # another label, another image


def test_cond_and_uncond_dicts_two_calls_when_they_cannot_merge():
    calls = []

    def model(x, t, y, drop=0.0):
        calls.append((x.shape[0], drop))
        return x * 0.1 + y.view(-1, 1, 1, 1).float() * (1 - drop)

    y = torch.tensor([1, 2, 3])
    a = fastddpm.sample(model, 3, shape=(1, 4, 4), steps=3, method="ddim", cond={"y": y}, uncond={"drop": 1.0},
                        guidance_scale=2.0, backend="reference")
    assert [c for c in calls] == [(3, 0.0), (3, 1.0)] * 3
    assert a.shape == (3, 1, 4, 4)


# ---------------------------------------------------------------------------------- errors
def test_bad_conditioning_is_refused_before_any_model_call():
    model = LabelModel()
    with pytest.raises(ValueError, match="class_labels must be in \\[0, 3\\] for this model"):
        _sample(model, "reference", class_labels=[0, 1, 2, 3, 5])
    with pytest.raises(ValueError, match="one label per image: shape \\(5,\\)"):
        _sample(model, "reference", class_labels=[0, 1])
    with pytest.raises(TypeError, match="integer class labels; got dtype torch.float32"):
        _sample(model, "reference", class_labels=torch.zeros(5))
    with pytest.raises(ValueError, match="guidance_interval must be \\(lo, hi\\) with 0 <= lo < hi"):
        _sample(model, "reference", guidance_scale=2.0, guidance_interval=(3.0, 1.0))
    with pytest.raises(ValueError, match="guidance_rescale must be a number in \\[0, 1\\]"):
        _sample(model, "reference", guidance_scale=2.0, guidance_rescale=-0.1)
    with pytest.raises(ValueError, match="null_class must be an int in \\[0, 4\\]"):
        _sample(model, "reference", guidance_scale=2.0, null_class=7)
    assert model.calls == []

    def plain(x, t):
        return x

    with pytest.raises(ValueError, match="needs a conditional call: pass class_labels"):
        fastddpm.sample(plain, 2, shape=(1, 4, 4), steps=2, guidance_scale=3.0)
    with pytest.raises(ValueError, match="is not class-conditional"):
        fastddpm.sample(plain, 2, shape=(1, 4, 4), steps=2, class_labels=1)
    with pytest.raises(ValueError, match="does not take the keyword 'mask'"):
        fastddpm.sample(plain, 2, shape=(1, 4, 4), steps=2, cond={"mask": 1})

    def labels_only(x, t, class_labels):
        return x

    with pytest.raises(ValueError, match="has no null class of its own: pass null_class="):
        fastddpm.sample(labels_only, 2, shape=(1, 4, 4), steps=2, class_labels=1, guidance_scale=2.0)
    assert fastddpm.sample(labels_only, 2, shape=(1, 4, 4), steps=2, class_labels=1).shape == (2, 1, 4, 4)


def test_noise_level_of_the_interval():
    assert G.noise_level(0.5) == pytest.approx(1.0)
    assert G.noise_level(0.2) == pytest.approx(math.sqrt(4.0))

"""fastddpm.sample (reference backend): statistics on exact-eps Gaussian data, batching,
noise sources, diffusers models, non-finite detection, argument errors."""
import math
import warnings

import pytest
import torch
from torch import nn

import fastddpm
from fastddpm import Schedule
from fastddpm.testing import GaussianDataModel, SelfConditionedModel
from formulas import ho_step64, song_step64

SHAPE = (2, 2, 3)  # 12 dimensions with different means and stds


def gaussian_model(prediction="eps"):
    s = Schedule.linear(1000)
    mu = torch.linspace(-0.8, 0.8, 12).reshape(SHAPE)
    # sd >= 0.2: the last step returns E[x0 | x at noise level sqrt(1 - abar_0) = 0.01], which
    # shrinks the std by a factor sqrt(sd^2 / (sd^2 + 1e-4)): < 0.2% here (4% at sd = 0.05).
    sd = torch.linspace(0.2, 1.0, 12).reshape(SHAPE)
    return s, mu, sd, GaussianDataModel(s, mu, sd, prediction)


def assert_gaussian(x, mu, sd, n):
    """Per-dimension mean within 5 standard errors + 0.01, std within 5 standard errors + 1%
    (the allowance covers time discretisation; sampling error alone is ~1.3% of the std at n = 3000)."""
    m, v = x.double().mean(0), x.double().std(0)
    se = sd.double() / math.sqrt(n)
    assert ((m - mu).abs() <= 5 * se + 0.01).all(), (m - mu).abs().max()
    assert ((v / sd - 1).abs() <= 5 / math.sqrt(2 * n) + 0.01).all(), (v / sd - 1).abs().max()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddpm_loop_reproduces_gaussian_data(prediction):
    s, mu, sd, model = gaussian_model(prediction)
    n = 3000
    x = fastddpm.sample(model, n, schedule=s, clip=None, seed=3, prediction=prediction,
                        backend="reference", batch_size=n)
    assert x.shape == (n, *SHAPE) and x.dtype == torch.float32
    assert_gaussian(x, mu, sd, n)


def chain_moments(model, r, method, eta=0.0, variance="fixed_small"):
    """Exact mean and std of the DISCRETISED sampling chain on Gaussian data, in float64.

    With exact eps every step is affine per dimension, x' = a x + b + c z, so moments
    propagate exactly: m' = a m + b, v' = a^2 v + c^2, from m = 0, v = 1. The step
    formulas are the papers' (tests/formulas.py), not fastddpm's code."""
    m, v = torch.zeros(1, *SHAPE, dtype=torch.float64), torch.ones(1, *SHAPE, dtype=torch.float64)
    zero, one = torch.zeros(1, *SHAPE, dtype=torch.float64), torch.ones(1, *SHAPE, dtype=torch.float64)
    for i in reversed(range(r.num_steps)):
        t = torch.tensor([i])

        def step(x, z):
            eps = model(x, r.timesteps[t])
            if method == "ddim":
                return song_step64(r, x, t, eps, z, eta, "eps", None)
            return ho_step64(r, x, t, eps, z, "eps", variance, None)

        b = step(zero, zero)
        a = step(one, zero) - b
        c = step(zero, one) - b
        m, v = a * m + b, a**2 * v + c**2
    return m[0], v[0].sqrt()


@pytest.mark.parametrize("method,eta,variance,steps", [
    ("ddim", 0.0, "fixed_small", 50), ("ddim", 1.0, "fixed_small", 50),
    ("ddpm", 0.0, "fixed_large", 20), ("ddpm", 0.0, "fixed_small", 10)])
def test_few_step_loops_match_exact_chain_moments(method, eta, variance, steps):
    """Few-step loops are biased (50-step DDIM under-disperses by 10-20% here), so they are
    checked against the exact moments of the discretised chain, at sampling-error tolerance."""
    s, mu, sd, model = gaussian_model()
    model.double()
    r = s.respace(steps)
    n = 4000
    x = fastddpm.sample(model, n, schedule=s, steps=steps, method=method, eta=eta, variance=variance, clip=None,
                        seed=5, batch_size=n)
    m_exact, sd_exact = chain_moments(model, r, method, eta, variance)
    se = sd_exact / math.sqrt(n)
    assert ((x.double().mean(0) - m_exact).abs() <= 5 * se + 1e-4).all()
    assert ((x.double().std(0) / sd_exact - 1).abs() <= 5 / math.sqrt(2 * n)).all()


def test_ddim_1000_steps_reproduces_gaussian_data():
    s, mu, sd, model = gaussian_model()
    n = 3000
    x = fastddpm.sample(model, n, schedule=s, method="ddim", eta=0.0, clip=None, seed=5, batch_size=n)
    assert_gaussian(x, mu, sd, n)


def test_seed_mode_is_independent_of_batch_size():
    s, mu, sd, model = gaussian_model()
    a = fastddpm.sample(model, 7, schedule=s, steps=20, seed=9)
    b = fastddpm.sample(model, 7, schedule=s, steps=20, seed=9, batch_size=3)
    c = fastddpm.sample(model, 7, schedule=s, steps=20, seed=10)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_generator_mode_is_reproducible_and_follows_diffusers_order():
    s, mu, sd, model = gaussian_model()
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    a = fastddpm.sample(model, 4, schedule=s, steps=10, generator=g())
    b = fastddpm.sample(model, 4, schedule=s, steps=10, generator=g())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the same loop written out by hand with the draws in diffusers' order
    r = s.respace(10)
    gen = g()
    x = torch.randn((4, *SHAPE), generator=gen)
    for i in reversed(range(r.num_steps)):
        eps = model(x, r.timesteps[i].expand(4))
        noise = torch.randn((4, *SHAPE), generator=gen) if i > 0 else None
        x = fastddpm.diffusion.ddpm_step(r, x, i, eps, noise)
    torch.testing.assert_close(a, x, rtol=0, atol=0)


def test_matches_a_diffusers_loop_with_unet2dmodel():
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(32, 32), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(25)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 3, 8, 8), generator=gen)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, generator=gen).prev_sample
    ours = fastddpm.sample(unet, 2, schedule=Schedule.from_diffusers(sched), generator=torch.Generator().manual_seed(0))
    assert ours.shape == (2, 3, 8, 8)  # shape inferred from unet.config
    rel = (ours - x).norm() / x.norm()
    assert rel < 1e-4, rel


def test_non_finite_state_raises_with_step():
    s = Schedule.linear(100)

    def model(x, t):
        bad = (t == 40).view(-1, 1, 1, 1)
        return torch.where(bad, torch.full_like(x, float("nan")), torch.zeros_like(x))

    with pytest.raises(FloatingPointError, match="step 40 .timestep 40"):
        fastddpm.sample(model, 2, shape=(1, 4, 4), schedule=s)


def test_learned_range_and_dtype_paths():
    m = fastddpm.UNet.from_preset("tiny", out_channels=6).eval()
    x = fastddpm.sample(m, 2, steps=5, variance="learned_range")
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    x16 = fastddpm.sample(m, 2, steps=5, variance="learned_range", dtype=torch.bfloat16)
    assert x16.dtype == torch.float32 and torch.isfinite(x16).all()


def test_progress_bar(capsys):
    s, mu, sd, model = gaussian_model()
    fastddpm.sample(model, 3, schedule=s, steps=4, batch_size=2, progress=True)
    assert "8/8" in capsys.readouterr().err


def test_argument_errors():
    s, mu, sd, model = gaussian_model()
    unet = fastddpm.UNet.from_preset("tiny")
    cases = [
        (dict(n=0), ValueError, "n must be"),
        (dict(method="euler_a"), ValueError, "method"),
        (dict(prediction="sample"), ValueError, "prediction"),
        (dict(variance="fixed"), ValueError, "variance"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(generator=5), TypeError, "generator"),
        (dict(method="ddim", variance="learned_range"), ValueError, "learned_range"),
        (dict(shape=(3, 0, 4)), ValueError, "shape"),
        (dict(schedule="linear"), TypeError, "Schedule"),
        (dict(steps=5000), ValueError, "exceeds"),
        (dict(dtype=torch.int8), ValueError, "dtype"),
        (dict(clip=0.0), ValueError, "clip"),
        (dict(device="meta"), ValueError, "device"),
    ]
    for kw, exc, msg in cases:
        args = dict(n=2, steps=3)
        args.update(kw)
        with pytest.raises(exc, match=msg):
            fastddpm.sample(unet, **args)
    with pytest.raises(ValueError, match="model output does not fit"):
        fastddpm.sample(lambda x, t: x[:, :1], 2, shape=(3, 4, 4), steps=2)
    with pytest.raises(RuntimeError) as info, pytest.warns(UserWarning, match="shape=.* differs from the model's"):
        fastddpm.sample(unet, 2, shape=(1, 16, 16), steps=2)
    assert "shape=" in "".join(getattr(info.value, "__notes__", ["shape="]))
    with pytest.raises(ValueError, match="shape is required"):
        fastddpm.sample(lambda x, t: x, 2, steps=2)
    with pytest.raises(TypeError, match="callable"):
        fastddpm.sample("unet", 2)
    with pytest.raises(TypeError, match="tensor or an object with .sample"):
        fastddpm.sample(lambda x, t: "x", 2, shape=(1, 2, 2), steps=2)


def assert_fused_equals_reference(model, kw):
    """The fused loop gives the reference loop's 5 samples, in seed mode (in-kernel vs torch
    Philox noise) and in generator mode (the same torch draws)."""
    for noise in ("seed", "generator"):
        runs = {}
        for backend in ("reference", "fused"):
            src = dict(seed=4) if noise == "seed" else dict(generator=torch.Generator().manual_seed(4))
            runs[backend] = fastddpm.sample(model, 5, backend=backend, **kw, **src)
        rel = (runs["fused"] - runs["reference"]).norm() / runs["reference"].norm()
        assert rel < 1e-5, (noise, rel)


@pytest.mark.parametrize("method,eta,use_clipped", [("ddpm", 0.0, False), ("ddim", 0.0, False), ("ddim", 1.0, False),
                                                   ("ddim", 0.0, True), ("ddim", 1.0, True)])
def test_fused_backend_equals_reference(method, eta, use_clipped):
    """The fused loop (Triton steps, here under the interpreter) gives the reference's samples:
    seed mode (in-kernel vs torch Philox noise) and generator mode (the same torch draws)."""
    s, mu, sd, model = gaussian_model()
    kw = dict(schedule=s, steps=12, method=method, eta=eta, batch_size=3, use_clipped_model_output=use_clipped)
    assert_fused_equals_reference(model, kw)


def test_use_clipped_model_output_in_the_loop():
    """DDIM: the option changes the samples where x0 gets clipped (the Gaussian data reaches
    beyond [-1, 1]); with method="ddpm" it would change nothing, and is refused."""
    s, mu, sd, model = gaussian_model()
    kw = dict(schedule=s, steps=12, seed=3, clip=0.5)
    raw = fastddpm.sample(model, 4, method="ddim", use_clipped_model_output=False, **kw)
    rederived = fastddpm.sample(model, 4, method="ddim", use_clipped_model_output=True, **kw)
    assert (raw - rederived).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"use_clipped_model_output applies to method='ddim' only; got "
                                         r"use_clipped_model_output=True with method='ddpm' \(DDPM's step reads only "
                                         r"the clipped x0.*pass use_clipped_model_output=False\)"):
        fastddpm.sample(model, 4, method="ddpm", use_clipped_model_output=True, **kw)
    with pytest.raises(TypeError, match="use_clipped_model_output must be True or False; got 1"):
        fastddpm.sample(model, 4, use_clipped_model_output=1, **kw)


def test_use_clipped_model_output_default_is_fastddpms_choice():
    """None (the default) = eps from the clipped x0 for DDIM with clipping (issue 18), the raw eps
    on a schedule from a diffusers scheduler (its pipelines' semantics); DDPM: False, no warning."""
    import warnings

    s, mu, sd, model = gaussian_model()
    kw = dict(schedule=s, steps=12, seed=3, clip=0.5)
    default = fastddpm.sample(model, 4, method="ddim", **kw)
    torch.testing.assert_close(default, fastddpm.sample(model, 4, method="ddim", use_clipped_model_output=True, **kw),
                               rtol=0, atol=0)
    assert (default - fastddpm.sample(model, 4, method="ddim", use_clipped_model_output=False, **kw)).abs().max() > 1e-3
    unclipped = dict(kw, clip=None)
    torch.testing.assert_close(fastddpm.sample(model, 4, method="ddim", **unclipped),
                               fastddpm.sample(model, 4, method="ddim", use_clipped_model_output=False, **unclipped),
                               rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastddpm.sample(model, 4, method="ddpm", **kw)
    from fastddpm.sampler import default_use_clipped_model_output

    peer = s.respace(12)
    peer.source_options = {"prediction": "eps", "clip": 0.5, "method": "ddim"}  # as Schedule.from_diffusers sets it
    assert default_use_clipped_model_output(peer, "ddim", 0.5) is False
    peer.source_options = dict(peer.source_options, use_clipped_model_output=True)
    assert default_use_clipped_model_output(peer, "ddim", 0.5) is True
    assert default_use_clipped_model_output(s, "ddim", 0.5) is True
    assert default_use_clipped_model_output(s, "ddim", None) is False
    assert default_use_clipped_model_output(s, "ddpm", 1.0) is False


class Recorder(torch.nn.Module):
    """Passes the calls through and keeps copies of every x_self_cond it was given."""

    self_condition = True

    def __init__(self, model):
        super().__init__()
        self.model, self.conds = model, []

    def forward(self, x, t, x_self_cond):
        self.conds.append(x_self_cond.clone())
        return self.model(x, t, x_self_cond)


@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_self_condition_feeds_the_previous_clipped_x0(method, eta):
    """model(x, t, x_self_cond) gets zeros first, then the previous step's clipped x0: the
    loop written out by hand, with the same generator draws, gives the same images."""
    s, mu, sd, base = gaussian_model()
    model = Recorder(SelfConditionedModel(base))
    kw = dict(schedule=s, steps=8, method=method, eta=eta, clip=0.6, self_condition=True, shape=SHAPE,
              use_clipped_model_output=False)  # the hand-written loop below keeps the raw eps
    got = fastddpm.sample(model, 3, generator=torch.Generator().manual_seed(2), **kw)
    r = s.respace(8)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn((3, *SHAPE), generator=gen)
    cond = torch.zeros_like(x)
    for k, i in enumerate(reversed(range(r.num_steps))):
        torch.testing.assert_close(model.conds[k], cond, rtol=0, atol=0)
        mo = model.model(x, r.timesteps[i].expand(3), cond)
        noise = torch.randn((3, *SHAPE), generator=gen) if i > 0 and (method == "ddpm" or eta > 0) else None
        if method == "ddpm":
            x, cond = fastddpm.diffusion.ddpm_step(r, x, i, mo, noise, clip=0.6, return_x0=True)
        else:
            x, cond = fastddpm.diffusion.ddim_step(r, x, i, mo, noise, eta=eta, clip=0.6, return_x0=True)
        assert cond.abs().max() <= 0.6
    torch.testing.assert_close(got, x, rtol=0, atol=0)
    assert (cond.abs() == 0.6).any()  # clipping happened, so "clipped" was tested
    plain = fastddpm.sample(SelfConditionedModel(base, scale=0.0), 3, generator=torch.Generator().manual_seed(2),
                            **kw)
    assert (plain - got).abs().max() > 1e-3  # the self-conditioning input matters


@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_self_condition_fused_equals_reference(method, eta):
    s, mu, sd, base = gaussian_model()
    model = SelfConditionedModel(base)
    kw = dict(schedule=s, steps=10, method=method, eta=eta, clip=0.6, self_condition=True, batch_size=3)
    assert_fused_equals_reference(model, kw)


def test_self_condition_errors_name_the_argument():
    s, mu, sd, base = gaussian_model()
    kw = dict(schedule=s, steps=3)
    with pytest.raises(ValueError, match=r"self_condition=False, but this SelfConditionedModel has "
                                         r"self_condition=True.*pass self_condition=True"):
        fastddpm.sample(SelfConditionedModel(base), 2, **kw)
    with pytest.raises(ValueError, match=r"self_condition=True calls model\(x, t, x_self_cond\), but this "
                                         r"GaussianDataModel takes \(x, t\)"):
        fastddpm.sample(base, 2, self_condition=True, **kw)
    with pytest.raises(ValueError, match=r"self_condition=True calls model\(x, t, x_self_cond\).*function"):
        fastddpm.sample(lambda x, t: base(x, t), 2, shape=SHAPE, self_condition=True, **kw)
    with pytest.raises(ValueError, match=r"takes \(x, t, cond\), a third argument.*pass self_condition=True"):
        fastddpm.sample(lambda x, t, cond: base(x, t), 2, shape=SHAPE, **kw)
    off = SelfConditionedModel(base)
    off.self_condition = False
    with pytest.raises(ValueError, match=r"self_condition=True, but this SelfConditionedModel has "
                                         r"self_condition=False: it would ignore x_self_cond"):
        fastddpm.sample(off, 2, self_condition=True, **kw)
    with pytest.raises(TypeError, match="self_condition must be True or False; got 1"):
        fastddpm.sample(base, 2, self_condition=1, **kw)
    # optional third argument: fine either way
    fastddpm.sample(lambda x, t, c=None: base(x, t), 2, shape=SHAPE, **kw)
    fastddpm.sample(lambda x, t, c=None: base(x, t), 2, shape=SHAPE, self_condition=True, **kw)


def test_backend_selection():
    from fastddpm.sampler import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    assert resolve_backend("fused", torch.device("cpu")) == "fused"
    with pytest.raises(ValueError, match="graph.*needs a CUDA device"):
        resolve_backend("graph", torch.device("cpu"))


def test_dropout_is_off_while_sampling_and_mode_is_restored():
    m = fastddpm.UNet.from_preset("tiny", dropout=0.5)
    assert m.training
    a = fastddpm.sample(m, 2, steps=3, seed=1)
    b = fastddpm.sample(m, 2, steps=3, seed=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # dropout would make these differ
    assert m.training


def test_fused_loop_follows_a_channels_last_model():
    m = fastddpm.UNet.from_preset("tiny").eval().to(memory_format=torch.channels_last)
    ref = fastddpm.sample(m, 3, steps=4, seed=2, backend="reference")
    got = fastddpm.sample(m, 3, steps=4, seed=2, backend="fused")
    assert (got - ref).norm() / ref.norm() < 1e-5


# ------------------------------------------------------------------ compile=True recompiles
class ConvEps(nn.Module):
    """A small conv model: cheap for Dynamo to trace, and its weights can be channels_last."""

    def __init__(self, channels=2):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t):
        return 0.1 * self.conv(x) + (t.float() / 1000).view(-1, 1, 1, 1)


@pytest.fixture
def count_compiles(monkeypatch):
    """compile=True with Dynamo's real cache and guards but the cheap 'eager' backend, counting
    compiles (frames Dynamo hands to the backend); graph backend emulated on the CPU."""
    from torch._dynamo.testing import CompileCounter

    from fastddpm import graphs, model_call

    if torch.cuda.is_available():
        pytest.skip("CPU emulation of the graph loop")
    counter = CompileCounter()
    monkeypatch.setattr(model_call, "COMPILE_BACKEND", counter)
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    monkeypatch.setattr(graphs, "CHUNK_STEPS", 2)
    torch._dynamo.reset()
    graphs.clear_cache()
    yield counter
    graphs.clear_cache()
    torch._dynamo.reset()


def test_compile_true_compiles_once_per_model_and_configuration(count_compiles, monkeypatch):
    """Per model: one compile for the full batch, one for the short last batch (marked dynamic),
    shared by the fused and graph loops (one autocast setting, one t layout), none for the
    channels_last switch (x starts in the weights' layout), none on repeated calls. Always
    default mode: our loop owns the CUDA graphs."""
    modes = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: modes.append(kw.get("mode")) or real_compile(fn, **kw))
    models = [ConvEps(), ConvEps(), ConvEps().to(memory_format=torch.channels_last)]
    kw = dict(shape=(2, 5, 7), steps=3, batch_size=3, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never "ran uncompiled"
        for m in models:
            plain = fastddpm.sample(m, 5, backend="fused", **kw)
            for _ in range(2):
                for backend in ("graph", "fused"):
                    for n in (5, 8):  # short last batches of 2 (n=5: samples 3, 4; n=8: 6, 7)
                        got = fastddpm.sample(m, n, backend=backend, compile=True, **kw)
                        # Dynamo's traced graph may round differently in float32 (seen: 1.4e-6 abs)
                        torch.testing.assert_close(got[:5], plain, rtol=1e-5, atol=1e-5)
    assert count_compiles.frame_count == 2 * len(models)
    assert modes == [None] * len(models)  # one compiled callable per model, default mode


def test_models_do_not_share_a_recompile_budget(count_compiles):
    """More models than Dynamo's recompile limit (8 per code object), each of its own shape:
    each has its own code object, so every one is compiled (no fallback, no warning)."""
    limit = torch._dynamo.config.recompile_limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(limit + 2):
            fastddpm.sample(ConvEps(), 2, shape=(2, 3 + k, 5), steps=2, backend="fused", compile=True)
    assert count_compiles.frame_count == limit + 2


def test_compile_true_warns_when_dynamo_runs_the_model_uncompiled(count_compiles):
    # torch's own config.patch, not monkeypatch: monkeypatch's undo leaves the option hidden
    # ("torch._dynamo.config.recompile_limit does not exist") for every later compile
    m = ConvEps()
    with torch._dynamo.config.patch(recompile_limit=1):
        fastddpm.sample(m, 2, shape=(2, 5, 7), steps=2, backend="fused", compile=True)
        with pytest.warns(RuntimeWarning,
                          match=r"compile=True.*ran this ConvEps's call uncompiled.*recompile_limit = 1"):
            got = fastddpm.sample(m, 3, shape=(2, 5, 7), steps=2, backend="fused", compile=True)
    ref = fastddpm.sample(m, 3, shape=(2, 5, 7), steps=2, backend="fused")
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert count_compiles.frame_count == 1

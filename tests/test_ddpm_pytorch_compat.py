"""fastddpm against lucidrains' denoising-diffusion-pytorch (2.3.4), installed, on the CPU.

`fastddpm.sample(diffusion.model, n, **fastddpm.compat.sample_kwargs(diffusion), generator=g)`
then `diffusion.unnormalize(x)` must give `diffusion.sample(n)` after `torch.manual_seed(s)`
(the package draws from torch's global generator: the same stream as a CPU torch.Generator with
that seed). Compared: final images and whole trajectories (every model input x_t, the timesteps
and the self-conditioning input, recorded by a hook on the shared model) to 1e-4 relative L2,
for DDPM and DDIM (eta 0 and 1), 3 objectives x 3 schedules, learned variance and
self-conditioning, on the reference and fused backends. The loops run a model with a known
exact answer behind the package's Unet interface (GaussianUnet): a random Unet makes them
depend on the machine's convolution rounding (DESIGN.md, Numerics). The package's own Unet
is run too, compared over the first steps.

Install without its dependencies (it pulls torchvision, whose PyPI build drags a CUDA torch):
    pip install --no-deps denoising-diffusion-pytorch==2.3.4 einops==0.8.2 ema-pytorch==0.8.3
The trainer-only imports it makes at import time (torchvision, accelerate, scipy) are stubbed
while it imports, when they are missing (tests/ddpm_pytorch_peer.py); sampling never touches them.
"""
import importlib

import pytest
import torch

import fastddpm
from fastddpm import Schedule, compat
from fastddpm.testing import GaussianDataModel
from ddpm_pytorch_peer import import_package

ddp = import_package()
ddp_module = importlib.import_module("denoising_diffusion_pytorch.denoising_diffusion_pytorch")

OBJECTIVES = ["pred_noise", "pred_x0", "pred_v"]
SCHEDULES = ["linear", "cosine", "sigmoid"]
N, IMAGE = 2, 8
DDPM_T = 40            # DDPM: every training step is a sampling step; a short schedule keeps CPU time down
DDIM_T, DDIM_S = 1000, 30  # DDIM: 30 of 1000 (33.3 apart: the package's truncation to int matters)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions on a shared CPU: one thread is ~50x faster than an oversubscribed pool."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def unet(**kw):
    """A tiny random Unet: its weights come from the test's fresh seed (conftest)."""
    return ddp.Unet(dim=8, dim_mults=(1, 2), channels=3, attn_heads=2, attn_dim_head=8, flash_attn=False, **kw)


class GaussianUnet(torch.nn.Module):
    """The package's Unet interface (channels, out_dim, self_condition; model(x, t, x_self_cond=None),
    None read as zeros) around a model with a known exact answer: the Bayes-optimal prediction for
    Gaussian data (fastddpm.testing.GaussianDataModel), for the loop-level comparisons. A random
    Unet makes the loops chaotic (DESIGN.md, Numerics): its convolutions' rounding, which moves
    with the machine and the thread count, grew to 2e-4 over a self-conditioned DDIM run. Here
    x_self_cond enters as 0.3 tanh(x_self_cond) and learned_variance's second half is 0.5 tanh(x):
    smooth and bounded, so the runs stay well conditioned and both inputs still matter."""

    def __init__(self, objective="pred_noise", self_condition=False, learned_variance=False):
        super().__init__()
        self.channels, self.out_dim = 3, 6 if learned_variance else 3
        self.self_condition, self.learned_variance = self_condition, learned_variance
        self.prediction = {"pred_noise": "eps", "pred_x0": "x0", "pred_v": "v"}[objective]
        self.exact = None

    def of(self, diffusion):
        """Set the exact model's schedule from the diffusion's betas; returns the diffusion."""
        shape = (self.channels, IMAGE, IMAGE)
        n = self.channels * IMAGE * IMAGE
        self.exact = GaussianDataModel(Schedule.from_betas(diffusion.betas.double()),
                                       torch.linspace(-0.5, 0.5, n).reshape(shape),
                                       torch.linspace(0.2, 0.9, n).reshape(shape),
                                       prediction="eps" if self.learned_variance else self.prediction)
        return diffusion

    def forward(self, x, t, x_self_cond=None):
        out = self.exact(x, t)
        if self.self_condition:
            out = out + 0.3 * torch.tanh(x_self_cond if x_self_cond is not None else torch.zeros_like(x))
        if self.learned_variance:
            out = torch.cat([out, 0.5 * torch.tanh(x)], dim=1)
        return out


def gaussian(cls=None, objective="pred_noise", self_condition=False, learned_variance=False, **kw):
    """A GaussianDiffusion (or cls) over a GaussianUnet, in eval mode."""
    model = GaussianUnet(objective, self_condition, learned_variance)
    return model.of((cls or ddp.GaussianDiffusion)(model, image_size=IMAGE, objective=objective, **kw).eval())


class Trajectory:
    """A forward pre-hook on the model: every call's x_t (copied: the fused loop updates its
    state in place), timesteps and self-conditioning input (None -> zeros, as the Unet does)."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        x, t = args[0], args[1]
        cond = args[2] if len(args) > 2 and args[2] is not None else torch.zeros_like(x)
        self.calls.append((x.detach().clone(), t.detach().clone(), cond.detach().clone()))

    def close(self):
        self.handle.remove()
        return self.calls


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def package_run(diffusion, seed):
    trace = Trajectory(diffusion.model)
    torch.manual_seed(seed)
    images = diffusion.sample(batch_size=N)
    return images, trace.close()


def our_run(diffusion, seed, backend, **extra):
    trace = Trajectory(diffusion.model)
    x = fastddpm.sample(diffusion.model, N, **compat.sample_kwargs(diffusion), **extra,
                        generator=torch.Generator().manual_seed(seed), backend=backend)
    return diffusion.unnormalize(x), trace.close()


def assert_same_run(diffusion, backends=("reference", "fused"), tol=1e-4):
    seed = int(torch.randint(0, 2**31, ()))  # from the test's fresh seed: replayable
    want, want_calls = package_run(diffusion, seed)
    assert torch.isfinite(want).all()
    for backend in backends:
        got, calls = our_run(diffusion, seed, backend)
        assert len(calls) == len(want_calls), (backend, len(calls), len(want_calls))
        worst = 0.0
        for k, ((x, t, c), (wx, wt, wc)) in enumerate(zip(calls, want_calls)):
            assert torch.equal(t, wt), (backend, k, t, wt)
            assert rel(x, wx) <= tol, (backend, "x_t at call", k, rel(x, wx))
            if k > 0 or wc.abs().max() > 0:
                assert rel(c, wc) <= tol, (backend, "x_self_cond at call", k, rel(c, wc))
                worst = max(worst, rel(c, wc))
            worst = max(worst, rel(x, wx))
        assert rel(got, want) <= tol, (backend, "final images", rel(got, want))
        print(f"{backend}: {len(calls)} steps, worst state {worst:.2e}, final images {rel(got, want):.2e}")


# ------------------------------------------------------------------------------ sampling parity
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ddpm_matches_the_package(objective, schedule):
    """p_sample_loop: ancestral steps on every training timestep (stochastic: a random network
    stays within ~1e-6 of the package, DESIGN.md Numerics)."""
    d = gaussian(objective=objective, timesteps=DDPM_T, beta_schedule=schedule)
    kw = compat.sample_kwargs(d)
    assert kw["method"] == "ddpm" and kw["schedule"].num_steps == DDPM_T
    assert_same_run(d)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_the_package(objective, schedule, eta):
    """ddim_sample: 30 of 1000 timesteps, noise re-derived from the clipped x0.

    Why at most 30 steps: deterministic DDIM (eta=0) on a random network is chaotic, float32
    rounding differences grow by orders of magnitude over tens of steps (DESIGN.md, Numerics),
    and the two sides round differently: the package computes the DDIM coefficients in float32
    from float32 abar, we in float64. With 30 steps the trajectories stay ~1e-6 apart, so 1e-4
    is a real test. The largest gap (~1e-5..6e-5, eta=1 on the cosine schedule) is the
    package's own float32 cancellation in c = sqrt(1 - abar_next - sigma^2) at the first step,
    where abar ~ 2e-9: c is 4.5% off there (9.1e-4 against 9.6e-4 in float64)."""
    d = gaussian(objective=objective, timesteps=DDIM_T, sampling_timesteps=DDIM_S, beta_schedule=schedule,
                 ddim_sampling_eta=eta)
    kw = compat.sample_kwargs(d)
    assert kw["method"] == "ddim" and kw["eta"] == eta and kw["use_clipped_model_output"]
    assert kw["schedule"].num_steps == DDIM_S
    assert_same_run(d)


@pytest.mark.parametrize("objective", ["pred_noise", "pred_v"])
def test_learned_variance_matches_the_package(objective):
    """LearnedGaussianDiffusion: the second half of the output interpolates the log variance
    (Nichol & Dhariwal eq. 15). Its p_mean_variance reads the first half as noise whatever
    objective says (its loss trains it on noise), so prediction is eps for either objective."""
    d = gaussian(ddp.LearnedGaussianDiffusion, objective=objective, learned_variance=True, timesteps=DDPM_T,
                 beta_schedule="linear")
    kw = compat.sample_kwargs(d)
    assert kw["variance"] == "learned_range" and kw["prediction"] == "eps"
    assert_same_run(d)


@pytest.mark.parametrize("sampling,eta", [(None, 0.0), (DDIM_S, 0.0), (DDIM_S, 1.0)])
def test_self_conditioning_matches_the_package(sampling, eta):
    """Unet(self_condition=True): model(x, t, x_self_cond) with the previous step's clipped x0
    (zeros first); the hook checks the self-conditioning input of every call too."""
    T = DDPM_T if sampling is None else DDIM_T
    d = gaussian(self_condition=True, timesteps=T, sampling_timesteps=sampling, beta_schedule="cosine",
                 ddim_sampling_eta=eta)
    assert compat.sample_kwargs(d)["self_condition"] is True
    assert_same_run(d)
    # the input matters: without it (zeros every step) the images differ
    with pytest.raises(ValueError, match=r"self_condition=False, but this \w*Unet has self_condition=True"):
        fastddpm.sample(d.model, N, **{**compat.sample_kwargs(d), "self_condition": False})


@pytest.mark.parametrize("sampling", [None, DDIM_S])
def test_the_packages_own_unet_runs_in_the_same_loop(sampling):
    """The package's random Unet itself (self-conditioned): the same calls with the same timesteps,
    and the first steps' inputs equal. Later steps are not compared: on a random network the
    rounding of its convolutions grows along the loop (DESIGN.md, Numerics; the loops above use
    GaussianUnet)."""
    d = ddp.GaussianDiffusion(unet(self_condition=True), image_size=IMAGE, timesteps=DDPM_T if sampling is None
                              else DDIM_T, sampling_timesteps=sampling, objective="pred_noise",
                              beta_schedule="cosine", ddim_sampling_eta=1.0).eval()
    want, want_calls = package_run(d, 3)
    _, calls = our_run(d, 3, "reference")
    assert [t.tolist() for _, t, _ in calls] == [t.tolist() for _, t, _ in want_calls]
    for k in range(3):
        (x, _, c), (wx, _, wc) = calls[k], want_calls[k]
        assert rel(x, wx) <= 1e-4 and (k == 0 or rel(c, wc) <= 1e-4), (k, rel(x, wx), rel(c, wc))


def test_self_conditioning_input_changes_the_images():
    d = ddp.GaussianDiffusion(unet(self_condition=True), image_size=IMAGE, timesteps=DDPM_T,
                              objective="pred_noise", beta_schedule="linear").eval()
    kw = compat.sample_kwargs(d)
    with_cond = fastddpm.sample(d.model, N, **kw, generator=torch.Generator().manual_seed(1))
    zeros = fastddpm.sample(lambda x, t, c: d.model(x, t, torch.zeros_like(c)), N, **kw,
                            generator=torch.Generator().manual_seed(1))
    assert rel(zeros, with_cond) > 1e-2


def test_without_use_clipped_model_output_ddim_differs():
    """What the issue found: the package's DDIM re-derives the noise; without the option, no match."""
    d = ddp.GaussianDiffusion(unet(), image_size=IMAGE, timesteps=DDIM_T, sampling_timesteps=DDIM_S,
                              objective="pred_v", beta_schedule="sigmoid").eval()
    want, _ = package_run(d, 5)
    kw = {**compat.sample_kwargs(d), "use_clipped_model_output": False}
    got = d.unnormalize(fastddpm.sample(d.model, N, **kw, generator=torch.Generator().manual_seed(5)))
    assert rel(got, want) > 1e-2


# ------------------------------------------------------------------------------ the mapping itself
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_is_the_packages_float64_betas(schedule):
    fn = getattr(ddp_module, f"{schedule}_beta_schedule")
    d = ddp.GaussianDiffusion(unet(), image_size=IMAGE, timesteps=1000, beta_schedule=schedule)
    s = compat.sample_kwargs(d)["schedule"]
    torch.testing.assert_close(s.betas, fn(1000), rtol=1e-12, atol=0)  # not the float32 buffer
    assert s.betas.dtype == torch.float64


def test_custom_schedule_kwargs_fall_back_to_the_float32_betas():
    d = gaussian(timesteps=DDPM_T, beta_schedule="sigmoid", schedule_fn_kwargs=dict(start=-2, end=2, tau=0.7))
    s = compat.sample_kwargs(d)["schedule"]
    torch.testing.assert_close(s.betas, ddp_module.sigmoid_beta_schedule(DDPM_T, start=-2, end=2, tau=0.7),
                               rtol=1e-6, atol=0)
    assert_same_run(d, backends=("reference",))


def test_kwargs_and_ddim_timesteps():
    d = ddp.GaussianDiffusion(unet(), image_size=(8, 16), timesteps=1000, sampling_timesteps=30, objective="pred_x0",
                              ddim_sampling_eta=0.5, auto_normalize=False)
    kw = compat.sample_kwargs(d)
    assert {k: v for k, v in kw.items() if k != "schedule"} == dict(
        method="ddim", eta=0.5, prediction="x0", variance="fixed_small", clip=1.0, shape=(3, 8, 16),
        use_clipped_model_output=True, self_condition=False)
    # the package's own expression in ddim_sample
    times = torch.linspace(-1, 999, steps=31).int().tolist()
    assert kw["schedule"].timesteps.tolist() == sorted(t for t in times if t >= 0)
    assert kw["schedule"].timesteps.tolist()[:3] == [32, 65, 99]
    ddpm = compat.sample_kwargs(ddp.GaussianDiffusion(unet(), image_size=8, timesteps=100, ddim_sampling_eta=0.5))
    assert ddpm["method"] == "ddpm" and ddpm["eta"] == 0.0 and ddpm["use_clipped_model_output"] is False
    assert ddpm["prediction"] == "v"  # the package's default objective


def test_training_only_options_are_accepted():
    d = gaussian(timesteps=DDPM_T, offset_noise_strength=0.1, immiscible=True, min_snr_loss_weight=True)
    assert_same_run(d, backends=("reference",))


def test_what_cannot_be_honoured_is_refused():
    learned_ddim = ddp.LearnedGaussianDiffusion(unet(learned_variance=True), image_size=IMAGE, timesteps=1000,
                                                sampling_timesteps=30, objective="pred_noise")
    with pytest.raises(NotImplementedError, match=r"LearnedGaussianDiffusion with DDIM sampling "
                                                  r"\(sampling_timesteps=30 < timesteps=1000\)"):
        compat.sample_kwargs(learned_ddim)
    weighted = ddp.WeightedObjectiveGaussianDiffusion(unet(out_dim=8), image_size=IMAGE, timesteps=100)
    with pytest.raises(NotImplementedError, match=r"WeightedObjectiveGaussianDiffusion.p_mean_variance is not "
                                                  r"denoising-diffusion-pytorch's GaussianDiffusion"):
        compat.sample_kwargs(weighted)

    class MySampler(ddp.GaussianDiffusion):
        def ddim_sample(self, shape, return_all_timesteps=False):
            raise AssertionError

    with pytest.raises(NotImplementedError, match=r"MySampler.ddim_sample is not denoising-diffusion-pytorch's"):
        compat.sample_kwargs(MySampler(unet(), image_size=IMAGE, timesteps=100))

    class Trained(ddp.GaussianDiffusion):  # overrides training only: accepted
        def p_losses(self, *args, **kwargs):
            return super().p_losses(*args, **kwargs)

    assert compat.sample_kwargs(Trained(unet(), image_size=IMAGE, timesteps=100))["method"] == "ddpm"
    d = ddp.GaussianDiffusion(unet(), image_size=IMAGE, timesteps=100)
    d.objective = "pred_noise_squared"
    with pytest.raises(NotImplementedError, match="objective='pred_noise_squared' is not supported"):
        compat.sample_kwargs(d)


def test_a_self_conditioned_unet_without_self_condition_is_refused():
    with pytest.raises(ValueError, match=r"self_condition=False, but this Unet has self_condition=True"):
        fastddpm.sample(unet(self_condition=True), 1, shape=(3, IMAGE, IMAGE), steps=2)
    with pytest.raises(ValueError, match=r"self_condition=True, but this Unet has self_condition=False"):
        fastddpm.sample(unet(), 1, shape=(3, IMAGE, IMAGE), steps=2, self_condition=True)

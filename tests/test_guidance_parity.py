"""Classifier-free guidance against its peers, on the CPU (issue 22).

diffusers: a hand-written guidance loop with DiTPipeline.__call__'s structure (diffusers 0.42.1),
for a pixel-space UNet2DModel(num_class_embeds=K + 1) whose label K is the null class:
latent_model_input = cat([x, x]), class_labels_input = cat([y, null]) (conditional rows first, as
DiT), one model call, split, `uncond + w (cond - uncond)`, diffusers' own `rescale_noise_cfg`, then
`scheduler.step(..., generator=g)`. Two departures from DiT, both the contract's:
- DiT steps the doubled latents and keeps the first half at the end; with generator= a stochastic
  step then draws 2B rows of noise where fastddpm (and every other diffusers pipeline, which steps
  the B-row latents) draws B, so the loop steps the B conditional rows;
- DiT (like all diffusers pipelines) guides only when w > 1; the contract applies the formula at
  every w != 1 (w = 0: the unconditional output), so the loop does too.
Outside a guidance_interval (sigma = sqrt((1 - abar_t) / abar_t) of the step's timestep not in
(lo, hi]) the loop makes the conditional call alone. Compared: final images to 1e-4 relative L2,
for DDPM, DDIM (eta 0) and DPM-Solver++ (2M), eps and v prediction, w in {0, 1, 4}, with and
without rescale / interval, over few steps (a random U-Net makes deterministic loops chaotic over
many: DESIGN.md, Numerics); the reference backend over the whole matrix, the fused one (the Triton
interpreter: slow) on a subset with every scheduler and prediction; a learned-variance model (2C
channels: the variance from the conditional rows, as DiT). Measured (12 runs of the file, fresh
seeds): worst 1.9e-5 for DDIM eps (w = 4: the chaos above), 3.5e-6 elsewhere. Also: seed= images
depend only on (seed, index, label), whatever the batch size and the other labels; the model calls
of each step (n rows at w = 1, one doubled call of 2n at w = 4, doubled only inside an interval).

denoising-diffusion-pytorch 2.3.4 classifier_free_guidance: `compat.sample_kwargs(diffusion)`
reproduces `diffusion.sample(classes)` (cond_scale 6, rescaled_phi 0.7, its parallel-component
removal), compared after mapping its [0, 1] output back: x = 2 images - 1. Its noise comes from
torch's global generator (torch.randn, torch.randn_like; its Unet draws nothing at cond_drop_prob
0 or 1), in diffusers' order, so torch.manual_seed(s) before it and generator=
torch.Generator().manual_seed(s) for fastddpm give the same draws (as tests/test_ddpm_pytorch_compat.py).
"""
import importlib
import math

import pytest
import torch

import fastddpm
from fastddpm import compat
from ddpm_pytorch_peer import import_package

diffusers = pytest.importorskip("diffusers")
# diffusers' own rescale_noise_cfg (the pipelines' copies import transformers; this one, the guiders', does not)
from diffusers.guiders.guider_utils import rescale_noise_cfg  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

K = 5          # classes 0..K-1; label K is the null class
N = 3
SHAPE = (3, 8, 8)
STEPS = 6
TOL = 1e-4
CHANGED = 10 * TOL  # what an option must change, at least, for the parity tests to see it dropped
SCHEDULERS = {
    "ddpm": lambda **kw: diffusers.DDPMScheduler(num_train_timesteps=1000, **kw),
    "ddim": lambda **kw: diffusers.DDIMScheduler(num_train_timesteps=1000, **kw),
    "dpm": lambda **kw: diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, **kw),
}
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions on a shared CPU: one thread is far faster than an oversubscribed pool."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_unet(out_channels=3):
    """A small random class-conditional UNet2DModel (weights from the test's fresh seed)."""
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4, num_class_embeds=K + 1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def level(abar):
    abar = float(abar)
    return math.sqrt((1 - abar) / abar)


def interval_of(scheduler):
    """(lo, hi) holding the noise levels of the 2nd to 4th of the scheduler's steps, its ends halfway
    (geometrically) between levels: no step near an end."""
    sig = [level(scheduler.alphas_cumprod[int(t)]) for t in scheduler.timesteps]  # descending
    return math.sqrt(sig[4] * sig[3]), math.sqrt(sig[1] * sig[0])


@torch.no_grad()
def diffusers_guided_loop(model, scheduler, labels, null, w, generator, rescale=0.0, interval=None):
    """DiTPipeline.__call__'s guidance loop for a pixel UNet2DModel (module docstring)."""
    B = labels.shape[0]
    latents = randn_tensor((B, *SHAPE), generator=generator, device=torch.device("cpu"), dtype=torch.float32)
    class_null = torch.tensor([null] * B)
    class_labels_input = torch.cat([labels, class_null], 0)
    for t in scheduler.timesteps:
        sigma = level(scheduler.alphas_cumprod[int(t)])
        guided = w != 1 and (interval is None or interval[0] < sigma <= interval[1])
        if guided:
            latent_model_input = torch.cat([latents] * 2)
            timesteps = t[None].expand(latent_model_input.shape[0])
            noise_pred = model(latent_model_input, timesteps, class_labels=class_labels_input).sample
            eps, rest = noise_pred[:, :SHAPE[0]], noise_pred[:, SHAPE[0]:]  # rest: learned variance channels
            cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
            model_output = uncond_eps + w * (cond_eps - uncond_eps)
            if rescale > 0:
                model_output = rescale_noise_cfg(model_output, cond_eps, guidance_rescale=rescale)
            model_output = torch.cat([model_output, rest[:B]], dim=1)  # DiT: the conditional rows' rest
        else:
            model_output = model(latents, t[None].expand(B), class_labels=labels).sample
        latents = scheduler.step(model_output, t, latents, generator=generator).prev_sample
    return latents


def run_pair(kind, prediction, w, variant, backend, steps=STEPS, **scheduler_kw):
    """(fastddpm's images, the hand-written loop's) with the same generator seed."""
    learned = scheduler_kw.get("variance_type") == "learned_range"
    model = tiny_unet(2 * SHAPE[0] if learned else SHAPE[0])
    scheduler = SCHEDULERS[kind](prediction_type=PREDICTIONS[prediction], **scheduler_kw)
    scheduler.set_timesteps(steps)
    labels = torch.randint(0, K, (N,))
    rescale = 0.7 if "rescale" in variant else 0.0
    interval = interval_of(scheduler) if "interval" in variant else None
    seed = int(torch.randint(0, 2**31, ()))
    want = diffusers_guided_loop(model, scheduler, labels, K, w, torch.Generator().manual_seed(seed), rescale,
                                 interval)
    scheduler.set_timesteps(steps)  # DPM-Solver's history starts afresh
    got = fastddpm.sample(model, N, **compat.sample_kwargs(scheduler), class_labels=labels, null_class=K,
                          guidance_scale=w, guidance_rescale=rescale, guidance_interval=interval,
                          generator=torch.Generator().manual_seed(seed), backend=backend)
    assert torch.isfinite(want).all()
    return got, want, (model, scheduler, labels, seed)


VARIANTS = ["plain", "rescale", "interval", "rescale+interval"]
MATRIX = [(w, v) for w in (0, 1, 4) for v in (VARIANTS if w != 1 else ["plain"])]  # w = 1: nothing to vary


# ------------------------------------------------------------------------------------ diffusers
@pytest.mark.parametrize("w,variant", MATRIX)
@pytest.mark.parametrize("prediction", list(PREDICTIONS))
@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_reference_matches_a_diffusers_guidance_loop(kind, prediction, w, variant):
    got, want, _ = run_pair(kind, prediction, w, variant, "reference")
    err = rel(got, want)
    print(f"reference {kind} {prediction} w={w} {variant}: rel L2 {err:.2e}")
    assert err <= TOL, err


FUSED = [  # every scheduler and prediction; w = 0 alone (one unconditional call) and guided (with a rescale)
    ("ddpm", "eps", 4, "rescale+interval"), ("ddpm", "eps", 1, "plain"), ("ddpm", "v", 0, "rescale"),
    ("ddim", "eps", 0, "interval"), ("ddim", "v", 4, "rescale"),
    ("dpm", "eps", 4, "rescale+interval"), ("dpm", "v", 0, "plain"), ("dpm", "v", 4, "plain")]


@pytest.mark.parametrize("kind,prediction,w,variant", FUSED)
def test_fused_matches_a_diffusers_guidance_loop(kind, prediction, w, variant):
    got, want, _ = run_pair(kind, prediction, w, variant, "fused")
    err = rel(got, want)
    print(f"fused {kind} {prediction} w={w} {variant}: rel L2 {err:.2e}")
    assert err <= TOL, err


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_learned_variance_is_guided_on_its_first_half(backend):
    """variance_type="learned_range" (2C output channels): the guidance on the first C, the variance
    channels from the conditional rows, as DiT's guided forward (its `rest`)."""
    got, want, _ = run_pair("ddpm", "eps", 4, "rescale", backend, variance_type="learned_range")
    err = rel(got, want)
    print(f"{backend} ddpm learned_range w=4 rescale: rel L2 {err:.2e}")
    assert err <= TOL, err


def test_the_options_change_the_images():
    """The comparisons above would pass a loop ignoring w, the rescale or the interval if those
    changed nothing: each must move the images far beyond the tolerance."""
    model = tiny_unet()
    scheduler = SCHEDULERS["ddpm"]()
    scheduler.set_timesteps(STEPS)
    labels = torch.randint(0, K, (N,))
    interval = interval_of(scheduler)

    def loop(w, rescale=0.0, interval=None):
        return diffusers_guided_loop(model, scheduler, labels, K, w, torch.Generator().manual_seed(7), rescale,
                                     interval)

    plain, guided = loop(1), loop(4)
    assert rel(guided, plain) > CHANGED
    assert rel(loop(0), plain) > CHANGED
    assert rel(loop(4, rescale=0.7), guided) > CHANGED
    assert rel(loop(4, interval=interval), guided) > CHANGED
    assert rel(loop(4, interval=interval), plain) > CHANGED


# ------------------------------------------------------------------------ seed mode, call counts
class Calls:
    """A forward pre-hook on the model recording each call's batch size and labels."""

    def __init__(self, model):
        self.rows, self.labels = [], []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.rows.append(args[0].shape[0])
        self.labels.append(kwargs["class_labels"].tolist())

    def close(self):
        self.handle.remove()
        return self.rows


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_seed_mode_sample_depends_only_on_its_index_and_label(backend):
    """seed= noise: image i is a function of (seed, i, label i), whatever the batch size and the
    labels of the other images (the per-sample std of the rescale and the projection of the
    parallel part included)."""
    model = tiny_unet()
    n, steps = 4, 4
    labels = torch.tensor([0, 1, 2, 3])
    kw = dict(steps=steps, method="ddpm", class_labels=labels, null_class=K, guidance_scale=4.0,
              guidance_rescale=0.5, guidance_parallel=0.3, seed=11, backend=backend)
    whole = fastddpm.sample(model, n, **kw)
    assert rel(whole, fastddpm.sample(model, n, **{**kw, "guidance_scale": 1.0})) > CHANGED
    one_by_one = fastddpm.sample(model, n, **kw, batch_size=1)
    assert rel(one_by_one, whole) <= 1e-5
    perm = torch.tensor([0, 3, 1, 2])  # image 0 keeps its label, the others are moved around
    shuffled = fastddpm.sample(model, n, **{**kw, "class_labels": labels[perm]})
    assert rel(shuffled[0], whole[0]) <= 1e-5
    for i in range(1, n):  # the moved labels: image i with label perm[i] is the single-image run
        alone = fastddpm.sample(model, 1, **{**kw, "class_labels": labels[perm][i:i + 1]}, sample_offset=i)
        assert rel(shuffled[i], alone[0]) <= 1e-5
        assert rel(shuffled[i], whole[i]) > CHANGED  # and a different label gives a different image


def test_model_calls_per_step():
    """w = 1: one call of n rows per step; w = 4: one doubled call (2n rows: the labels, then the
    null class) per step; w = 0: the unconditional call alone (the null class as a tensor of n: it
    was passed as the int null_class, which the model's embedding rejects), doubled again with a
    rescale (it reads the conditional output's std); with an interval, doubled only inside it."""
    model = tiny_unet()
    scheduler = SCHEDULERS["ddpm"]()
    scheduler.set_timesteps(STEPS)
    kw = dict(compat.sample_kwargs(scheduler), class_labels=torch.tensor([1, 2, 0]), null_class=K, seed=0,
              backend="reference")
    for w, rescale, want, labels in [(1.0, 0.0, N, [1, 2, 0]), (4.0, 0.0, 2 * N, [1, 2, 0, K, K, K]),
                                     (0.0, 0.0, N, [K, K, K]), (0.0, 0.5, 2 * N, [1, 2, 0, K, K, K])]:
        calls = Calls(model)
        fastddpm.sample(model, N, guidance_scale=w, guidance_rescale=rescale, **kw)
        assert calls.close() == [want] * STEPS, (w, calls.rows)
        assert calls.labels == [labels] * STEPS
    lo, hi = interval_of(scheduler)
    inside = [lo < level(scheduler.alphas_cumprod[int(t)]) <= hi for t in scheduler.timesteps]
    assert 0 < sum(inside) < STEPS
    calls = Calls(model)
    fastddpm.sample(model, N, guidance_scale=4.0, guidance_interval=(lo, hi), **kw)
    assert calls.close() == [2 * N if g else N for g in inside]


# ------------------------------------------------------- denoising-diffusion-pytorch's classifier-free guidance
def cfg_module():
    import_package()
    return importlib.import_module("denoising_diffusion_pytorch.classifier_free_guidance")


DDP_T = 40                 # its DDPM: every training step is a sampling step; a short schedule keeps CPU time down
DDIM_T, DDIM_S = 1000, 8   # its DDIM: 8 of 1000 (the package's truncation of linspace to int)


def cfg_diffusion(objective="pred_noise", ddim=False, **kw):
    """A tiny random CFG Unet in the package's GaussianDiffusion (weights from the test's fresh seed).

    For pred_x0 the Unet's final bias is raised by 1.5: its x0 predictions then pass the clip at 1
    in many pixels (so the clipping semantics are exercised), and the clipped pixels no longer feed
    the random network's chaos back into the loop: without it, at cond_scale 6 (which scales the
    rounding of the model output by up to 11), the final images differed by up to 1.6e-4 in about
    one seed of 25; with it, the worst of 30 seeds was 2.7e-6 (DESIGN.md, Numerics)."""
    cfg = cfg_module()
    unet = cfg.Unet(dim=8, dim_mults=(1, 2), num_classes=K, channels=3, attn_heads=2, attn_dim_head=8)
    if objective == "pred_x0":
        with torch.no_grad():
            unet.final_conv.bias.add_(1.5)
    return cfg.GaussianDiffusion(unet, image_size=8, timesteps=DDIM_T if ddim else DDP_T,
                                 sampling_timesteps=DDIM_S if ddim else None, objective=objective, **kw).eval()


def package_cfg_run(diffusion, classes, seed, **options):
    """What its sample() returns ([0, 1]) mapped back to model space: x = 2 images - 1. Its noise
    comes from torch's global generator: the stream of a CPU torch.Generator with the same seed."""
    torch.manual_seed(seed)
    return diffusion.sample(classes, **options) * 2 - 1


def our_cfg_run(diffusion, classes, seed, backend="reference", options=None, **extra):
    kw = {**compat.sample_kwargs(diffusion, **(options or {})), **extra}
    return fastddpm.sample(diffusion.model, classes.shape[0], class_labels=classes, **kw,
                           generator=torch.Generator().manual_seed(seed), backend=backend)


# (objective, ddim, extra GaussianDiffusion arguments, sample() options). Deterministic DDIM runs at
# cond_scale 3: at 6 the random Unet's loop is chaotic enough to come within 3.5x of the tolerance
# (worst of 30 seeds 2.9e-5; at 3: 1.1e-5). DDIM also has a floor of the package's own: its
# ddim_sample computes c = sqrt(1 - abar_next - sigma^2) in float32, which cancels at its first step
# from t = 999 (cosine, eta 1: c = 0 for 1.1e-4 with 4 sampling steps, a 1.2e-4 difference in the
# images; 2.441e-4 for 2.450e-4 with 8, within ~1e-6).
CFG_CASES = [
    ("pred_noise", False, {}, {}),
    ("pred_x0", False, {}, {}),
    ("pred_v", False, {"beta_schedule": "linear"}, {}),
    ("pred_noise", False, {}, {"cond_scale": 3.0, "rescaled_phi": 0.0}),
    ("pred_noise", False, {}, {"cond_scale": 0.0, "rescaled_phi": 0.5}),
    ("pred_noise", False, {"use_cfg_plus_plus": True}, {}),  # CFG++ changes nothing in its DDPM
    ("pred_noise", True, {}, {}),
    ("pred_x0", True, {}, {}),
    ("pred_v", True, {"beta_schedule": "linear"}, {"rescaled_phi": 0.0}),
    ("pred_noise", True, {"ddim_sampling_eta": 0.0}, {"cond_scale": 3.0}),
]


def _case_id(case):
    objective, ddim, dkw, options = case
    return "-".join([objective, "ddim" if ddim else "ddpm", *(f"{k}={v}" for k, v in {**dkw, **options}.items())])


@pytest.mark.parametrize("case", CFG_CASES, ids=_case_id)
def test_matches_denoising_diffusion_pytorch_cfg_sample(case):
    objective, ddim, dkw, options = case
    d = cfg_diffusion(objective, ddim, **dkw)
    classes = torch.randint(0, K, (N,))
    seed = int(torch.randint(0, 2**31, ()))
    want = package_cfg_run(d, classes, seed, **options)
    assert torch.isfinite(want).all()
    got = our_cfg_run(d, classes, seed, options=options)
    err = rel(got, want)
    print(f"denoising-diffusion-pytorch {_case_id(case)}: rel L2 {err:.2e}")
    assert err <= TOL, err


@pytest.mark.parametrize("ddim", [False, True])
def test_fused_matches_denoising_diffusion_pytorch_cfg_sample(ddim):
    d = cfg_diffusion("pred_noise", ddim)
    classes = torch.randint(0, K, (N,))
    want = package_cfg_run(d, classes, 5)
    err = rel(our_cfg_run(d, classes, 5, backend="fused"), want)
    print(f"denoising-diffusion-pytorch fused {'ddim' if ddim else 'ddpm'}: rel L2 {err:.2e}")
    assert err <= TOL, err


def test_cfg_kwargs_and_what_each_one_changes():
    """The mapping, and that each guidance keyword it sets moves the images far beyond the
    tolerance (a mapping that dropped one would fail the parity tests)."""
    d = cfg_diffusion("pred_noise", ddim=True)
    kw = compat.sample_kwargs(d)
    assert (kw["method"], kw["eta"], kw["prediction"], kw["clip"], kw["use_clipped_model_output"]) == \
        ("ddim", 1.0, "eps", 1.0, False)
    assert (kw["guidance_scale"], kw["guidance_rescale"], kw["guidance_parallel"]) == (6.0, 0.7, 0.0)
    assert kw["schedule"].timesteps.tolist() == compat.ddim_timesteps(DDIM_T, DDIM_S)
    assert compat.sample_kwargs(cfg_diffusion("pred_v", ddim=True))["use_clipped_model_output"] is True
    assert compat.sample_kwargs(d, cond_scale=2, rescaled_phi=0)["guidance_scale"] == 2.0
    classes = torch.randint(0, K, (N,))
    want = package_cfg_run(d, classes, 9)
    assert rel(our_cfg_run(d, classes, 9), want) <= TOL
    for change in ({"guidance_parallel": 1.0}, {"guidance_rescale": 0.0}, {"guidance_scale": 4.0},
                   {"use_clipped_model_output": True}):
        assert rel(our_cfg_run(d, classes, 9, **change), want) > CHANGED, change
    d = cfg_diffusion("pred_x0", ddim=True)  # its noise direction from the clipped x0 (least of 20 seeds: 1.7e-2)
    want = package_cfg_run(d, classes, 9)
    assert rel(our_cfg_run(d, classes, 9), want) <= TOL
    assert rel(our_cfg_run(d, classes, 9, use_clipped_model_output=False), want) > CHANGED


def test_cfg_what_cannot_be_honoured_is_refused():
    cfg = cfg_module()
    with pytest.raises(ValueError, match="cond_scale=1"):
        compat.sample_kwargs(cfg_diffusion(), cond_scale=1)
    with pytest.raises(ValueError, match="rescaled_phi"):
        compat.sample_kwargs(cfg_diffusion(), rescaled_phi=1.5)
    with pytest.raises(NotImplementedError, match="use_cfg_plus_plus"):
        compat.sample_kwargs(cfg_diffusion(ddim=True, use_cfg_plus_plus=True))
    with pytest.raises(TypeError, match="classifier_free_guidance"):
        compat.sample_kwargs(SCHEDULERS["ddpm"](), cond_scale=3)
    d = cfg_diffusion()
    d.objective = "pred_epsilon"
    with pytest.raises(NotImplementedError, match="objective"):
        compat.sample_kwargs(d)

    class Mine(cfg.GaussianDiffusion):
        def p_sample(self, *args, **kwargs):
            return super().p_sample(*args, **kwargs)

    with pytest.raises(NotImplementedError, match="p_sample"):
        compat.sample_kwargs(Mine(cfg_diffusion().model, image_size=8, timesteps=DDP_T))

    class MyUnet(cfg.Unet):
        def forward_with_cond_scale(self, *args, **kwargs):
            return super().forward_with_cond_scale(*args, **kwargs, remove_parallel_component=False)

    unet = MyUnet(dim=8, dim_mults=(1, 2), num_classes=K, channels=3, attn_heads=2, attn_dim_head=8)
    with pytest.raises(NotImplementedError, match="forward_with_cond_scale"):
        compat.sample_kwargs(cfg.GaussianDiffusion(unet, image_size=8, timesteps=DDP_T))

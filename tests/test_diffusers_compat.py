"""Drop-in for diffusers users: the same images as diffusers' loops and pipelines, with
generator= noise; options fastddpm cannot honour are refused; seed= noise reproduces anywhere."""
import math

import pytest
import torch

import fastddpm
from fastddpm import Schedule, compat
from fastddpm.testing import GaussianDataModel

diffusers = pytest.importorskip("diffusers")


def tiny_unet(out_channels=3):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1,
                                 block_out_channels=(16, 16), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@torch.no_grad()
def diffusers_loop(model, sched, n, gen, shape=(3, 8, 8), **step_kw):
    """DDPMPipeline / DDIMPipeline's loop, before the conversion to [0, 1]."""
    x = torch.randn((n, *shape), generator=gen)
    for t in sched.timesteps:
        out = model(x, t)
        out = out.sample if hasattr(out, "sample") else out
        x = sched.step(out, t, x, generator=gen, **step_kw).prev_sample
    return x


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("variance,clip,steps", [("fixed_small", True, 1000), ("fixed_large", False, 1000),
                                                 ("fixed_small", False, 50), ("fixed_large", True, 50)])
def test_generator_mode_matches_the_diffusers_ddpm_loop(variance, clip, steps):
    unet = tiny_unet()
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type=variance, clip_sample=clip)
    sched.set_timesteps(steps)
    want = diffusers_loop(unet, sched, 2, torch.Generator().manual_seed(0))
    got = fastddpm.sample(unet, 2, **compat.sample_kwargs(sched), generator=torch.Generator().manual_seed(0))
    assert rel_l2(got, want) < 1e-4


def test_learned_range_and_v_prediction_match_diffusers():
    unet = tiny_unet(out_channels=6)
    sched = diffusers.DDPMScheduler(variance_type="learned_range", prediction_type="v_prediction")
    sched.set_timesteps(50)
    want = diffusers_loop(unet, sched, 2, torch.Generator().manual_seed(3))
    got = fastddpm.sample(unet, 2, **compat.sample_kwargs(sched), generator=torch.Generator().manual_seed(3))
    assert rel_l2(got, want) < 1e-4


def test_matches_ddpm_and_ddim_pipelines():
    """The pipelines themselves (their output is in [0, 1], NHWC with output_type="np")."""
    unet = tiny_unet()
    cases = [(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()), {}),
             (diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()), {"eta": 1.0})]
    for pipe, kw in cases:
        pipe.set_progress_bar_config(disable=True)
        want = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=50,
                    output_type="np", **kw).images
        got = fastddpm.sample(unet, 2, **compat.sample_kwargs(pipe.scheduler), **kw,
                              generator=torch.Generator().manual_seed(1))
        got01 = (got / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        assert (got01 - torch.as_tensor(want)).abs().max() < 1e-4, type(pipe).__name__


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_eta1_matches_diffusers(spacing):
    unet = tiny_unet()
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    sched.set_timesteps(50)
    want = diffusers_loop(unet, sched, 2, torch.Generator().manual_seed(5), eta=1.0)
    got = fastddpm.sample(unet, 2, **compat.sample_kwargs(sched), eta=1.0, generator=torch.Generator().manual_seed(5))
    assert rel_l2(got, want) < 1e-4


def test_ddim_eta0_matches_diffusers_on_exact_gaussian_eps():
    """Deterministic DDIM is chaotic on a random U-Net (DESIGN.md, Numerics): compare on a model
    whose eps is exact for Gaussian data, where the loop is well conditioned."""
    base = Schedule.linear(1000)
    shape = (2, 3, 3)
    model = GaussianDataModel(base, torch.linspace(-0.5, 0.5, 18).reshape(shape),
                              torch.linspace(0.2, 0.9, 18).reshape(shape))
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    sched.set_timesteps(50)
    want = diffusers_loop(model, sched, 16, torch.Generator().manual_seed(6), shape=shape, eta=0.0)
    got = fastddpm.sample(model, 16, shape=shape, **compat.sample_kwargs(sched),
                          generator=torch.Generator().manual_seed(6))
    assert rel_l2(got, want) < 1e-4


def test_final_step_noise_is_the_one_documented_difference():
    """Trailing spacing ends at timestep 19 > 0: diffusers adds sqrt(beta) z there with fixed_large,
    fastddpm adds no noise at its final step. Everything else is equal."""
    unet = tiny_unet()
    sched = diffusers.DDPMScheduler(variance_type="fixed_large", timestep_spacing="trailing")
    sched.set_timesteps(25)
    assert int(sched.timesteps[-1]) > 0
    gen = torch.Generator().manual_seed(7)
    x = torch.randn((2, 3, 8, 8), generator=gen)
    with torch.no_grad():
        for t in sched.timesteps[:-1]:
            x = sched.step(unet(x, t).sample, t, x, generator=gen).prev_sample
        state = gen.get_state()
        t = sched.timesteps[-1]
        want = sched.step(unet(x, t).sample, t, x, generator=gen).prev_sample
    z = torch.randn((2, 3, 8, 8), generator=torch.Generator().set_state(state))
    s = Schedule.from_diffusers(sched)
    got = fastddpm.sample(unet, 2, **compat.sample_kwargs(sched), generator=torch.Generator().manual_seed(7))
    assert rel_l2(got, want - s.betas[0].sqrt().float() * z) < 1e-4
    assert rel_l2(got, want) > 1e-2


def test_seed_mode_same_images_for_any_batch_size_and_backend():
    unet = tiny_unet()
    s = Schedule.linear(1000)
    a = fastddpm.sample(unet, 8, schedule=s, steps=10, seed=11, batch_size=8)
    b = fastddpm.sample(unet, 8, schedule=s, steps=10, seed=11, batch_size=3)
    c = fastddpm.sample(unet, 8, schedule=s, steps=10, seed=11, batch_size=3, backend="fused")
    # The noise is bit-identical for any batch (tests/test_rng.py, test_ops.py); the U-Net's
    # convolutions are not: oneDNN picks batch-dependent algorithms, so images agree to float
    # rounding, not bit for bit.
    assert rel_l2(b, a) < 1e-4
    assert rel_l2(c, b) < 1e-5
    assert rel_l2(a, fastddpm.sample(unet, 8, schedule=s, steps=10, seed=12)) > 0.1


def test_contradicting_options_are_refused():
    unet = tiny_unet()
    sched = diffusers.DDPMScheduler(prediction_type="v_prediction", clip_sample=False, variance_type="fixed_large")
    s = Schedule.from_diffusers(sched)
    assert s.source_options == {"prediction": "v", "clip": None, "method": "ddpm", "variance": "fixed_large"}
    with pytest.raises(ValueError, match="prediction='eps' contradicts"):
        fastddpm.sample(unet, 1, schedule=s, clip=None, variance="fixed_large")
    with pytest.raises(ValueError, match="clip=1.0 contradicts"):
        fastddpm.sample(unet, 1, schedule=s, prediction="v", variance="fixed_large")
    with pytest.raises(ValueError, match="variance='fixed_small' contradicts"):
        fastddpm.sample(unet, 1, schedule=s, prediction="v", clip=None)
    assert s.respace(10).source_options == s.source_options
    with pytest.raises(NotImplementedError, match="variance_type='learned'"):
        Schedule.from_diffusers(diffusers.DDPMScheduler(variance_type="learned"))


def test_load_diffusers_unet_offline(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(str(tmp_path / "unet"), safe_serialization=True)
    loaded = compat.load_diffusers_unet(str(tmp_path / "unet"))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 500])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, unet(x, t).sample)
    with pytest.raises(FileNotFoundError, match="config.json"):
        compat.load_diffusers_unet(str(tmp_path))


def test_fastddpm_unet_checkpoint_recipe(tmp_path):
    """The README's recipe: save a fastddpm UNet with its schedule and prediction, load it back."""
    from fastddpm.checkpoint import save_model, schedule_meta

    unet = fastddpm.UNet.from_preset("tiny").eval()
    path = str(tmp_path / "my-unet.safetensors")
    save_model(unet, path, arch="unet", schedule=schedule_meta("cosine", 1000), prediction="v")
    loaded = fastddpm.load(path)
    assert loaded.fastddpm_prediction == "v" and math.isclose(
        float(loaded.fastddpm_schedule.alphas_cumprod[500]), float(Schedule.cosine(1000).alphas_cumprod[500]))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 500])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), unet(x, t))

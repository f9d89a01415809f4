"""Schedules against closed forms, float64 accuracy of the device tables, respacing, diffusers parity."""
import math

import numpy as np
import pytest
import torch

from fastddpm import Schedule
from fastddpm.schedule import ROW


def test_linear_closed_form():
    s = Schedule.linear(1000, 1e-4, 0.02)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    torch.testing.assert_close(s.betas, torch.tensor(betas, dtype=torch.float64), rtol=1e-12, atol=0)
    for t in (0, 1, 17, 500, 999):
        abar = math.prod(1 - b for b in betas[: t + 1])
        assert s.alphas_cumprod[t].item() == pytest.approx(abar, rel=1e-12)
    assert s.alphas_cumprod_prev[0] == 1.0
    assert s.num_steps == 1000 and s.timesteps.tolist() == list(range(1000))
    assert s.alphas_cumprod.dtype == torch.float64


def test_cosine_closed_form():
    T, off = 1000, 0.008
    s = Schedule.cosine(T)
    f = lambda u: math.cos((u + off) / (1 + off) * math.pi / 2) ** 2  # noqa: E731
    # abar_t = f((t+1)/T) / f(0) wherever no beta was capped at 0.999 (all but the last steps)
    for t in (0, 1, 100, 500, 900, 990):
        assert s.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-10)
    assert s.betas.max().item() <= 0.999 + 1e-15
    assert s.betas[-1].item() == pytest.approx(0.999)


def test_posterior_quantities_match_ho_eq7():
    s = Schedule.linear(200)
    t = 57
    beta, abar, abar_prev = s.betas[t].item(), s.alphas_cumprod[t].item(), s.alphas_cumprod[t - 1].item()
    assert s.posterior_variance[t].item() == pytest.approx(beta * (1 - abar_prev) / (1 - abar), rel=1e-12)
    assert s.posterior_mean_coef1[t].item() == pytest.approx(beta * math.sqrt(abar_prev) / (1 - abar), rel=1e-12)
    assert s.posterior_mean_coef2[t].item() == pytest.approx((1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar),
                                                             rel=1e-12)
    assert s.posterior_variance[0].item() == 0.0


def test_device_table_is_float64_rounded_once():
    """1 - abar near t = 0 must come from float64: a float32 computation is off by ~1e-4 relative."""
    s = Schedule.linear(1000)
    tab = s.table("cpu")
    assert tab.dtype == torch.float32 and tab.shape == (len(ROW), 1000)
    exact = (1 - s.alphas_cumprod).sqrt()
    got = tab[ROW["sqrt_one_minus_abar"]].double()
    assert ((got - exact).abs() / exact).max() < 1e-7
    naive = (1 - s.alphas_cumprod.float()).sqrt().double()
    assert ((naive - exact).abs() / exact)[:5].max() > 1e-5  # the error the float64 path avoids
    assert s.table("cpu") is tab  # built once per device


def test_respace_matches_diffusers_set_timesteps():
    diffusers = pytest.importorskip("diffusers")
    base = Schedule.linear(1000)
    for spacing in ("leading", "trailing", "linspace"):
        for k in (1, 7, 50, 1000):
            sched = diffusers.DDPMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
            sched.set_timesteps(k)
            r = base.respace(k, spacing)
            assert r.timesteps.tolist() == sorted(sched.timesteps.tolist()), (spacing, k)
            torch.testing.assert_close(r.alphas_cumprod, base.alphas_cumprod[r.timesteps])
            abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), r.alphas_cumprod[:-1]])
            torch.testing.assert_close(r.betas, 1 - r.alphas_cumprod / abar_prev)


def test_respace_composes_and_validates():
    s = Schedule.linear(1000).respace(100, "leading")
    s2 = s.respace(10, "leading")
    assert s2.timesteps.tolist() == list(range(0, 1000, 100))
    with pytest.raises(ValueError, match="spacing"):
        s.respace(10, "cubic")
    with pytest.raises(ValueError, match="exceeds"):
        s.respace(101)
    with pytest.raises(ValueError, match="num_steps"):
        s.respace(0)


@pytest.mark.parametrize("bad", [[0.1, 0.0], [0.5, 1.0], [float("nan")], [-0.1], [[0.1, 0.2]], []])
def test_from_betas_rejects_bad_betas(bad):
    with pytest.raises(ValueError, match="betas"):
        Schedule.from_betas(bad)


def test_from_betas_types():
    a = Schedule.from_betas(np.linspace(1e-4, 0.02, 10))
    b = Schedule.from_betas(torch.linspace(1e-4, 0.02, 10, dtype=torch.float64))
    torch.testing.assert_close(a.alphas_cumprod, b.alphas_cumprod)
    with pytest.raises(TypeError, match="betas"):
        Schedule.from_betas("abc")


def test_from_diffusers_betas_and_respacing():
    diffusers = pytest.importorskip("diffusers")
    for kw in (dict(beta_schedule="linear"), dict(beta_schedule="squaredcos_cap_v2"),
               dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)):
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000, **kw)
        s = Schedule.from_diffusers(sched)
        torch.testing.assert_close(s.betas, sched.betas.double(), rtol=1e-12, atol=0)
        torch.testing.assert_close(s.alphas_cumprod, sched.alphas_cumprod.double(), rtol=2e-5, atol=0)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, steps_offset=1)
    sched.set_timesteps(50)
    s = Schedule.from_diffusers(sched)
    assert s.timesteps.tolist() == sorted(sched.timesteps.tolist())
    assert s.num_steps == 50 and s.num_train_timesteps == 1000


def test_from_diffusers_refuses_what_it_cannot_honour():
    diffusers = pytest.importorskip("diffusers")
    with pytest.raises(NotImplementedError, match="thresholding"):
        Schedule.from_diffusers(diffusers.DDPMScheduler(thresholding=True))
    with pytest.raises(NotImplementedError, match="set_alpha_to_one"):
        Schedule.from_diffusers(diffusers.DDIMScheduler(set_alpha_to_one=False))
    sched = diffusers.DDIMScheduler(timestep_spacing="linspace")
    sched.set_timesteps(30)
    with pytest.raises(NotImplementedError, match="spacing"):
        Schedule.from_diffusers(sched)
    with pytest.raises(TypeError, match="scheduler"):
        Schedule.from_diffusers(object())

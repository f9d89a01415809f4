"""Fused ops == reference math, with the same noise, on fresh random inputs.

Runs the Triton kernels under TRITON_INTERPRET=1 on the CPU (conftest sets it) and,
unchanged, compiled on a GPU. Output buffers are poisoned with NaN before each launch.
"""
import itertools
import math
import warnings

import pytest
import torch

from fastddpm import Schedule, diffusion, ops, rng
from op_checks import close, dev, poisoned

SHAPES = [(3, 3, 17, 29), (7, 4, 8, 8), (2, 1, 5, 3)]
TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}  # same half input on both sides


@pytest.fixture(scope="module")
def sched():
    return Schedule.linear(1000).respace(250, "trailing")


@pytest.fixture(autouse=True, scope="module")
def require_kernels():
    if ops.backend_for(torch.empty(1, device="cuda" if torch.cuda.is_available() else "cpu")) == "reference":
        pytest.skip("Triton kernels cannot run here (no CUDA and TRITON_INTERPRET unset)")


def mixed_t(s, B):
    t = torch.randint(0, s.num_steps, (B,), device=dev())
    t[0] = 0
    t[-1] = s.num_steps - 1
    return t


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prediction,variance,clip,noise_mode,t_kind", list(itertools.product(
    ["eps", "x0", "v"], ["fixed_small", "fixed_large", "learned_range"], [None, 1.0], ["tensor", "seed"],
    ["mixed", "int"])))
def test_ddpm_step_equals_reference(sched, shape, prediction, variance, clip, noise_mode, t_kind):
    B, C = shape[:2]
    x = torch.randn(shape, device=dev())
    mo = torch.randn(B, 2 * C if variance == "learned_range" else C, *shape[2:], device=dev())
    if variance == "learned_range":
        mo[:, C:].uniform_(-1, 1)
    t = mixed_t(sched, B) if t_kind == "mixed" else int(torch.randint(1, sched.num_steps, ()))
    kw = dict(prediction=prediction, variance=variance, clip=clip)
    if noise_mode == "tensor":
        z = torch.randn(shape, device=dev())
        want, want_x0 = diffusion.ddpm_step(sched, x, t, mo, z, return_x0=True, **kw)
        out = poisoned(shape)
        got, got_x0 = ops.ddpm_step(sched, x, t, mo, z, return_x0=True, out=out, **kw)
        assert got is out
    else:
        want, want_x0 = diffusion.ddpm_step(sched, x, t, mo, seed=17, sample_offset=5, return_x0=True, **kw)
        got, got_x0 = ops.ddpm_step(sched, x, t, mo, seed=17, sample_offset=5, return_x0=True, out=poisoned(shape),
                                    **kw)
    assert got.dtype == torch.float32 and got.shape == shape
    close(got, want, 1e-5)
    close(got_x0, want_x0, 1e-5)


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("prediction,eta,clip,noise_mode", list(itertools.product(
    ["eps", "x0", "v"], [0.0, 0.3, 1.0], [None, 1.0], ["tensor", "seed"])))
def test_ddim_step_equals_reference(sched, shape, prediction, eta, clip, noise_mode):
    x, mo, z = (torch.randn(shape, device=dev()) for _ in range(3))
    t = mixed_t(sched, shape[0])
    kw = dict(eta=eta, prediction=prediction, clip=clip)
    if noise_mode == "tensor":
        want = diffusion.ddim_step(sched, x, t, mo, z, **kw)
        got = ops.ddim_step(sched, x, t, mo, z, out=poisoned(shape), **kw)
    else:
        want = diffusion.ddim_step(sched, x, t, mo, seed=3, **kw)
        got = ops.ddim_step(sched, x, t, mo, seed=3, out=poisoned(shape), **kw)
    close(got, want, 1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prediction,eta,clip,noise_mode", [
    ("eps", 0.0, 1.0, "tensor"), ("eps", 1.0, 1.0, "seed"), ("x0", 0.3, 1.0, "tensor"), ("v", 0.0, 1.0, "seed"),
    ("v", 1.0, None, "tensor"), ("eps", 0.0, None, "seed")])
def test_ddim_use_clipped_model_output_equals_reference(sched, shape, prediction, eta, clip, noise_mode):
    """The kernel's USE_CLIPPED variant: eps re-derived from the clipped x0, x0 written too."""
    x = torch.randn(shape, device=dev()) * 2
    mo = torch.randn(shape, device=dev())
    t = mixed_t(sched, shape[0])
    kw = dict(eta=eta, prediction=prediction, clip=clip, use_clipped_model_output=True, return_x0=True)
    noise = dict(noise=torch.randn(shape, device=dev())) if noise_mode == "tensor" else dict(seed=9, sample_offset=2)
    want, want_x0 = diffusion.ddim_step(sched, x, t, mo, **noise, **kw)
    got, got_x0 = ops.ddim_step(sched, x, t, mo, **noise, out=poisoned(shape), **kw)
    close(got, want, 1e-5)
    close(got_x0, want_x0, 1e-5)
    if clip is not None:  # the variant really re-derives eps (visible at mid-schedule steps)
        mid = dict(noise, noise=None, seed=0) if noise_mode == "tensor" else noise
        a, b = (ops.ddim_step(sched, x, sched.num_steps // 8, mo, **mid, eta=eta, prediction=prediction, clip=clip,
                              use_clipped_model_output=flag) for flag in (True, False))
        assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ddim_use_clipped_half_precision_model_output(sched, dtype):
    shape = (3, 3, 17, 29)
    x = torch.randn(shape, device=dev()) * 2
    mo32 = torch.randn(shape, device=dev())
    t = mixed_t(sched, 3)
    kw = dict(seed=1, eta=0.5, use_clipped_model_output=True)
    got = ops.ddim_step(sched, x, t, mo32.to(dtype), out=poisoned(shape), **kw)
    close(got, diffusion.ddim_step(sched, x, t, mo32.to(dtype), **kw), TOL[dtype])
    close(got, diffusion.ddim_step(sched, x, t, mo32, **kw), 1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_half_precision_model_outputs(sched, dtype, variance):
    shape = (3, 3, 17, 29)
    x = torch.randn(shape, device=dev())
    mo32 = torch.randn(3, 6 if variance == "learned_range" else 3, 17, 29, device=dev())
    mo32[:, 3:].clamp_(-1, 1)
    mo = mo32.to(dtype)
    t = mixed_t(sched, 3)
    got = ops.ddpm_step(sched, x, t, mo, seed=1, variance=variance, out=poisoned(shape))
    assert got.dtype == torch.float32
    close(got, diffusion.ddpm_step(sched, x, t, mo, seed=1, variance=variance), TOL[dtype])
    # against the float32 model output: the half-precision rounding of the input, no more
    close(got, diffusion.ddpm_step(sched, x, t, mo32, seed=1, variance=variance), 1e-2)
    close(ops.ddim_step(sched, x, t, mo[:, :3], seed=1, eta=0.5),
          diffusion.ddim_step(sched, x, t, mo[:, :3], seed=1, eta=0.5), TOL[dtype])


def test_strided_and_channels_last_inputs(sched):
    B, C, H, W = 4, 3, 9, 13
    t = mixed_t(sched, B)
    big = torch.randn(2 * B, C, H, W, device=dev())
    x_batch_strided = big[::2]                                    # batch stride only: no copy needed
    x_transposed = torch.randn(B, C, W, H, device=dev()).transpose(2, 3)  # odd layout: copied
    mo_cl = torch.randn(B, 2 * C, H, W, device=dev()).contiguous(memory_format=torch.channels_last)
    mo_cl[:, C:].clamp_(-1, 1)
    for x in (x_batch_strided, x_transposed, x_batch_strided.contiguous(memory_format=torch.channels_last)):
        for mo in (mo_cl, mo_cl.contiguous()):
            for variance in ("fixed_small", "learned_range"):
                m = mo if variance == "learned_range" else mo[:, :C]
                want = diffusion.ddpm_step(sched, x, t, m, seed=9, variance=variance)
                close(ops.ddpm_step(sched, x, t, m, seed=9, variance=variance), want, 1e-5)
    x_cl = x_batch_strided.contiguous(memory_format=torch.channels_last)
    got = ops.ddpm_step(sched, x_cl, t, mo_cl[:, :C], seed=9)
    assert got.is_contiguous(memory_format=torch.channels_last)  # the state keeps its layout


def test_in_place_update_and_int_vs_tensor_t(sched):
    x, mo, z = (torch.randn(5, 2, 6, 7, device=dev()) for _ in range(3))
    want = diffusion.ddpm_step(sched, x, 40, mo, z)
    y = x.clone()
    ops.ddpm_step(sched, y, 40, mo, z, out=y)
    close(y, want, 1e-5)
    close(ops.ddpm_step(sched, x, torch.full((5,), 40, device=dev()), mo, z), want, 1e-5)


def test_step_zero_ignores_noise(sched):
    x, mo = torch.randn(3, 2, 4, 4, device=dev()), torch.randn(3, 2, 4, 4, device=dev())
    nan = torch.full_like(x, float("nan"))
    t = torch.tensor([0, 3, 0], device=dev())
    out = ops.ddpm_step(sched, x, t, mo, nan, variance="fixed_large")
    assert torch.isfinite(out[[0, 2]]).all() and torch.isnan(out[1]).all()
    close(ops.ddpm_step(sched, x, 0, mo), diffusion.ddpm_step(sched, x, 0, mo), 1e-5)


@pytest.mark.parametrize("shape", [(5, 3, 17, 29), (4, 7), (6,)])
def test_q_sample_equals_reference(sched, shape):
    x0, z = torch.randn(shape, device=dev()), torch.randn(shape, device=dev())
    t = mixed_t(sched, shape[0])
    close(ops.q_sample(sched, x0, t, z), diffusion.q_sample(sched, x0, t, z), 1e-6)
    got, got_z = ops.q_sample(sched, x0, t, seed=21, sample_offset=3)
    want, want_z = diffusion.q_sample(sched, x0, t, seed=21, sample_offset=3)
    close(got, want, 1e-6)
    close(got_z, want_z, 1e-6)


# ---------------------------------------------------------------------------- in-kernel noise
def kernel_step_noise(s, B, shape, t, seed, offset):
    """The kernel's step noise: with x = 0 and eps = 0 (clip off), ddpm_step returns std_t * z."""
    zero = torch.zeros(B, *shape, device=dev())
    out = ops.ddpm_step(s, zero, t, zero, seed=seed, sample_offset=offset, clip=None)
    t_ = t if isinstance(t, int) else t.cpu()
    std = s.table("cpu")[6][t_].view(-1, *([1] * len(shape))).to(dev())
    return out / std


def test_kernel_noise_statistics_and_independence(sched):
    z = kernel_step_noise(sched, 64, (3, 16, 16), 100, seed=5, offset=0).flatten(1)  # (64, 768)
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    other_step = kernel_step_noise(sched, 64, (3, 16, 16), 101, seed=5, offset=0).flatten(1)
    for a, b in ((z[:-1], z[1:]), (z, other_step), (z[:, :-1], z[:, 1:])):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(a.numel()), r


def test_kernel_noise_same_in_batch_of_1_or_7(sched):
    batch = kernel_step_noise(sched, 7, (3, 5, 7), torch.full((7,), 60, device=dev()), seed=8, offset=10)
    for i in range(7):
        single = kernel_step_noise(sched, 1, (3, 5, 7), 60, seed=8, offset=10 + i)
        torch.testing.assert_close(single[0], batch[i], rtol=0, atol=0)


def test_kernel_noise_equals_torch_philox(sched):
    """The pure-PyTorch stream reproduces the kernels' in-kernel noise (integer part bit-exact)."""
    shape = (3, 17, 29)
    x0 = torch.zeros(6, *shape, device=dev())
    _, z = ops.q_sample(sched, x0, 0, seed=2**40 + 7, sample_offset=123)
    want = rng.normal(2**40 + 7, torch.arange(123, 129), rng.TAG_Q_SAMPLE, math.prod(shape), device=dev())
    torch.testing.assert_close(z.reshape(6, -1), want, rtol=1e-6, atol=1e-6)
    cl = x0.contiguous(memory_format=torch.channels_last)
    _, z_cl = ops.q_sample(sched, cl, 0, seed=2**40 + 7, sample_offset=123)
    torch.testing.assert_close(z_cl.contiguous().reshape(6, -1), want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- errors and fallback
def test_argument_errors(sched):
    x = torch.randn(2, 3, 4, 4, device=dev())
    with pytest.raises(TypeError, match="use_clipped_model_output must be True or False; got 'yes'"):
        ops.ddim_step(sched, x, 3, x, use_clipped_model_output="yes")
    with pytest.raises(ValueError, match="out must have shape"):
        ops.ddpm_step(sched, x, 3, x, x, out=torch.empty(2, 3, 4, device=dev()))
    with pytest.raises(TypeError, match="out must be float32"):
        ops.ddpm_step(sched, x, 3, x, x, out=torch.empty_like(x, dtype=torch.float16))
    with pytest.raises(ValueError, match="sample_offset"):
        ops.ddpm_step(sched, x, 3, x, seed=1, sample_offset=2**32 - 1)
    with pytest.raises(ValueError, match="0..249"):
        ops.ddim_step(sched, x, torch.tensor([0, 250], device=dev()), x)
    with pytest.raises(ValueError, match="model_output"):
        ops.ddpm_step(sched, x, 3, x, x, variance="learned_range")
    with pytest.raises(ValueError, match="noise is required"):
        ops.q_sample(sched, x, 3)


def test_reference_fallback_notice(sched, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the fallback is for machines without CUDA")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(ops, "_notified", False)
    x, mo, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1"):
        got = ops.ddpm_step(sched, x, 3, mo, z)
    torch.testing.assert_close(got, diffusion.ddpm_step(sched, x, 3, mo, z))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.ddpm_step(sched, x, 3, mo, z)  # once only


@pytest.mark.gpu
def test_int64_offsets_beyond_2_31_elements():
    """A batch whose flat size exceeds 2**31 elements (the output alone is 9 GiB)."""
    s = Schedule.linear(1000)
    n = 2**28  # elements per sample; 9 samples -> 2.4e9 elements
    one = torch.randn(1, 1, n, device="cuda")
    x = one.expand(9, 1, n)  # batch stride 0: no memory
    out = torch.full((9, 1, n), float("nan"), device="cuda")
    t = torch.full((9,), 500, device="cuda")
    ops.ddpm_step(s, x, t, x, seed=1, out=out)
    assert torch.isfinite(out[8]).all()
    want_last = diffusion.ddpm_step(s, one, 500, one, seed=1, sample_offset=8)
    torch.testing.assert_close(out[8:], want_last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["contig", "channels_last"])
def test_large_samples_take_the_long_block_path(sched, layout):
    """Samples above 8192 elements launch 4096-element blocks (kernels/common.py launch_config);
    3 x 61 x 67 = 12261 elements: three blocks, the last one partial."""
    from fastddpm.kernels.common import launch_config

    shape = (2, 3, 61, 67)
    assert launch_config(3 * 61 * 67)[0] == 4096
    x, mo = torch.randn(shape, device=dev()), torch.randn(shape, device=dev())
    if layout == "channels_last":
        x, mo = x.contiguous(memory_format=torch.channels_last), mo.contiguous(memory_format=torch.channels_last)
    t = torch.tensor([0, 77], device=dev())
    close(ops.ddpm_step(sched, x, t, mo, seed=4, out=poisoned(shape).contiguous(memory_format=torch.channels_last)
                        if layout == "channels_last" else poisoned(shape)),
          diffusion.ddpm_step(sched, x, t, mo, seed=4), 1e-5)
    got, z = ops.q_sample(sched, x, t, seed=6)
    want, zw = diffusion.q_sample(sched, x, t, seed=6)
    close(got, want, 1e-6)
    close(z, zw, 1e-6)


def test_out_in_another_layout_than_x(sched):
    shape = (2, 3, 5, 7)
    x, mo = torch.randn(shape, device=dev()), torch.randn(shape, device=dev())
    want = diffusion.ddpm_step(sched, x, 9, mo, seed=1)
    for xx, out in ((x, poisoned(shape).contiguous(memory_format=torch.channels_last)),
                    (x.contiguous(memory_format=torch.channels_last), poisoned(shape)),
                    (x, poisoned((2, 3, 7, 5)).transpose(2, 3))):
        got = ops.ddpm_step(sched, xx, 9, mo, seed=1, out=out)
        assert got is out
        close(out, want, 1e-5)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_non_finite_model_output_stays_non_finite_under_clipping(sched, method):
    """torch.clamp keeps NaN; a plain min/max in the kernel would turn it into the bound and
    hide a broken model from the sampler's non-finite check."""
    x, mo = torch.randn(3, 2, 4, 5, device=dev()), torch.randn(3, 2, 4, 5, device=dev())
    mo[0, 1, 2, 3] = float("nan")
    mo[2, 0, 0, 0] = float("inf")
    fn_ops, fn_ref = (ops.ddpm_step, diffusion.ddpm_step) if method == "ddpm" else (ops.ddim_step, diffusion.ddim_step)
    got, want = fn_ops(sched, x, 40, mo, seed=3), fn_ref(sched, x, 40, mo, seed=3)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[0, 1, 2, 3])
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    close(got[fin], want[fin], 1e-5)


@pytest.mark.parametrize("layout", ["contig", "channels_last"])
def test_device_side_noise_arguments_and_non_finite_flag(sched, layout):
    """The captured loop's launch path: seed and first sample read from an int64 device tensor,
    t per sample from a device tensor, a first-bad-step flag raised by atomic max."""
    from fastddpm.kernels.noise import normal_forward
    from fastddpm.kernels.step import step_forward

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    seed, first = 2**37 + 12345, 2**31 + 3
    args = torch.tensor([seed & 0xFFFFFFFF, seed >> 32, first], device=dev())
    x = torch.randn(4, 3, 5, 7, device=dev()).contiguous(memory_format=fmt)
    mo = torch.randn(4, 3, 5, 7, device=dev()).contiguous(memory_format=fmt)
    t = torch.full((4,), 70, device=dev())
    flag = torch.full((), -1, dtype=torch.long, device=dev())
    kw = dict(ddim=False, eta=0.0, prediction="eps", variance="fixed_small", clip=1.0, seed=None, sample_offset=0,
              return_x0=False)
    out = poisoned(x.shape).contiguous(memory_format=fmt)
    step_forward(sched, x, t, mo, None, **kw, out=out, rng=args, flag=flag)
    close(out, diffusion.ddpm_step(sched, x, 70, mo, seed=seed, sample_offset=first), 1e-5)
    assert int(flag) == -1
    for step, bad in ((70, 2), (90, 1), (30, 3)):  # the flag keeps the largest (first) bad step
        mo2 = mo.clone()
        mo2[bad, 0, 1, 1] = float("nan")
        step_forward(sched, x, torch.full((4,), step, device=dev()), mo2, None, **kw, out=out, rng=args, flag=flag)
    assert int(flag) == 90
    z = poisoned(x.shape).contiguous(memory_format=fmt)
    normal_forward(z, rng.TAG_INIT, rng=args)
    close(z, rng.normal_like(x, seed, first, rng.TAG_INIT), 1e-5)
    normal_forward(z, 5, seed=seed, sample_offset=first)
    close(z, rng.normal_like(x, seed, first, 5), 1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 3, 17, 29), (2, 5, 6, 2), (1, 4, 1, 3)])
@pytest.mark.parametrize("seed,offset", [(11, 0), (2**63 + 2**40 + 7, 2**32 - 2)])
def test_channels_last_kernel_noise_is_the_stream(sched, shape, seed, offset):
    """The channels_last walk draws the stream of logical element c * HW + hw: with HW % 4 == 0
    one Philox counter per run of 4 pixels (all 4 outputs used), else one per element. The
    integer part is bit-exact, so the noise equals fastddpm.rng to float32 rounding of the
    transcendentals (~1e-6); seeds and offsets past 2**31 (sent to the kernel as int32 bit
    patterns) included."""
    from fastddpm.kernels.noise import normal_forward

    B = shape[0]
    offset = min(offset, 2**32 - B)
    x0 = torch.randn(shape, device=dev()).contiguous(memory_format=torch.channels_last)
    _, z = ops.q_sample(sched, x0, 3, seed=seed, sample_offset=offset)
    assert z.is_contiguous(memory_format=torch.channels_last) or shape[1] == 1 or shape[2] * shape[3] == 1
    torch.testing.assert_close(z, rng.normal_like(x0, seed, offset, rng.TAG_Q_SAMPLE), rtol=2e-6, atol=2e-6)
    out = poisoned(shape).contiguous(memory_format=torch.channels_last)
    normal_forward(out, rng.TAG_INIT, seed=seed, sample_offset=offset)
    torch.testing.assert_close(out, rng.normal_like(x0, seed, offset, rng.TAG_INIT), rtol=2e-6, atol=2e-6)
    contig = normal_forward(poisoned(shape), rng.TAG_INIT, seed=seed, sample_offset=offset)
    torch.testing.assert_close(out, contig, rtol=0, atol=0)  # one stream, whatever the layout


@pytest.mark.parametrize("kind", ["0-d", "strided", "int32"])
@pytest.mark.parametrize("layout", ["contig", "channels_last"])
def test_t_0d_strided_and_int32_tensors(sched, kind, layout):
    """check_t hands the kernels a contiguous int64 t (B,): a 0-d t used to reach them as a
    stride-0 view and a strided t as is, while they read t_ptr + b (off by 1.86 relative;
    q_sample segfaulted under the interpreter)."""
    B, shape = 5, (5, 3, 6, 7)
    x = torch.randn(shape, device=dev())
    mo = torch.randn(shape, device=dev())
    x0 = torch.randn(shape, device=dev())
    if layout == "channels_last":
        x, mo, x0 = (a.contiguous(memory_format=torch.channels_last) for a in (x, mo, x0))
    if kind == "0-d":
        t = torch.tensor(sched.num_steps - 2, device=dev())
    elif kind == "strided":
        t = torch.randint(1, sched.num_steps, (2 * B,), device=dev())[::2]
    else:
        t = torch.randint(1, sched.num_steps, (B,), device=dev(), dtype=torch.int32)
    t_ref = t.long().expand(B).clone()
    got = ops.ddpm_step(sched, x, t, mo, seed=4, sample_offset=2)
    close(got, diffusion.ddpm_step(sched, x, t_ref, mo, seed=4, sample_offset=2), 1e-5)
    got = ops.ddim_step(sched, x, t, mo, eta=0.5, seed=4)
    close(got, diffusion.ddim_step(sched, x, t_ref, mo, eta=0.5, seed=4), 1e-5)
    xt, z = ops.q_sample(sched, x0, t, seed=9)
    close(xt, diffusion.q_sample(sched, x0, t_ref, z), 1e-5)
    close(z, rng.normal_like(x0, 9, 0, rng.TAG_Q_SAMPLE), 2e-6)


def test_every_launch_runs_under_a_device_guard_of_its_tensors(sched, monkeypatch):
    """Triton launches on the CURRENT CUDA device, so each launcher makes its tensors' device
    current around the launch (kernels.common.device_guard). Emulated on one device / the CPU:
    device_guard is wrapped to record the device it is entered with, and every kernel is wrapped
    to record whether it is launched inside an open guard and on which device. What this cannot
    show without two GPUs is torch.cuda.device switching the device; that part is torch's."""
    from fastddpm.kernels import common, noise, q_sample, step

    entered, launched = [], []
    real_guard = common.device_guard

    class Guard:
        def __init__(self, x):
            self.inner, self.device = real_guard(x), x.device

        def __enter__(self):
            entered.append(self.device)
            self.inner.__enter__()

        def __exit__(self, *exc):
            entered.pop()
            return self.inner.__exit__(*exc)

    def wrap(kernel):
        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launched.append(entered[-1] if entered else None)
                    return kernel[grid](*args, **kwargs)
                return launch
        return Launcher()

    for mod in (noise, q_sample, step):
        monkeypatch.setattr(mod, "device_guard", Guard)
    monkeypatch.setattr(step, "step_kernel", wrap(step.step_kernel))
    monkeypatch.setattr(q_sample, "q_sample_kernel", wrap(q_sample.q_sample_kernel))
    monkeypatch.setattr(noise, "normal_kernel", wrap(noise.normal_kernel))
    x = torch.randn(2, 3, 4, 4, device=dev())
    ops.ddpm_step(sched, x, 3, torch.randn_like(x), seed=1)
    ops.ddim_step(sched, x, 3, torch.randn_like(x), eta=1.0, seed=1)
    ops.q_sample(sched, x, 3, seed=1)
    noise.normal_forward(torch.empty_like(x), rng.TAG_INIT, seed=1)
    assert launched == [x.device] * 4 and entered == []


def test_device_guard_selects_the_tensors_cuda_device():
    """device_guard of a tensor on cuda:1 is torch.cuda.device(1) (a stand-in object: no second
    GPU is needed to build the guard, only to enter it); CPU tensors get a no-op guard."""
    from fastddpm.kernels.common import device_guard

    class OnCuda1:
        is_cuda = True
        device = torch.device("cuda", 1)

    guard = device_guard(OnCuda1())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with device_guard(torch.empty(1)):
        pass

"""Issue 24, the silent and unclear cases of the public API and the fused ops: every error names
the argument, what was given and what is allowed, before any work; what the reference accepts
(numpy integers, empty batches) the fused ops accept too, with the same result."""
import re

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import Schedule, diffusion, graphs, ops
from op_checks import close, dev


def exact(text):
    return "^" + re.escape(text) + "$"


@pytest.fixture(scope="module")
def sched():
    return Schedule.linear(100)


# ------------------------------------------------------------------ ops: numpy integers, empty batches
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_numpy_integer_t_is_a_step_index(sched, kind):
    x, mo = torch.randn(3, 2, 4, 5, device=dev()), torch.randn(3, 2, 4, 5, device=dev())
    fn_ops, fn_ref = (ops.ddpm_step, diffusion.ddpm_step) if kind == "ddpm" else (ops.ddim_step, diffusion.ddim_step)
    want = fn_ref(sched, x, 40, mo, seed=3)
    for t in (np.int64(40), np.int32(40), np.uint8(40)):
        close(fn_ops(sched, x, t, mo, seed=3), want, 1e-5)
        close(fn_ref(sched, x, t, mo, seed=3), want, 0)
    close(ops.q_sample(sched, x, np.int16(7), seed=1)[0], diffusion.q_sample(sched, x, 7, seed=1)[0], 1e-5)
    with pytest.raises(ValueError, match=exact("t must be a step index in 0..99; got 100")):
        ops.ddpm_step(sched, x, np.int64(100), mo, seed=3)


def test_empty_batches_return_empty_results_like_the_reference(sched):
    x = torch.randn(0, 2, 4, 4, device=dev())
    t_empty = torch.zeros(0, dtype=torch.long, device=dev())
    for t in (5, t_empty):
        for fn_ops, fn_ref in ((ops.ddpm_step, diffusion.ddpm_step), (ops.ddim_step, diffusion.ddim_step)):
            want = fn_ref(sched, x, t, x, seed=1)
            got = fn_ops(sched, x, t, x, seed=1)
            assert got.shape == want.shape == (0, 2, 4, 4) and got.dtype == want.dtype == torch.float32
            got, x0 = fn_ops(sched, x, t, x, seed=1, return_x0=True)
            assert got.shape == x0.shape == (0, 2, 4, 4)
        for q in (ops.q_sample, diffusion.q_sample):
            xt, eps = q(sched, x, t, seed=1)
            assert xt.shape == eps.shape == (0, 2, 4, 4)
        got, x0 = ops.dpm_solver_step(sched, x, t, x, x, seed=1, method="sde-dpmsolver++")
        want, _ = diffusion.dpm_solver_step(sched, x, t, x, x, seed=1, method="sde-dpmsolver++")
        assert got.shape == x0.shape == want.shape == (0, 2, 4, 4)
    out = torch.empty(0, 2, 4, 4, device=dev())
    assert ops.ddpm_step(sched, x, 5, x, seed=1, out=out) is out


# ------------------------------------------------------------------ ops: out= partly overlapping an input
def test_out_partly_overlapping_an_input_is_refused_the_full_alias_works(sched):
    buf = torch.randn(2 * 2 * 4 * 4 + 4, device=dev())
    x = buf[:64].view(2, 2, 4, 4)
    mo = torch.randn(2, 2, 4, 4, device=dev())
    want = diffusion.ddpm_step(sched, x.clone(), 40, mo, seed=3)
    shifted = buf[4:68].view(2, 2, 4, 4)  # shares 60 of x's 64 elements, one row further on
    msg = ("out partly overlaps x_t in memory (it shares some elements, not the same elements: out at byte offset "
           "+16 from x_t, shape (2, 2, 4, 4)); pass out=x_t itself for an in-place update, or a separate buffer")
    before = buf.clone()
    with pytest.raises(ValueError, match=exact(msg)):
        ops.ddpm_step(sched, x, 40, mo, seed=3, out=shifted)
    with pytest.raises(ValueError, match="^out partly overlaps x_t"):
        ops.ddim_step(sched, x, 40, mo, seed=3, eta=0.5, out=shifted)
    assert torch.equal(buf, before)  # refused before anything was written
    mo_buf = torch.randn(72, device=dev())
    with pytest.raises(ValueError, match="^out partly overlaps model_output"):
        ops.ddpm_step(sched, x.clone(), 40, mo_buf[8:72].view(2, 2, 4, 4), seed=3, out=mo_buf[:64].view(2, 2, 4, 4))
    # DPM-Solver++: out and x0_out against the inputs, and against each other
    prev = torch.randn(2, 2, 4, 4, device=dev())
    with pytest.raises(ValueError, match="^x0_out partly overlaps x_t"):
        ops.dpm_solver_step(sched, x, 40, mo, prev, x0_out=shifted)
    with pytest.raises(ValueError, match=exact("out and x0_out share memory; the op writes both: pass two separate "
                                               "buffers")):
        ops.dpm_solver_step(sched, x.clone(), 40, mo, prev, out=prev, x0_out=prev)
    # the full alias (the loops' in-place update) still gives the reference's numbers
    got = ops.ddpm_step(sched, x, 40, mo, seed=3, out=x)
    assert got is x
    close(got, want, 1e-5)


# ------------------------------------------------------------------ sample(): arguments
def test_sample_argument_errors_name_the_argument(capsys):
    model = lambda x, t: x * 0  # noqa: E731
    with pytest.raises(TypeError, match=exact("schedule must be a fastddpm.Schedule (e.g. "
                                              "fastddpm.Schedule.linear(1000)); got 'linear'")):
        fastddpm.sample(model, 2, shape=(1, 4, 4), schedule="linear")
    with pytest.raises(ValueError, match=exact("shape must be a tuple of positive ints (C, H, W), e.g. (3, 32, 32); "
                                               "got 4")):
        fastddpm.sample(model, 2, shape=4, steps=2)
    with pytest.raises(ValueError, match=exact("device='meta' is torch's placeholder device, which holds no values; "
                                               "pass a device that computes, such as device='cpu' or device='cuda'")):
        fastddpm.sample(model, 2, shape=(1, 4, 4), steps=2, device="meta")
    from fastddpm.cli import main

    assert main(["demo", "--device", "meta", "--out", "never-written.png"]) == 2  # the CLI's --device: the same check
    # numpy integers are integers
    a = fastddpm.sample(model, np.int64(3), shape=(np.int64(1), 4, 4), steps=np.int32(3), batch_size=np.int64(2),
                        seed=np.uint16(5))
    torch.testing.assert_close(a, fastddpm.sample(model, 3, shape=(1, 4, 4), steps=3, batch_size=2, seed=5),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match=exact("n must be a positive int; got 0")):
        fastddpm.sample(model, np.int64(0), shape=(1, 4, 4))
    assert capsys.readouterr().err == ("fastddpm demo: error: --device='meta' is torch's placeholder device, which "
                                       "holds no values; pass a device that computes, such as --device='cpu' or "
                                       "--device='cuda'\n")


def test_schedule_contradicting_the_models_own_is_an_error():
    digits = fastddpm.load()  # carries its training schedule: linear, 1000 steps
    own = "Schedule(num_steps=1000, num_train_timesteps=1000, timesteps=[0..999])"
    tail = ("Leave schedule= out (steps=k respaces the model's own; so does schedule=model.fastddpm_schedule."
            "respace(k)): pass schedule= only for a model without a schedule of its own, or set "
            "model.fastddpm_schedule if the model was trained with this one")
    with pytest.raises(ValueError, match=exact(
            "schedule=Schedule(num_steps=50, num_train_timesteps=50, timesteps=[0..49]) contradicts this model's "
            f"training schedule (model.fastddpm_schedule = {own}): num_train_timesteps 50 against the model's 1000: "
            "the model would be called at timesteps 0..49 with other noise levels than it was trained on. " + tail)):
        fastddpm.sample(digits, 2, schedule=Schedule.linear(50))
    with pytest.raises(ValueError, match=re.escape(
            f"contradicts this model's training schedule (model.fastddpm_schedule = {own}): alphas_cumprod at "
            "timestep 0 is 0.999959 against the model's 0.9999 (other betas)")):
        fastddpm.sample(digits, 2, schedule=Schedule.cosine(1000), steps=3)
    # its own schedule, respaced or rebuilt, is fine, and gives what steps= gives
    want = fastddpm.sample(digits, 2, steps=3, seed=1)
    for s in (digits.fastddpm_schedule.respace(3), Schedule.linear(1000).respace(3)):
        torch.testing.assert_close(fastddpm.sample(digits, 2, schedule=s, seed=1), want, rtol=0, atol=0)
    torch.testing.assert_close(fastddpm.sample(digits, 2, schedule=Schedule.linear(1000), steps=3, seed=1), want,
                               rtol=0, atol=0)


# ------------------------------------------------------------------ a non-finite model output under clipping
@pytest.fixture
def graph_on_cpu(monkeypatch):
    """The graph backend's code run eagerly on the CPU (its kernels under the interpreter), as tests/test_graphs.py."""
    if torch.cuda.is_available():
        yield "graph"
        return
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    monkeypatch.setattr(graphs, "CHUNK_STEPS", 5)
    graphs.clear_cache()
    yield "graph"
    graphs.clear_cache()


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmsolver++"])
def test_inf_model_output_is_reported_though_clipping_hides_it(graph_on_cpu, method):
    """An inf eps makes x0 = -inf, which clip=1 turns into -1: the state stays finite, so only a check
    of the model output sees it (eager loops and the kernels' flag of the graph loop)."""
    s = Schedule.linear(20)

    def model(x, t):
        return torch.where((t == 8).view(-1, 1, 1, 1), torch.full_like(x, float("inf")), torch.zeros_like(x))

    msg = ("non-finite values (NaN or inf) appeared at step 8 (timestep 8) in the batch starting at sample 0, in the "
           "model's output or the sampler state: check the model's output and dtype")
    for backend in ("reference", "fused", graph_on_cpu):
        with pytest.raises(FloatingPointError, match=exact(msg)):
            fastddpm.sample(model, 2, shape=(1, 4, 4), schedule=s, method=method, clip=1.0, backend=backend)


# ------------------------------------------------------------------ fastddpm eval: files and counts
def test_eval_reads_npy_and_refuses_what_it_cannot_judge(tmp_path, capsys):
    from fastddpm.cli import main
    from fastddpm.data import load_digits
    from fastddpm.images import to_uint8_nhwc
    from fastddpm.quality import evaluate

    real = to_uint8_nhwc(load_digits("heldout")[:64])
    np.save(tmp_path / "real.npy", real)  # a .npy of the array: read as the .npz's arr_0
    assert main(["eval", str(tmp_path / "real.npy")]) == 0
    assert "verdict: close to real digits (FD ratio 1.00 over 64 images each" in capsys.readouterr().out

    def err(name):
        assert main(["eval", str(tmp_path / name)]) == 2
        out = capsys.readouterr()
        assert "allow_pickle" not in out.err and out.err.count("\n") == 1
        return out.err.removeprefix("fastddpm eval: error: ").rstrip("\n")

    (tmp_path / "notes.npz").write_text("FD 12.9 at 297 images\n")
    assert err("notes.npz") == (f"{str(tmp_path / 'notes.npz')!r} is not a NumPy .npz or .npy file: it looks like a "
                                "text file (it starts with b'FD 12.9 at 297 i'); eval reads the samples.npz that "
                                "fastddpm sample writes (uint8 NHWC images under arr_0)")
    np.savez(tmp_path / "objects.npz", arr_0=np.array([{"x": 1}], dtype=object))
    assert err("objects.npz") == (f"{str(tmp_path / 'objects.npz')!r} holds Python objects, not images: fastddpm "
                                  "never unpickles files (unpickling can run arbitrary code); eval needs uint8 NHWC "
                                  "images (N, 16, 16, 1), as fastddpm sample writes")
    np.savez(tmp_path / "float.npz", arr_0=real.astype(np.float32) / 127.5 - 1)
    assert err("float.npz") == (f"{str(tmp_path / 'float.npz')!r} holds float32 values; eval expects uint8 images "
                                "(0..255, NHWC (N, 16, 16, 1)), as fastddpm sample writes; float images x in [-1, 1] "
                                "convert with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8), channels last")
    np.savez(tmp_path / "one.npz", arr_0=real[:1])
    assert err("one.npz") == (f"{str(tmp_path / 'one.npz')!r} holds 1 image(s); eval needs at least 2 (the Frechet "
                              "distance compares covariances) and 64 for a verdict (297 or more give a steady figure)")
    with pytest.raises(ValueError, match=exact("images: got 1 image(s); the Frechet distance compares covariances, "
                                               "which needs at least 2 images (and a verdict at least 64; 297 or more "
                                               "give a steady figure)")):
        evaluate(real[:1])
    with pytest.raises(ValueError, match=exact("digit images must be uint8 NHWC (N, 16, 16, 1) or float (N, 1, 16, "
                                               "16) in [-1, 1]; got dtype torch.int64")):
        evaluate(torch.zeros(3, 1, 16, 16, dtype=torch.long))
    # two images of noise: figures, but no verdict
    np.savez(tmp_path / "noise.npz", arr_0=to_uint8_nhwc(torch.rand(2, 1, 16, 16) * 2 - 1))
    assert main(["eval", str(tmp_path / "noise.npz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[4] == ("verdict: none, too few images for a verdict (2 images; at least 64 are needed: with fewer the "
                        "FD ratio does not tell noise from digits)")
    assert evaluate(torch.rand(63, 1, 16, 16) * 2 - 1)["verdict"] == "too few images for a verdict"

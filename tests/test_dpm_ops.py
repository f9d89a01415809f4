"""Fused DPM-Solver++ step (kernels/dpm.py) == the reference step, with the same noise, on fresh random
inputs; and the fused and graph loops == the reference loop. Kernels run under TRITON_INTERPRET=1 on
the CPU (conftest) and, unchanged, compiled on a GPU. Output buffers are poisoned with NaN first."""
import itertools

import pytest
import torch

import fastddpm
from fastddpm import Schedule, diffusion, graphs, ops
from fastddpm.dpm_solver import dpm_indices
from op_checks import close, dev, poisoned

SHAPES = [(3, 3, 17, 29), (2, 1, 5, 3)]
CONFIGS = [(1, "midpoint"), (2, "midpoint"), (2, "heun")]
TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}  # the same half input on both sides


@pytest.fixture(scope="module")
def sched():
    return Schedule.linear(1000).select(dpm_indices(1000, 20, "linspace"))


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
@pytest.mark.parametrize("method,cfg,prediction,clip,noise_mode", list(itertools.product(
    ["dpmsolver++", "sde-dpmsolver++"], CONFIGS, ["eps", "x0", "v"], [None, 1.0], ["tensor", "seed"])))
def test_fused_step_equals_reference(sched, shape, method, cfg, prediction, clip, noise_mode):
    order, solver_type = cfg
    x, mo, prev = (torch.randn(shape, device=dev()) for _ in range(3))
    t = mixed_t(sched, shape[0]) if noise_mode == "seed" else int(torch.randint(1, sched.num_steps - 1, ()))
    kw = dict(method=method, order=order, solver_type=solver_type, prediction=prediction, clip=clip)
    noise = torch.randn(shape, device=dev()) if noise_mode == "tensor" and method == "sde-dpmsolver++" else None
    seed = dict(seed=9, sample_offset=4) if noise_mode == "seed" else {}
    want, want_x0 = diffusion.dpm_solver_step(sched, x, t, mo, prev, noise, **seed, **kw)
    out, x0_out = poisoned(shape), poisoned(shape)
    got, got_x0 = ops.dpm_solver_step(sched, x, t, mo, prev, noise, **seed, out=out, x0_out=x0_out, **kw)
    assert got is out and got_x0 is x0_out and got.dtype == torch.float32
    close(got, want, 1e-5)
    close(got_x0, want_x0, 1e-5)


@pytest.mark.parametrize("mo_dtype", list(TOL))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_in_place_update_any_layout_and_dtype(sched, mo_dtype, layout):
    """The loop's call: out=x, x0_out=prev_x0, in place; half-precision model outputs; channels_last."""
    shape = (3, 3, 17, 29)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device=dev()).contiguous(memory_format=fmt)
    prev = torch.randn(shape, device=dev()).contiguous(memory_format=fmt)
    mo = torch.randn(shape, device=dev()).to(mo_dtype).contiguous(memory_format=fmt)
    t = mixed_t(sched, 3)
    kw = dict(method="sde-dpmsolver++", seed=2)
    want, want_x0 = diffusion.dpm_solver_step(sched, x.clone(), t, mo, prev.clone(), **kw)
    got, got_x0 = ops.dpm_solver_step(sched, x, t, mo, prev, out=x, x0_out=prev, **kw)
    assert got is x and got_x0 is prev
    close(got, want, TOL[mo_dtype])
    close(got_x0, want_x0, TOL[mo_dtype])


def test_first_order_steps_never_read_prev_x0(sched):
    shape = (2, 3, 8, 8)
    x, mo = torch.randn(shape, device=dev()), torch.randn(shape, device=dev())
    for t in (sched.num_steps - 1, 0):
        got, _ = ops.dpm_solver_step(sched, x, t, mo, poisoned(shape), out=poisoned(shape))
        want, _ = diffusion.dpm_solver_step(sched, x, t, mo, None)
        assert torch.isfinite(got).all()
        close(got, want, 1e-5)


def test_bad_buffers_are_named(sched):
    x = torch.randn(2, 3, 4, 4, device=dev())
    with pytest.raises(TypeError, match="x0_out must be float32"):
        ops.dpm_solver_step(sched, x, 3, x, x, x0_out=x.half())
    with pytest.raises(ValueError, match="prev_x0 is required"):
        ops.dpm_solver_step(sched, x, 3, x, None)
    with pytest.raises(ValueError, match="x0_out must have shape"):
        ops.dpm_solver_step(sched, x, 3, x, x, x0_out=x[:1])


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, t, x_self_cond=None):
        out = torch.tanh(self.conv(x)) * (1 + t.view(-1, 1, 1, 1).float() / 1000)
        return out if x_self_cond is None else out + 0.1 * x_self_cond


@pytest.mark.parametrize("method,order,self_condition", [("dpmsolver++", 2, False), ("sde-dpmsolver++", 2, False),
                                                       ("sde-dpmsolver++", 1, False), ("dpmsolver++", 2, True)])
def test_fused_and_graph_loops_equal_the_reference_loop(method, order, self_condition, monkeypatch):
    """Also with self-conditioning: one previous-x0 buffer serves both (the model gets DPM-Solver's x0)."""
    torch.manual_seed(0)
    net = TinyNet().to(dev())
    kw = dict(shape=(2, 7, 9), schedule=Schedule.linear(1000), steps=12, method=method, order=order, seed=5,
              batch_size=3, self_condition=self_condition)
    want = fastddpm.sample(net, 5, backend="reference", **kw)
    got = fastddpm.sample(net, 5, backend="fused", **kw)
    assert float((got - want).norm() / want.norm()) < 1e-5
    if dev().type == "cpu":
        monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear_cache(net)
    got = fastddpm.sample(net, 5, backend="graph", **kw)
    assert float((got - want).norm() / want.norm()) < 1e-5

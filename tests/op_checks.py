"""Helpers shared by the fused-op tests (test_ops.py, test_dpm_ops.py): the device the kernels
run on, NaN-poisoned output buffers, and a max-abs-error check scaled by the reference."""
import torch


def dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def poisoned(shape):
    return torch.full(shape, float("nan"), device=dev())


def close(a, b, tol):
    a, b = a.double(), b.double()
    scale = max(b.abs().max().item(), 1.0)
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"max abs err {err:.3g} > {tol} * {scale:.3g}"

"""Test setup: Triton interpreter on CPU-only machines, the gpu marker, fresh random seeds.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined; fastddpm imports
its kernels lazily, so setting it here (before tests import fastddpm.ops) is enough.
"""
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs every run; the seed is printed so a failure can be replayed
    with FASTDDPM_TEST_SEED=<seed>."""
    seed = int(os.environ.get("FASTDDPM_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    print(f"[torch seed {seed}]")
    return seed


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")

"""k-diffusion 0.1.1.post1 as a test peer: its own `sampling` and `external` modules, unchanged.

The package's __init__ imports its training stack (torchvision, kornia, clip, wandb ...), none of
which its samplers use, and torchvision would pull a CUDA torch. So the test dependency is
installed without dependencies (README's test command: k-diffusion, torchsde, torchdiffeq,
trampoline, scipy), and this loader imports the installed package's sampling.py, external.py and
utils.py under an empty `k_diffusion` package, with a stand-in for the one torchvision import
of utils.py (its image helpers, which the samplers never call). Skips when not installed."""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest


def load_k_diffusion():
    """(k_diffusion.sampling, k_diffusion.external) of the installed package, or a pytest skip."""
    if "k_diffusion.sampling" in sys.modules and "k_diffusion.external" in sys.modules:
        return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.origin is None:
        pytest.skip("k-diffusion is not installed (README: the test command installs k-diffusion==0.1.1.post1)")
    for dep in ("scipy", "torchsde", "torchdiffeq"):
        if importlib.util.find_spec(dep) is None:
            pytest.skip(f"k-diffusion's sampling module needs {dep}, which is not installed")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [os.path.dirname(spec.origin)]
    sys.modules.setdefault("k_diffusion", pkg)
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
        tv, tvt, tvf = (types.ModuleType(n) for n in names)
        tv.transforms, tvt.functional = tvt, tvf
        stubs = dict(zip(names, (tv, tvt, tvf)))
    sys.modules.update(stubs)
    try:
        import k_diffusion.external as external
        import k_diffusion.sampling as sampling
    finally:  # only utils.py's import sees the stand-in: other packages (diffusers) still find no torchvision
        for name in stubs:
            sys.modules.pop(name, None)
    return sampling, external

"""denoising-diffusion-pytorch (lucidrains, 2.3.4) as a test peer, imported as installed.

Install without its dependencies (it pulls torchvision, whose PyPI build drags a CUDA torch):
    pip install --no-deps denoising-diffusion-pytorch==2.3.4 einops==0.8.2 ema-pytorch==0.8.3
The trainer-only imports it makes at import time (torchvision, accelerate, scipy) are stubbed
while it imports, when they are missing; sampling never touches them. Skips when not installed."""
import importlib
import sys
import types

import pytest


def import_package():
    """The denoising_diffusion_pytorch package (its trainer-only imports stubbed while it imports), or a skip."""
    stubs = {"torchvision": dict(transforms=types.ModuleType("torchvision.transforms"),
                                 utils=types.ModuleType("torchvision.utils")),
             "accelerate": dict(Accelerator=None), "scipy": {}, "scipy.optimize": dict(linear_sum_assignment=None)}
    stubbed = []
    for name, attrs in stubs.items():
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - missing, or a build that does not import with this torch
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[key]
            mod = types.ModuleType(name)
            mod.__dict__.update(attrs)
            sys.modules[name] = mod
            stubbed.append(name)
    try:
        return pytest.importorskip("denoising_diffusion_pytorch")
    finally:
        for name in stubbed:  # the stubs must not be seen by other tests (diffusers probes torchvision)
            sys.modules.pop(name, None)

"""A small MLP noise-prediction model for low-dimensional toy data (e.g. 2-D moons).

forward(x (B, dim), t LongTensor (B,) of training timesteps) -> (B, dim). The timestep
enters as the same sinusoidal embedding as the U-Net's, concatenated to the input.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .unet import timestep_embedding


@dataclass
class MLPConfig:
    dim: int = 2
    hidden: int = 256
    layers: int = 4
    temb: int = 64

    @property
    def sample_shape(self):
        return (self.dim,)


class MLPDenoiser(nn.Module):
    def __init__(self, **config):
        super().__init__()
        cfg = self.config = MLPConfig(**config)
        for name in ("dim", "hidden", "layers", "temb"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        dims = [cfg.dim + cfg.temb] + [cfg.hidden] * cfg.layers
        blocks = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(cfg.hidden, cfg.dim))

    def config_dict(self) -> dict:
        return asdict(self.config)

    def forward(self, x, t):  # x (B, dim)
        return self.net(torch.cat([x, timestep_embedding(t, self.config.temb)], dim=1))

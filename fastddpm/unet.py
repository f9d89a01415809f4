"""The DDPM U-Net of Ho et al. 2020 (their Appendix B and the released TF code).

A Wide-ResNet-style U-Net over resolution levels (channel multipliers `ch_mult`), with
`num_res_blocks` residual blocks per level, single-head self-attention at the
resolutions in `attn_resolutions`, a sinusoidal time embedding (Transformer encoding
-> Linear(4 ch) -> SiLU -> Linear(4 ch)) added in every residual block, GroupNorm(32),
dropout, and optional class conditioning (a label embedding added to the time embedding).

Class conditioning: `UNet(num_classes=K)` has K + 1 label embeddings; labels 0..K-1 are the
classes and label K (`UNet.null_class`) is the null class, the unconditional embedding that
training with label dropout learns (classifier-free guidance, Ho & Salimans 2022: the
unconditional output is model(x, t, y=K)). A state dict written before the null class
existed (K rows) still loads: its null row is zeros (no label added), with a warning that
such a model was not trained for unconditional calls.

Forward is capture-safe: no host syncs, no data-dependent Python branches; attention
goes through F.scaled_dot_product_attention; works under channels_last, bf16 autocast,
torch.compile(fullgraph=True) and CUDA graphs.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["UNet", "UNetConfig", "PRESETS", "timestep_embedding"]


@dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None      # default in_channels (2 * in_channels for learned_range)
    ch: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    dropout: float = 0.1
    num_classes: int | None = None
    resamp_with_conv: bool = True
    norm_groups: int = 32
    num_heads: int = 1

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        for name in ("image_size", "in_channels", "out_channels", "ch", "num_res_blocks", "norm_groups", "num_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints; got {self.ch_mult}")
        if self.image_size % (2 ** (len(self.ch_mult) - 1)):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2**(len(ch_mult)-1)="
                             f"{2 ** (len(self.ch_mult) - 1)}")
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_groups:
                raise ValueError(f"every ch*ch_mult ({self.ch}*{m}) must be divisible by "
                                 f"norm_groups={self.norm_groups}")
        k = self.num_classes
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
            raise ValueError(f"num_classes must be a positive int (the number of classes; the null class is label "
                             f"num_classes) or None (unconditional); got {k!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")


PRESETS = {
    # Ho et al. 2020, CIFAR-10: 35.7M parameters.
    "ddpm-cifar10": dict(image_size=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                         attn_resolutions=(16,), dropout=0.1),
    # Ho et al. 2020, LSUN / CelebA-HQ 256x256: 113.7M parameters.
    "ddpm-256": dict(image_size=256, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                     attn_resolutions=(16,), dropout=0.0),
    # The shipped digits model: 16x16 grey images, 1.1M parameters (trains on 2 CPU cores).
    "digits-16": dict(image_size=16, in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                      attn_resolutions=(4,), dropout=0.0, norm_groups=8),
    # Tiny models for tests and smoke runs.
    "tiny": dict(image_size=16, in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(8,), dropout=0.0, norm_groups=8),
}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) (Vaswani et al. 2017; Ho et al.'s TF code)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, device=t.device, dtype=torch.float32))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb_dim, dropout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):  # x (B, cin, H, W), temb (B, temb_dim)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h  # (B, cout, H, W)


class AttnBlock(nn.Module):
    def __init__(self, ch, groups, num_heads):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"channels {ch} not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):  # (B, C, H, W)
        B, C_, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C_ // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, d)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        h = h.transpose(-1, -2).reshape(B, C_, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch, with_conv):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if with_conv else None

    def forward(self, x):
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    def __init__(self, ch, with_conv):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1) if with_conv else None

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class UNet(nn.Module):
    """Ho et al. 2020 U-Net. `UNet(**config)` or `UNet.from_preset(name, **overrides)`.

    forward(x (B, in_channels, H, W), t LongTensor (B,) of training timesteps, y=None
    LongTensor (B,) class labels when num_classes is set) -> (B, out_channels, H, W).
    With num_classes=K, y takes values 0..K: 0..K-1 are the classes, K (`self.null_class`)
    the null (unconditional) class; out-of-range labels are an index error of the embedding.
    y may also be one label for the whole batch (an int or a 0-d tensor).
    """

    def __init__(self, **config):
        super().__init__()
        cfg = self.config = UNetConfig(**config)
        ch, g = cfg.ch, cfg.norm_groups
        temb_dim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        # row num_classes: the null class (unconditional), learned through label dropout
        self.label_emb = nn.Embedding(cfg.num_classes + 1, temb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs, cur, res = [ch], ch, cfg.image_size
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(cur, ch * mult, temb_dim, cfg.dropout, g)]
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(cur, g, cfg.num_heads))
                self.down.append(nn.ModuleList(blocks))
                skip_chs.append(cur)
            if level != len(cfg.ch_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur, cfg.resamp_with_conv)]))
                skip_chs.append(cur)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, temb_dim, cfg.dropout, g), AttnBlock(cur, g, cfg.num_heads),
                                  ResBlock(cur, cur, temb_dim, cfg.dropout, g)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(cur + skip_chs.pop(), ch * mult, temb_dim, cfg.dropout, g)]
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(cur, g, cfg.num_heads))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(cur, cfg.resamp_with_conv)]))
                res *= 2

        self.norm_out = nn.GroupNorm(g, cur)
        self.conv_out = nn.Conv2d(cur, cfg.out_channels, 3, padding=1)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UNet":
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def config_dict(self) -> dict:
        d = asdict(self.config)
        d["ch_mult"], d["attn_resolutions"] = list(d["ch_mult"]), list(d["attn_resolutions"])
        return d

    @property
    def num_classes(self) -> int | None:
        """Number of classes K (None: unconditional model)."""
        return self.config.num_classes

    @property
    def null_class(self) -> int | None:
        """The label of the null (unconditional) class, K = num_classes; None for an unconditional model."""
        return self.config.num_classes

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "label_emb.weight"
        w = state_dict.get(key)
        K = self.config.num_classes
        if self.label_emb is not None and w is not None and w.ndim == 2 and w.shape[0] == K:
            warnings.warn(f"this state dict's label embedding has {K} rows (written before the null class "
                          f"existed): its null class (label {K}) is set to zeros, the model was not trained for "
                          "unconditional calls (classifier-free guidance needs a model trained with label dropout)",
                          UserWarning, stacklevel=3)
            state_dict[key] = torch.cat([w, w.new_zeros(1, w.shape[1])])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def in_channels(self):
        return self.config.in_channels

    @property
    def image_size(self):
        return self.config.image_size

    def forward(self, x, t, y=None):
        emb = self.temb(timestep_embedding(t, self.config.ch))  # (B, 4 ch)
        if self.label_emb is not None:
            if y is None:
                raise ValueError(f"this UNet is class-conditional (num_classes={self.config.num_classes}): pass y, a "
                                 f"LongTensor (B,) of labels 0..{self.config.num_classes} "
                                 f"({self.config.num_classes} = the null, unconditional class)")
            if not isinstance(y, torch.Tensor):  # one label for every sample (e.g. the null class)
                y = torch.full((x.shape[0],), int(y), dtype=torch.long, device=emb.device)
            elif y.ndim == 0:
                y = y.expand(x.shape[0])
            emb = emb + self.label_emb(y)
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            for blk in blocks:
                h = blk(h, emb) if isinstance(blk, ResBlock) else blk(h)
            hs.append(h)
        for blk in self.mid:
            h = blk(h, emb) if isinstance(blk, ResBlock) else blk(h)
        for blocks in self.up:
            for blk in blocks:
                if isinstance(blk, ResBlock):
                    h = blk(torch.cat([h, hs.pop()], dim=1), emb)
                else:
                    h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)


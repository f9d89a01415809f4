"""Image output: uint8 NHWC arrays (the format FID tools read) and PNG grids."""
from __future__ import annotations

import math
import os

import numpy as np
import torch


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8 (values outside [-1, 1] are clamped)."""
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W); got shape {tuple(x.shape)}")
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """uint8 NHWC -> one uint8 HWC image with the images in rows (nearest-neighbour `scale`)."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    out = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[y:y + h, x:x + w] = images[i]
    if scale > 1:
        out = out.repeat(scale, 0).repeat(scale, 1)
    return out


def class_grid(images: np.ndarray, labels, max_cols: int = 16, pad: int = 1, scale: int = 1) -> np.ndarray:
    """uint8 NHWC and one label per image -> one uint8 HWC image with one row per class (the labels in
    order of first appearance), each row that class's first `max_cols` images in index order (a
    class with fewer leaves its row's end blank)."""
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"class_grid needs one label per image: {images.shape[0]} images, {labels.shape[0]} labels")
    classes = list(dict.fromkeys(labels.tolist()))
    rows = [np.flatnonzero(labels == c)[:max_cols] for c in classes]
    cols = max(len(r) for r in rows)
    cells = np.zeros((len(rows) * cols, *images.shape[1:]), dtype=np.uint8)
    for i, r in enumerate(rows):
        cells[i * cols:i * cols + len(r)] = images[r]
    return grid(cells, nrow=cols, pad=pad, scale=scale)


def save_png(hwc: np.ndarray, path: str):
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc).save(path)


def save_samples(x: torch.Tensor, out_dir: str, scale: int | None = None) -> tuple[str, str]:
    """Write out_dir/samples.npz (uint8 NHWC under "arr_0") and out_dir/grid.png."""
    os.makedirs(out_dir, exist_ok=True)
    arr = to_uint8_nhwc(x)
    npz = os.path.join(out_dir, "samples.npz")
    np.savez(npz, arr_0=arr)
    png = os.path.join(out_dir, "grid.png")
    scale = scale or max(1, 64 // arr.shape[1])
    save_png(grid(arr[:256], scale=scale), png)
    return npz, png

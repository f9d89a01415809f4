"""Training data: the embedded digits, 2-D toy distributions, and folders of images.

- "digits": 1797 handwritten digits (8x8, 0..16 ink) embedded in the package
  (fastddpm/assets/digits8x8.npz: the UCI "Optical Recognition of Handwritten Digits"
  test set by E. Alpaydin and C. Kaynak, CC BY 4.0, as distributed with scikit-learn),
  presented at 16x16 (bilinear) with values in [-1, 1]. A fixed split keeps 297 images
  out of training for evaluation (`split="heldout"`).
- "moons", "gaussians": 2-D toy distributions with samplers of their own, for fast
  statistical tests (data tensors of shape (N, 2)).
- a folder of PNG/JPEG images (all the same size; RGB, or L if every image is grey).
All image datasets are float32 tensors (N, C, H, W) in [-1, 1].
"""
from __future__ import annotations

import math
import os
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["load_digits", "digits_labels", "load_labels", "LABELLED_DATASETS", "moons", "gaussian_mixture",
           "load_image_folder", "load_dataset", "TOY_DATASETS"]

HELDOUT = 297
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def _digits_raw():
    with resources.files("fastddpm").joinpath("assets/digits8x8.npz").open("rb") as f:
        d = np.load(f)
        return d["images"], d["labels"]


def _split_index(n, split):
    perm = np.random.default_rng(0).permutation(n)  # fixed split, same everywhere
    if split == "train":
        return np.sort(perm[HELDOUT:])
    if split == "heldout":
        return np.sort(perm[:HELDOUT])
    if split == "all":
        return np.arange(n)
    raise ValueError(f"split must be 'train', 'heldout' or 'all'; got {split!r}")


def load_digits(split: str = "train", size: int = 16) -> torch.Tensor:
    """Digits as (N, 1, size, size) float32 in [-1, 1] (ink is +1)."""
    images, _ = _digits_raw()
    x = torch.from_numpy(images[_split_index(len(images), split)].astype(np.float32) / 16.0)[:, None]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1)


def digits_labels(split: str = "train") -> torch.Tensor:
    """The digits' labels 0..9 as an int64 tensor (N,), in the order of load_digits(split)."""
    images, labels = _digits_raw()
    return torch.from_numpy(labels[_split_index(len(images), split)].astype(np.int64))


def moons(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> torch.Tensor:
    """Two interleaving half circles (scikit-learn's make_moons, rescaled to about [-1, 1]): (n, 2)."""
    g = generator
    u = torch.rand(n, generator=g) * math.pi
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, torch.cos(u), 1 - torch.cos(u))
    y = torch.where(upper, torch.sin(u), 0.5 - torch.sin(u))
    pts = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=g)
    return (pts - torch.tensor([0.5, 0.25])) / torch.tensor([1.5, 0.75])


def gaussian_mixture(n: int, generator: torch.Generator | None = None, k: int = 8, radius: float = 0.8,
                     std: float = 0.06) -> torch.Tensor:
    """k Gaussians evenly spaced on a circle: (n, 2)."""
    g = generator
    comp = torch.randint(0, k, (n,), generator=g).float()
    ang = 2 * math.pi * comp / k
    centres = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return centres + std * torch.randn(n, 2, generator=g)


TOY_DATASETS = {"moons": moons, "gaussians": gaussian_mixture}


def load_image_folder(path: str, size: int | None = None) -> torch.Tensor:
    """Every PNG/JPEG in `path` (sorted) as (N, C, H, W) float32 in [-1, 1].

    All images must share one size (or pass size= to resize them, square). Errors name the
    offending file."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(path):
        raise ValueError(f"data folder {path!r} does not exist or is not a folder")
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise ValueError(f"data folder {path!r} has no .png/.jpg/.jpeg images")
    imgs, first_size, modes = [], None, set()
    for name in files:
        fp = os.path.join(path, name)
        try:
            with Image.open(fp) as im:
                im.load()
                modes.add("L" if im.mode in ("L", "1", "I;16", "I") else "RGB")
                im = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {fp!r}: {e}") from None
        if size is not None:
            im = im.resize((size, size), Image.BICUBIC)
        if first_size is None:
            first_size = im.size
        elif im.size != first_size:
            raise ValueError(f"image {fp!r} is {im.size[0]}x{im.size[1]} but {files[0]!r} is "
                             f"{first_size[0]}x{first_size[1]}: all images must have one size (or pass size=)")
        imgs.append(np.asarray(im, dtype=np.uint8))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W)
    if modes == {"L"}:
        x = x[:, :1].contiguous()
    return x


LABELLED_DATASETS = {"digits": 10}  # data name -> number of classes


def load_labels(name: str) -> torch.Tensor:
    """The class labels of dataset `name` (int64 (N,), aligned with load_dataset(name)); a ValueError for data
    without labels."""
    if name not in LABELLED_DATASETS:
        raise ValueError(f"classes=True (--classes) trains a class-conditional model on labelled data, but "
                         f"data={name!r} has no labels; labelled data: {sorted(LABELLED_DATASETS)}")
    return digits_labels("train")


def load_dataset(name: str, n_toy: int = 20000, seed: int = 0) -> torch.Tensor:
    """'digits', 'moons', 'gaussians', or a folder path -> a float32 tensor (N, ...)."""
    if name == "digits":
        return load_digits("train")
    if name in TOY_DATASETS:
        return TOY_DATASETS[name](n_toy, torch.Generator().manual_seed(seed))
    if os.path.isdir(name):
        return load_image_folder(name)
    raise ValueError(f"data must be 'digits', 'moons', 'gaussians' or an existing folder of images; got {name!r}")

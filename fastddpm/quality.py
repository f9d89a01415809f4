"""Quality figures for digit samples: a Frechet distance in a small classifier's feature space.

FD (Heusel et al. 2017, as in FID) = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)),
between 32-d penultimate features of a small CNN trained on the real digits (shipped:
fastddpm/assets/digits-classifier.safetensors), the reference statistics being those of
the training split. Also the classifier's mean confidence (max softmax) and the class
histogram. The same figures for the 297 held-out real digits give the floor to compare
against; FD is biased upwards for small sets, so samples and real digits are also scored
over the same count (min(N, 297)), and the ratio of those two FDs gives a verdict (from 64
images on: below that the ratio does not tell noise from digits).
Classifier confidence is not a quality score: it is high on many non-digits.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import digits_labels, load_digits

CLASSIFIER_ASSET = "assets/digits-classifier.safetensors"


class DigitsClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 32)
        self.head = nn.Linear(32, 10)

    def features(self, x):  # (B, 1, 16, 16) in [-1, 1] -> (B, 32)
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(steps: int = 1500, seed: int = 0) -> DigitsClassifier:
    """Train the classifier on the digits training split (a minute on a CPU)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = load_digits("train"), digits_labels("train")
    m = DigitsClassifier()
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        xb = x[idx]
        shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # light augmentation: 1-pixel shifts
        xb = torch.roll(xb, shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(m(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def load_classifier() -> DigitsClassifier:
    from importlib import resources

    from safetensors.torch import load_file

    m = DigitsClassifier()
    with resources.as_file(resources.files("fastddpm").joinpath(CLASSIFIER_ASSET)) as p:
        m.load_state_dict(load_file(str(p)))
    return m.eval()


def frechet_distance(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """FD between two feature sets (N, D) under Gaussian fits, in float64."""
    fa, fb = fa.double(), fb.double()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    sa, sb = torch.cov(fa.T), torch.cov(fb.T)
    # Tr((S_a S_b)^(1/2)) = sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2))), a symmetric PSD matrix
    ea, va = torch.linalg.eigh(sa)
    ra = va @ torch.diag(ea.clamp(min=0).sqrt()) @ va.T
    eig = torch.linalg.eigvalsh(ra @ sb @ ra).clamp(min=0)
    return float(((mu_a - mu_b) ** 2).sum() + sa.trace() + sb.trace() - 2 * eig.sqrt().sum())


def to_model_space(images) -> torch.Tensor:
    """uint8 NHWC (N, 16, 16, 1) or float (N, 1, 16, 16) in [-1, 1] -> float (N, 1, 16, 16)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[1:] != (16, 16, 1):
            raise ValueError(f"uint8 digit images must be NHWC (N, 16, 16, 1); got shape {tuple(images.shape)}")
        images = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    elif not images.is_floating_point():
        raise ValueError(f"digit images must be uint8 NHWC (N, 16, 16, 1) or float (N, 1, 16, 16) in [-1, 1]; got "
                         f"dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (1, 16, 16):
        raise ValueError(f"float digit images must be (N, 1, 16, 16) in [-1, 1] (or uint8 NHWC (N, 16, 16, 1)); got "
                         f"shape {tuple(images.shape)}")
    return images.float()


@torch.no_grad()
def digit_figures(images, classifier=None, reference=None, n_common: int = 297) -> dict:
    """FD to the training digits (over all images, and over the first n_common), mean confidence
    and class histogram of a set of digit images."""
    clf = classifier or load_classifier()
    x = to_model_space(images)
    ref = reference if reference is not None else clf.features(load_digits("train"))
    feats = clf.features(x)
    probs = F.softmax(clf.head(feats), dim=1)
    n_common = min(len(x), n_common)
    return {
        "n": len(x),
        "fd": frechet_distance(feats, ref),
        "n_common": n_common,
        "fd_common": frechet_distance(feats[:n_common], ref),
        "confidence": float(probs.max(1).values.mean()),
        "histogram": torch.bincount(probs.argmax(1), minlength=10).tolist(),
    }


# FD ratio (samples / held-out real digits, over equal counts) -> verdict. Calibration: the
# shipped model scores 1.1 at 297 images; uniform noise more than 20.
VERDICTS = ((1.5, "close to real digits"), (3.0, "digit-like, but clearly worse than real digits"),
            (10.0, "poor: few samples look like real digits"), (float("inf"), "not digits (as far off as noise)"))


# Fewer images than this give no verdict: with 32-d features the FD ratio does not tell noise from
# digits below it (uniform noise measured 0.76 at 2 images, 2.5 at 10, 6.5 at 33, 16.6 at 64).
MIN_FOR_VERDICT = 64
TOO_FEW = "too few images for a verdict"


def verdict(ratio: float, n: int = MIN_FOR_VERDICT) -> str:
    """The verdict of an FD ratio taken over n images each (TOO_FEW below MIN_FOR_VERDICT images)."""
    if n < MIN_FOR_VERDICT:
        return TOO_FEW
    return next(text for bound, text in VERDICTS if ratio <= bound)


def evaluate(images) -> dict:
    """Figures for `images` and, beside them, for the 297 held-out real digits. FD is biased
    upwards for small sets, so both are also scored over the same count, min(N, 297):
    "fd_common", their ratio "fd_ratio" and its "verdict" compare like with like."""
    clf = load_classifier()
    ref = clf.features(load_digits("train"))
    x = to_model_space(images)
    if len(x) < 2:
        raise ValueError(f"images: got {len(x)} image(s); the Frechet distance compares covariances, which needs at "
                         f"least 2 images (and a verdict at least {MIN_FOR_VERDICT}; 297 or more give a steady figure)")
    n_common = min(len(x), 297)
    res = {"samples": digit_figures(x, clf, ref, n_common),
           "heldout_real": digit_figures(load_digits("heldout"), clf, ref, n_common)}
    res["fd_ratio"] = res["samples"]["fd_common"] / res["heldout_real"]["fd_common"]
    res["verdict"] = verdict(res["fd_ratio"], n_common)
    return res


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between point sets (N, D) and (M, D) (Rabin et al. 2011):
    the mean over random unit directions of W1 between the 1-D projections (quantile matching)."""
    g = torch.Generator().manual_seed(seed)
    a, b = a.double().flatten(1).cpu(), b.double().flatten(1).cpu()
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    q = torch.linspace(0.0025, 0.9975, 400, dtype=torch.float64)
    pa, pb = torch.quantile(a @ dirs, q, dim=0), torch.quantile(b @ dirs, q, dim=0)
    return float((pa - pb).abs().mean())

"""Sample quality of the CLI's DDIM against its step count, on the shipped digits model (issue 18).

`fastddpm sample` (its defaults: DDIM, eta 0, clip 1, eps re-derived from the clipped x0) at 50
and at 250 steps with the same seed, so both runs start from the same x_T and the comparison is
paired; each is scored with `fastddpm eval`'s Frechet distance. More steps must not be
materially worse: 250 steps within 10% of 50 steps. Measured on a CPU with 64 images: 72.5 at
50 steps, 72.1 at 250 (0.99x). With the raw eps (diffusers' default, the CLI's before issue 18):
70.7 and 94.8 (1.34x; issue 18 saw 2.2x with 400 images), with speckles (README, "DDIM and
clipping").

Images: 297 (the eval's small-set figure) on CUDA; on a CPU FASTDDPM_QUALITY_N (default 64,
a few minutes: 300 steps of the 1.1M-parameter U-Net per image). Quality, not speed: this test
measures no time.
"""
import os

import numpy as np
import pytest

from harness import CUDA

from fastddpm.cli import main
from fastddpm.quality import evaluate

N = 297 if CUDA else int(os.environ.get("FASTDDPM_QUALITY_N", "64"))


def cli_fd(tmp_path, steps):
    out = tmp_path / f"ddim{steps}"
    assert main(["sample", "-n", str(N), "--steps", str(steps), "--seed", "1", "--batch-size", str(N),
                 "--out", str(out), "--no-progress"]) == 0
    with np.load(out / "samples.npz") as f:
        return evaluate(f["arr_0"])


@pytest.mark.slow
def test_cli_ddim_at_250_steps_is_not_worse_than_at_50(tmp_path):
    fd50, fd250 = (cli_fd(tmp_path, k)["samples"]["fd"] for k in (50, 250))
    print(f"\nshipped digits model, CLI DDIM, {N} images: FD {fd50:.2f} at 50 steps, {fd250:.2f} at 250 steps "
          f"({fd250 / fd50:.3f}x)")
    assert fd250 <= 1.10 * fd50, (fd50, fd250)

"""The command line and the shipped digits model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm.checkpoint import shipped_model_path
from fastddpm.cli import main
from fastddpm.quality import evaluate


def test_shipped_model_loads():
    model = fastddpm.load(shipped_model_path())
    assert sum(p.numel() for p in model.parameters()) == 1_112_801
    assert model.config.in_channels == 1 and model.config.image_size == 16
    assert model.fastddpm_schedule.num_steps == 1000 and model.fastddpm_prediction == "eps"


def test_demo_writes_a_png_and_prints_timings(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "-n", "4", "--steps", "3"]) == 0
    text = capsys.readouterr().out
    assert out.exists() and "images/s" in text and "ms/evaluation" in text
    from PIL import Image

    assert Image.open(out).size[0] > 16


def test_sample_then_eval(tmp_path, capsys):
    assert main(["sample", "-n", "6", "--out", str(tmp_path), "--steps", "4", "--no-progress", "--seed", "2"]) == 0
    with np.load(tmp_path / "samples.npz") as f:
        arr = f["arr_0"]
    assert arr.shape == (6, 16, 16, 1) and arr.dtype == np.uint8
    assert (tmp_path / "grid.png").exists()
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "samples.npz"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["samples"]["n"] == 6 and res["heldout_real"]["n"] == 297


def test_sample_with_dpm_solver(tmp_path, capsys):
    """`fastddpm sample --method dpmsolver++ --steps K` equals fastddpm.sample with the same arguments."""
    assert main(["sample", "-n", "3", "--out", str(tmp_path), "--steps", "4", "--no-progress", "--seed", "1",
                 "--method", "dpmsolver++", "--backend", "reference"]) == 0
    with np.load(tmp_path / "samples.npz") as f:
        got = f["arr_0"]
    from fastddpm.images import to_uint8_nhwc

    model = fastddpm.load(shipped_model_path())
    want = to_uint8_nhwc(fastddpm.sample(model, 3, steps=4, method="dpmsolver++", seed=1, backend="reference"))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert main(["sample", "-n", "1", "--out", str(tmp_path / "b"), "--order", "1", "--method", "ddim"]) == 2
    assert "order applies to" in capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2
    assert "data must be" in capsys.readouterr().err
    assert main(["sample", "-n", "0", "--out", str(tmp_path)]) == 2
    assert "n must be a positive int" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--method", "euler_a", "--out", str(tmp_path)])
    r = subprocess.run([sys.executable, "-m", "fastddpm", "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--resume" in r.stdout


@pytest.mark.slow
def test_shipped_model_scores_close_to_real_digits():
    """297 samples (DDIM, 50 steps): FD to the training digits within 2x of real held-out digits'
    (measured: 12.9 for 1000 samples' first 297 vs 11.5), confident classifications, every class present."""
    model = fastddpm.load(shipped_model_path())
    x = fastddpm.sample(model, 297, steps=50, method="ddim", seed=0, batch_size=297)
    res = evaluate(x)
    s, r = res["samples"], res["heldout_real"]
    assert s["fd_common"] < 2 * r["fd_common"], (s["fd_common"], r["fd_common"])
    assert s["confidence"] > 0.9
    assert min(s["histogram"]) > 0
    noise = evaluate(torch.rand(297, 1, 16, 16) * 2 - 1)["samples"]
    assert noise["fd_common"] > 20 * r["fd_common"]  # the measure separates digits from noise


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastddpm", "--help"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0 and "demo" in r.stdout

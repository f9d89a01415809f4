"""The command line and the shipped digits model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastddpm
from cond_models import tiny_cond_unet
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


# ------------------------------------------------------------------ --class / --guidance (issue 22)
@pytest.fixture
def cond_model(monkeypatch):
    """`fastddpm sample` given a tiny class-conditional model (K = 3) in place of the file it names."""
    import fastddpm.cli as cli

    model = tiny_cond_unet()
    monkeypatch.setattr(cli, "_load_sample_model", lambda a, device: (model, "tiny class-conditional"))
    return model


def read_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.keys()}


def test_sample_class_all_with_guidance_equals_the_api(cond_model, tmp_path, capsys):
    """--class all --guidance W: n images in one block per class (grid rows = classes), labels in
    samples.npz, the images those of fastddpm.sample with the same labels and guidance (the shards
    cut the labels with the images: shard 2 holds samples 4, 5 of class 2)."""
    from fastddpm.images import to_uint8_nhwc

    common = ["-n", "6", "--steps", "3", "--seed", "1", "--shard-size", "4", "--no-progress", "--backend", "reference",
              "--class", "all"]
    assert main(["sample", "--out", str(tmp_path / "g"), *common, "--guidance", "3", "--guidance-rescale", "0.5",
                 "--guidance-interval", "0.5", "inf"]) == 0
    assert "keys arr_0 and labels" in capsys.readouterr().out
    got = read_npz(tmp_path / "g/samples.npz")
    assert got["labels"].dtype == np.int64 and got["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    kw = dict(steps=3, method="ddim", seed=1, backend="reference")
    want = to_uint8_nhwc(fastddpm.sample(cond_model, 6, class_labels=labels, guidance_scale=3.0, guidance_rescale=0.5,
                                         guidance_interval=(0.5, float("inf")), **kw))
    assert np.abs(got["arr_0"].astype(int) - want.astype(int)).max() <= 1
    other = to_uint8_nhwc(fastddpm.sample(cond_model, 6, class_labels=labels.roll(2), guidance_scale=3.0,
                                          guidance_rescale=0.5, guidance_interval=(0.5, float("inf")), **kw))
    assert np.abs(got["arr_0"].astype(int) - other.astype(int)).max() > 1  # the labels decide the images
    # without --guidance: the conditional model alone (w = 1), a different set
    assert main(["sample", "--out", str(tmp_path / "c"), *common]) == 0
    plain = read_npz(tmp_path / "c/samples.npz")
    assert plain["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert np.abs(plain["arr_0"].astype(int) - got["arr_0"].astype(int)).max() > 1
    from PIL import Image

    assert Image.open(tmp_path / "g/grid.png").size == ((2 * 9 + 1) * 8, (3 * 9 + 1) * 8)  # 3 rows of 2


def test_sample_class_lists_and_one_label(cond_model, tmp_path):
    from fastddpm.cli import class_labels

    assert class_labels((2, 0), 5, 3).tolist() == [2, 2, 2, 0, 0]
    assert class_labels("all", 7, 3).tolist() == [0, 0, 0, 1, 1, 2, 2]
    common = ["-n", "3", "--steps", "2", "--no-progress", "--backend", "reference"]
    assert main(["sample", "--out", str(tmp_path / "one"), *common, "--class", "2"]) == 0
    assert read_npz(tmp_path / "one/samples.npz")["labels"].tolist() == [2, 2, 2]
    assert main(["sample", "--out", str(tmp_path / "list"), *common, "--class", "1,0,1"]) == 0
    assert read_npz(tmp_path / "list/samples.npz")["labels"].tolist() == [1, 0, 1]


def test_sample_without_class_writes_no_labels(tmp_path):
    assert main(["sample", "-n", "2", "--out", str(tmp_path), "--steps", "2", "--no-progress",
                 "--model", "digits"]) == 0
    assert list(read_npz(tmp_path / "samples.npz")) == ["arr_0"]


def test_class_and_guidance_errors_are_clear(cond_model, tmp_path, capsys):
    def err(*args):
        out = tmp_path / "e"
        assert main(["sample", "--out", str(out), "-n", "4", "--steps", "2", "--no-progress", *args]) == 2
        assert not out.exists()  # refused before anything is written
        return capsys.readouterr().err

    e = err("--class", "5")
    assert "--class 5" in e and "[5]" in e and "3 classes, labels 0..2" in e
    e = err("--class", "all", "-n", "2")
    assert "--class all" in e and "-n is 2" in e
    e = err("--guidance", "3")
    assert "--guidance needs --class" in e
    e = err("--class", "1", "--guidance-rescale", "0.3")
    assert "--guidance-rescale" in e and "pass --guidance too" in e
    e = err("--class", "1", "--guidance", "3", "--guidance-rescale", "1.5")
    assert "--guidance-rescale must be in [0, 1]" in e and "1.5" in e
    e = err("--class", "1", "--guidance", "3", "--guidance-interval", "2", "1")
    assert "--guidance-interval 2 1" in e and "0 <= LO < HI" in e
    e = err("--class", "1", "--guidance", "nan")
    assert "--guidance must be a finite number" in e
    with pytest.raises(SystemExit):
        main(["sample", "--out", str(tmp_path / "e"), "--class", "one"])
    assert "argument --class: must be a class label" in capsys.readouterr().err


def test_class_on_an_unconditional_model_and_model_choice_errors(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["sample", "--out", str(out), "-n", "2", "--class", "3", "--guidance", "2"]) == 2
    e = capsys.readouterr().err
    assert "--class 3: the model (shipped digits model) is not class-conditional" in e and "--model digits-cond" in e
    assert main(["sample", "--out", str(out), "--model", "digits", "--checkpoint", "runs/x"]) == 2
    e = capsys.readouterr().err
    assert "--checkpoint 'runs/x' and --model 'digits' both choose the model" in e
    assert not out.exists()


def test_resume_with_other_class_or_guidance_is_refused(cond_model, tmp_path, capsys):
    common = ["sample", "--out", str(tmp_path), "-n", "4", "--steps", "2", "--shard-size", "2", "--no-progress",
              "--backend", "reference"]
    assert main([*common, "--class", "all", "--guidance", "3"]) == 0
    manifest = json.load(open(tmp_path / "shards/manifest.json"))
    assert manifest["class"] == "all" and manifest["guidance_scale"] == 3.0 and len(manifest["labels_sha256"]) == 64
    os.remove(tmp_path / "samples.npz")
    assert main([*common, "--class", "all", "--guidance", "2"]) == 2
    e = capsys.readouterr().err
    assert "other arguments" in e and "'guidance_scale': (3.0, 2.0)" in e
    assert main([*common, "--class", "2,1", "--guidance", "3"]) == 2
    e = capsys.readouterr().err
    assert "other arguments" in e and "labels_sha256" in e and "'class': ('all', [2, 1])" in e
    assert main([*common, "--class", "all", "--guidance", "3"]) == 0  # the same arguments complete it
    assert read_npz(tmp_path / "samples.npz")["labels"].tolist() == [0, 0, 1, 2]


def test_model_digits_cond_is_the_shipped_class_conditional_model(tmp_path, capsys):
    """--model digits-cond loads fastddpm.load("digits-cond"); where this installation does not ship
    it, the error names the option and the model (no traceback)."""
    try:
        model = fastddpm.load("digits-cond")
    except FileNotFoundError:
        model = None
    out = tmp_path / "s"
    rc = main(["sample", "--model", "digits-cond", "--class", "all", "-n", "10", "--steps", "2", "--no-progress",
               "--out", str(out)])
    if model is None:
        assert rc == 2 and "--model digits-cond: this installation has no shipped model 'digits-cond'" in \
            capsys.readouterr().err
        return
    assert rc == 0 and model.config.num_classes == 10
    assert read_npz(out / "samples.npz")["labels"].tolist() == list(range(10))

"""What a newcomer trips on (issue 17): every message a user sees here is checked word for
word. The CLI is driven as a user runs it (cli.main with argv, or a subprocess)."""
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import checkpoint as ck
from fastddpm.cli import main
from fastddpm.data import load_digits
from fastddpm.images import to_uint8_nhwc

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
PKG = os.path.dirname(fastddpm.__file__)
REPO = os.path.dirname(PKG)


def exact(text):
    return "^" + re.escape(text) + "$"


def tiny_unet(tmp_path, name="tiny.safetensors"):
    torch.manual_seed(0)
    unet = fastddpm.UNet.from_preset("tiny", ch=16, norm_groups=8, image_size=8, in_channels=1)
    path = str(tmp_path / name)
    ck.save_model(unet, path, arch="unet", schedule=ck.schedule_meta("linear", 1000), prediction="eps")
    return unet, path


# ------------------------------------------------------------------ 1. checkpoint errors
def pickle_message(path, kind):
    return (f"{path!r} is {kind}, not a safetensors file. fastddpm never unpickles files (unpickling can run "
            "arbitrary code). To convert a checkpoint you trust: in a trusted environment, "
            "state = torch.load(path, map_location='cpu', weights_only=True); load it into the model "
            "(model.load_state_dict(state)) and write it with fastddpm.checkpoint.save_model(model, "
            "'model.safetensors', arch=..., schedule=..., prediction=...), or save the tensors with "
            "safetensors.torch.save_file(state, 'weights.safetensors')")


def test_checkpoint_errors_say_what_the_file_is(tmp_path):
    unet, good = tiny_unet(tmp_path)
    zip_pt, legacy_pt = str(tmp_path / "m.pt"), str(tmp_path / "legacy.pth")
    torch.save(unet.state_dict(), zip_pt)
    torch.save(unet.state_dict(), legacy_pt, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=exact(pickle_message(
            zip_pt, "a zip archive: a PyTorch pickle checkpoint (torch.save, usually .pt / .pth / .ckpt)"))):
        fastddpm.load(zip_pt)
    with pytest.raises(ValueError, match=exact(pickle_message(
            legacy_pt, "a pickle file (a legacy torch.save checkpoint, usually .pt / .pth / .pkl)"))):
        fastddpm.load(legacy_pt)
    text = tmp_path / "notes.txt"
    text.write_text("step 100: loss 0.03\n")
    with pytest.raises(ValueError, match=exact(f"{str(text)!r} is not a safetensors file: it looks like a text file "
                                               "(it starts with b'step 100: loss 0')")):
        fastddpm.load(str(text))
    data = open(good, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:20])
    n_header = 8 + int.from_bytes(data[:8], "little")
    with pytest.raises(ValueError, match=exact(
            f"{str(cut)!r} is a truncated or corrupt safetensors file: its header says {n_header} bytes of header, "
            "the file holds 20 bytes; it was cut short (an interrupted copy or download?): copy or write it again")):
        fastddpm.load(str(cut))
    cut.write_bytes(data[:-1])  # whole header, cut data
    with pytest.raises(ValueError, match="^" + re.escape(f"{str(cut)!r} is a truncated or corrupt safetensors file (")
                       + r".*\); copy or write it again$"):
        fastddpm.load(str(cut))
    # the good file still loads; the checks did not touch it
    assert fastddpm.load(good).config.image_size == 8


def test_no_message_advises_deleting_a_file():
    pattern = re.compile(r"\b(delete|remove|rm -)\w*", re.I)
    offenders = []
    for folder in (PKG, os.path.join(REPO, "kernels")):
        for root, _, files in os.walk(folder):
            for f in files:
                if f.endswith(".py"):
                    for i, line in enumerate(open(os.path.join(root, f)), 1):
                        # messages are string literals: look inside quotes only
                        for lit in re.findall(r"\"[^\"]*\"|'[^']*'", line):
                            if pattern.search(lit):
                                offenders.append(f"{f}:{i}: {lit}")
    assert not offenders, offenders


@NO_CUDA
def test_cuda_device_without_cuda_is_a_device_error(tmp_path, capsys):
    msg = "device='cuda' but CUDA is not available on this machine (torch.cuda.is_available() is False); " \
          "pass device='cpu'"
    with pytest.raises(ValueError, match=exact(msg)):
        fastddpm.load(device="cuda")
    with pytest.raises(ValueError, match=exact(msg)):  # 9: a plain callable, no parameters to tell the device
        fastddpm.sample(lambda x, t: x, 2, shape=(1, 4, 4), steps=2, device="cuda")
    with pytest.raises(ValueError, match=exact(msg)):
        fastddpm.sample(fastddpm.UNet.from_preset("tiny"), 2, steps=2, device="cuda")
    cli_msg = "--device='cuda' but CUDA is not available on this machine (torch.cuda.is_available() is False); " \
              "pass --device='cpu'"
    # checked before the file is read: a missing file is not reported, the device is
    assert main(["sample", "--device", "cuda", "--checkpoint", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"fastddpm sample: error: {cli_msg}\n"
    assert not (tmp_path / "o").exists()
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path / "d.png")]) == 2
    assert capsys.readouterr().err == f"fastddpm demo: error: {cli_msg}\n"
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err == f"fastddpm train: error: {cli_msg}\n"


def test_cli_names_a_pickle_checkpoint(tmp_path, capsys):
    unet, _ = tiny_unet(tmp_path)
    pt = str(tmp_path / "model.pt")
    torch.save(unet.state_dict(), pt)
    assert main(["sample", "--checkpoint", pt, "--out", str(tmp_path / "o"), "-n", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == "fastddpm sample: error: " + pickle_message(
        pt, "a zip archive: a PyTorch pickle checkpoint (torch.save, usually .pt / .pth / .ckpt)") + "\n"


# ------------------------------------------------------------------ 2 and 4. eval output
def save_npz(path, x):
    np.savez(path, arr_0=to_uint8_nhwc(x))
    return str(path)


def test_eval_labels_counts_and_gives_a_verdict(tmp_path, capsys):
    real = save_npz(tmp_path / "real.npz", load_digits("heldout")[:64])
    assert main(["eval", real]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == ("fastddpm eval: 64 samples against 297 held-out real digits. FD = Frechet distance of a "
                        "digit classifier's features to the training digits: lower is better; real digits set the "
                        "floor.")
    assert re.fullmatch(r"FD, 64 images each +\d+\.\d\d +\d+\.\d\d", lines[2])
    assert re.fullmatch(r"FD ratio \(samples / real\) +1\.00", lines[3])  # the same 64 images on both sides
    assert lines[4] == "verdict: close to real digits (FD ratio 1.00 over 64 images each; 1 = as good as real digits)"
    assert re.fullmatch(r"FD, all images +\d+\.\d\d +\d+\.\d\d   \(64 vs 297 images\)", lines[5])
    assert lines[6] == ("  warning: FDs over different numbers of images do not compare (FD grows as the count "
                        "shrinks): compare the '64 images each' row, or runs evaluated on the same number of samples")
    assert lines[7] == "  note: 64 images give a noisy, upward-biased FD; 297 or more samples give a steadier figure"
    assert lines[9] == ("  note: confidence is the classifier's mean top-class probability; it is NOT a quality score "
                        "(blobs and noise can score high): judge by the FD ratio")
    assert "FD (297 images)" not in out

    noise = save_npz(tmp_path / "noise.npz", torch.rand(300, 1, 16, 16) * 2 - 1)
    assert main(["eval", noise, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["samples"]["n_common"] == res["heldout_real"]["n_common"] == 297
    assert res["fd_ratio"] > 10 and res["verdict"] == "not digits (as far off as noise)"


# ------------------------------------------------------------------ 3. resume with nothing to resume
def test_resume_with_nothing_to_resume_says_so(tmp_path):
    out = tmp_path / "fresh"
    cmd = [sys.executable, "-m", "fastddpm", "train", "--data", "moons", "--out", str(out), "--steps", "2",
           "--batch-size", "16", "--log-every", "1", "--no-progress", "--resume"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (f"UserWarning: resume=True (--resume) but {str(out)!r} holds no checkpoint.safetensors: nothing to "
            "resume, training starts from step 0") in r.stderr
    assert ck.read(str(out / "checkpoint.safetensors"))[1]["step"] == "2"


# ------------------------------------------------------------------ 5. progress per step
def test_sample_progress_counts_steps_on_one_bar(tmp_path, capsys):
    _, path = tiny_unet(tmp_path)
    assert main(["sample", "--checkpoint", path, "-n", "5", "--shard-size", "2", "--steps", "3", "--batch-size", "2",
                 "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    # shards of 2, 2 and 1 samples, one batch each: 3 batches x 3 steps on one bar
    assert "sampling: 100%" in err and "9/9" in err and "shard" not in err
    assert main(["demo", "-n", "2", "--steps", "3", "--out", str(tmp_path / "d.png")]) == 0
    err = capsys.readouterr().err
    assert "demo: 100%" in err and "3/3" in err  # one timed reference run on a CPU


def test_steps_all_is_every_training_step():
    """--steps all is the API's steps=None (every step of the training schedule)."""
    from fastddpm.cli import build_parser

    for cmd in ("demo", "sample"):
        extra = ["--out", "x"] if cmd == "sample" else []
        assert build_parser().parse_args([cmd, "--steps", "all", *extra]).steps is None
        assert build_parser().parse_args([cmd, "--steps", "7", *extra]).steps == 7


# ------------------------------------------------------------------ 6. a failed run claims nothing
ETA_TAKERS = ("'ddim' / 'euler_ancestral' / 'dpm_2_ancestral' / 'dpmpp_2s_ancestral' / 'dpmpp_sde' / 'dpmpp_2m_sde' / "
              "'dpmpp_3m_sde'")


def test_failed_run_does_not_claim_its_folder(tmp_path, capsys):
    _, path = tiny_unet(tmp_path)
    out = str(tmp_path / "o")
    args = ["sample", "--checkpoint", path, "-n", "3", "--steps", "2", "--out", out, "--no-progress"]
    assert main(args + ["--method", "ddpm", "--eta", "0.5"]) == 2
    assert capsys.readouterr().err == (f"fastddpm sample: error: eta applies to method={ETA_TAKERS} only; got eta=0.5 "
                                       "with method='ddpm' (DDPM's noise is set by variance=); leave it out (or pass "
                                       "eta=0.0) or choose one of those methods\n")
    assert main(args + ["--method", "ddpm"]) == 0  # the corrected command, same folder
    assert main(args + ["--method", "ddim"]) == 2  # a folder holding shards is claimed
    assert capsys.readouterr().err.startswith(f"fastddpm sample: error: {os.path.join(out, 'shards')} holds shards "
                                              "of a run with other arguments (was, now): {'method': ('ddpm', 'ddim')}; "
                                              "rerun with the arguments it was started with to complete it, or "
                                              "choose another --out folder")


# ------------------------------------------------------------------ 7. silent ignores
def test_eta_with_ddpm_is_an_error():
    with pytest.raises(ValueError, match=exact(f"eta applies to method={ETA_TAKERS} only; got eta=0.3 with "
                                               "method='ddpm' (DDPM's noise is set by variance=); leave it out (or "
                                               "pass eta=0.0) or choose one of those methods")):
        fastddpm.sample(lambda x, t: x, 2, shape=(1, 4, 4), steps=2, method="ddpm", eta=0.3)


def test_seed_and_generator_together_is_an_error():
    model = lambda x, t: x * 0  # noqa: E731
    with pytest.raises(ValueError, match=exact(
            "pass seed= or generator=, not both (got seed=3 and a generator): seed= selects the counter-based noise "
            "stream, generator= torch draws")):
        fastddpm.sample(model, 2, shape=(1, 4, 4), steps=2, seed=3, generator=torch.Generator())
    # neither: seed 0's stream (DESIGN.md)
    a = fastddpm.sample(model, 2, shape=(1, 4, 4), steps=3)
    torch.testing.assert_close(a, fastddpm.sample(model, 2, shape=(1, 4, 4), steps=3, seed=0), rtol=0, atol=0)
    assert not torch.equal(a, fastddpm.sample(model, 2, shape=(1, 4, 4), steps=3, seed=1))
    g = fastddpm.sample(model, 2, shape=(1, 4, 4), steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(g).all() and not torch.equal(a, g)


def test_shape_other_than_the_models_warns():
    unet = fastddpm.UNet.from_preset("tiny", ch=16, norm_groups=8, image_size=8, in_channels=1)
    with pytest.warns(UserWarning, match=exact(
            "shape=(1, 16, 16) differs from the model's configured sample shape (1, 8, 8): the model was trained at "
            "that size, so samples at another size are not what it learned; leave shape= out to use the configured "
            "one")):
        x = fastddpm.sample(unet, 1, shape=(1, 16, 16), steps=2)
    assert x.shape == (1, 1, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastddpm.sample(unet, 1, shape=(1, 8, 8), steps=2)  # the configured shape: no warning


def test_steps_zero_is_refused_by_api_and_cli(tmp_path, capsys):
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match=exact(
                f"steps must be a positive int (the number of sampling steps) or None (all of the schedule's steps); "
                f"got {bad!r}")):
            fastddpm.sample(lambda x, t: x, 2, shape=(1, 4, 4), steps=bad)
    r = subprocess.run([sys.executable, "-m", "fastddpm", "sample", "--steps", "0", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == ("fastddpm sample: error: argument --steps: must be a positive int or 'all' "
                                         "(every training step); got '0'")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 8. guidance
def test_load_without_a_path_is_the_shipped_model():
    m = fastddpm.load()
    assert m.config.in_channels == 1 and m.config.image_size == 16
    shipped = fastddpm.load(ck.shipped_model_path())
    for a, b in zip(m.state_dict().values(), shipped.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match=exact("path must be a run folder or a .safetensors file path (or None for "
                                              "the shipped model); got int")):
        fastddpm.load(3)
    readme = open(os.path.join(REPO, "README.md")).read()
    assert "fastddpm.load()" in readme


def test_train_help_shows_defaults_and_presets():
    r = subprocess.run([sys.executable, "-m", "fastddpm", "train", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # argparse wraps lines
    for expected in ("optimizer steps (default: 4000)", "global batch size (divided among torchrun processes) "
                     "(default: 128)", "AdamW learning rate (default: 0.0002)", "(default: 0.999)",
                     "write a checkpoint every this many steps (default: 500)", "(default: 5.0)",
                     "ddpm-256, ddpm-cifar10, digits-16, tiny"):
        assert expected in text, expected


# ------------------------------------------------------------------ 2. raw weights beside the EMA
def test_load_raw_weights_of_a_run(tmp_path, capsys):
    """weights='raw' (API) / --weights raw (CLI) read the optimizer's weights from the run's checkpoint;
    the default stays the EMA; a model file (one set of weights) refuses 'raw' and says why."""
    from fastddpm.train import train

    run = str(tmp_path / "run")
    train(data="moons", out=run, model="mlp", steps=3, batch_size=32, warmup=0, ema_decay=0.9, progress=False)
    tensors, _ = ck.read(os.path.join(run, ck.CHECKPOINT))
    raw, ema = fastddpm.load(run, weights="raw"), fastddpm.load(run)
    for k, v in raw.state_dict().items():
        torch.testing.assert_close(v, tensors[f"model.{k}"], rtol=0, atol=0)
        torch.testing.assert_close(ema.state_dict()[k], tensors[f"ema.{k}"], rtol=0, atol=0)
    assert any(not torch.equal(v, ema.state_dict()[k]) for k, v in raw.state_dict().items())
    raw_file = fastddpm.load(os.path.join(run, ck.CHECKPOINT), weights="raw")
    assert all(torch.equal(v, raw_file.state_dict()[k]) for k, v in raw.state_dict().items())

    with pytest.raises(ValueError, match=exact("weights must be one of ('ema', 'raw'); got 'last'")):
        fastddpm.load(run, weights="last")
    model_file = os.path.join(run, ck.MODEL)
    with pytest.raises(ValueError, match=exact(
            f"weights='raw' needs a training checkpoint (checkpoint.safetensors of a run folder, which holds the raw "
            f"and the EMA weights); {model_file!r} is a model file with one set of weights: load it with "
            "weights='ema' (the default)")):
        fastddpm.load(model_file, weights="raw")
    only_model = tmp_path / "exported"
    only_model.mkdir()
    os.link(model_file, only_model / ck.MODEL)
    with pytest.raises(FileNotFoundError, match=exact(
            f"{str(only_model)!r} has no checkpoint.safetensors (weights='raw' reads a training run's checkpoint, "
            "which holds the raw and the EMA weights)")):
        fastddpm.load(str(only_model), weights="raw")
    fastddpm.load(str(only_model))  # the EMA model file still loads

    # the CLI: the shipped model is a model file; a run's raw samples differ from its EMA samples
    assert main(["sample", "--weights", "raw", "--out", str(tmp_path / "o0"), "-n", "2", "--device", "cpu"]) == 2
    shipped = ck.shipped_model_path()
    assert capsys.readouterr().err == (
        f"fastddpm sample: error: weights='raw' needs a training checkpoint (checkpoint.safetensors of a run folder, "
        f"which holds the raw and the EMA weights); {shipped!r} is a model file with one set of weights: load it "
        "with weights='ema' (the default)\n")
    assert not os.path.exists(tmp_path / "o0" / "samples.npz")


def test_cli_samples_raw_weights_of_a_digits_run(tmp_path):
    """`fastddpm sample --weights raw` on an image run: the samples of the raw weights, not the EMA's."""
    run = tmp_path / "run"
    from fastddpm.train import train

    train(data="digits", out=str(run), model="tiny", model_overrides={"ch": 16, "norm_groups": 8}, steps=2,
          batch_size=8, warmup=0, ema_decay=0.5, progress=False)
    out = {}
    for w in ("ema", "raw"):
        assert main(["sample", "--checkpoint", str(run), "--weights", w, "--out", str(tmp_path / w), "-n", "3",
                     "--steps", "2", "--no-progress", "--device", "cpu"]) == 0
        with np.load(tmp_path / w / "samples.npz") as f:
            out[w] = f["arr_0"]
    model = fastddpm.load(str(run), weights="raw")
    x = fastddpm.sample(model, 3, steps=2, method="ddim", seed=0, backend="reference", progress=False)
    np.testing.assert_array_equal(out["raw"], to_uint8_nhwc(x))
    assert not np.array_equal(out["raw"], out["ema"])

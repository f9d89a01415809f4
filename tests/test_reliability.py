"""Issue 24, nothing lost: the data-loss cases through the real CLI in subprocesses. Two
`fastddpm sample` runs into one folder (the second is refused before sampling; a killed run's
lock does not block the rerun); `train --resume` with an option that contradicts the run
(refused, naming both values; nothing changed); `train --resume --steps N` at or below the
run's step (said, nothing changed)."""
import json
import re
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import checkpoint as ck
from fastddpm.cli import main
from fastddpm.images import to_uint8_nhwc

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}


def fastddpm_cmd(*args):
    return [sys.executable, "-m", "fastddpm", *map(str, args)]


def run(*args, rc=0):
    r = subprocess.run(fastddpm_cmd(*args), capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == rc, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def snapshot(folder):
    """{name: (bytes, mtime_ns)} of every file under folder: what 'nothing changed' compares."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = (open(p, "rb").read(), os.stat(p).st_mtime_ns)
    return out


# ------------------------------------------------------------------ two sample runs into one folder
def test_second_sample_run_into_a_busy_folder_is_refused_and_a_killed_run_resumes(tmp_path, capsys):
    torch.manual_seed(0)
    unet = fastddpm.UNet.from_preset("tiny", ch=16, norm_groups=8, image_size=8, in_channels=1)
    model_path = str(tmp_path / "tiny.safetensors")
    ck.save_model(unet, model_path, arch="unet", schedule=ck.schedule_meta("linear", 1000), prediction="eps")
    out = tmp_path / "o"
    common = ["--checkpoint", model_path, "--out", out, "-n", "4", "--shard-size", "2", "--steps", "60",
              "--no-progress", "--backend", "reference"]
    first = subprocess.Popen(fastddpm_cmd("sample", *common, "--seed", "1"), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    lock = out / "shards" / "lock"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
        if lock.exists() and lock.read_text().startswith(f"pid {first.pid},"):
            break
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)  # the first run holds the folder, mid-sampling
    try:
        assert first.poll() is None and not (out / "samples.npz").exists(), "the first run ended before the test"
        holder = lock.read_text()
        assert holder.startswith(f"pid {first.pid}, host {socket.gethostname()}, started ")
        # a second process (this one) runs the CLI with another seed
        assert main(["sample", *map(str, common), "--seed", "2"]) == 2
        assert capsys.readouterr().err == (
            f"fastddpm sample: error: {out} is in use by another fastddpm sample run ({holder}): two runs into one "
            "folder would mix their samples. Wait for it to finish (to complete the same set, rerun with the same "
            "arguments afterwards: finished shards are kept), or choose another --out folder\n")
        assert sorted(os.listdir(out / "shards")) <= ["lock", "manifest.json", "shard-000000.npz"]
    finally:
        os.kill(first.pid, signal.SIGKILL)  # and then it crashes, holding the lock
        first.wait()
    # the OS released the dead run's lock: the same command completes the set
    run("sample", *common, "--seed", "1")
    with np.load(out / "samples.npz") as f:
        got = f["arr_0"]
    want = to_uint8_nhwc(fastddpm.sample(unet, 4, steps=60, method="ddim", seed=1, batch_size=2,
                                         backend="reference"))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float32 rounding may move a pixel by 1
    assert json.load(open(out / "shards" / "manifest.json"))["seed"] == 1


def test_sample_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "samples.npz"
    f.write_bytes(b"mine")
    assert main(["sample", "--out", str(f), "-n", "2", "--steps", "2", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"fastddpm sample: error: --out={str(f)!r} is a file: it must be a folder (it receives samples.npz, grid.png "
        "and shards/); pass a folder path\n")
    inner = str(f / "deeper")
    assert main(["sample", "--out", inner, "-n", "2", "--steps", "2", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"fastddpm sample: error: --out={inner!r} is inside {str(f)!r}, which is a file: it must be a folder (it "
        "receives samples.npz, grid.png and shards/); pass a folder path\n")
    assert f.read_bytes() == b"mine"
    with pytest.raises(ValueError, match="^out_dir="):
        from fastddpm.distributed import sample_to_folder

        sample_to_folder(lambda x, t: x, 2, str(f), shard_size=2, shape=(1, 4, 4))


# ------------------------------------------------------------------ train --resume
def test_resume_refuses_contradicting_options_and_steps_it_is_past(tmp_path, capsys):
    from fastddpm.train import TrainConfig, train

    run_dir = str(tmp_path / "run")
    cfg = TrainConfig(data="moons", out=run_dir, model="mlp", steps=3, batch_size=16, lr=1e-3, warmup=1,
                      log_every=1, progress=False)
    train(cfg)
    before = snapshot(run_dir)
    assert {"checkpoint.safetensors", "model.safetensors", "log.jsonl"} <= set(before)

    # another objective and batch size: refused before any work, both values named, nothing changed
    r = run("train", "--out", run_dir, "--resume", "--prediction", "v", "--batch-size", "32", "--no-progress", rc=2)
    assert r.stderr.splitlines()[-1] == (
        f"fastddpm train: error: resume=True (--resume) continues the run in {run_dir!r} as it was configured, but "
        "prediction='v' (the run's: 'eps'), batch_size=32 (the run's: 16) contradict its checkpoint (step 3); pass "
        "prediction='eps' (--prediction eps), batch_size=16 (--batch-size 16) or leave them out on the command line, "
        "or train a new run into another out folder")
    assert snapshot(run_dir) == before
    # fewer steps than the run has made: said, nothing changed (model.safetensors keeps its bytes and mtime)
    r = run("train", "--out", run_dir, "--resume", "--steps", "2", "--no-progress", rc=2)
    assert r.stderr.splitlines()[-1] == (
        f"fastddpm train: error: steps=2 but the run in {run_dir!r} is already at step 3 (its checkpoint), past 2: "
        "nothing was trained and no file was changed; pass steps above 3 (--steps) to train further, or sample the "
        f"run as it is (fastddpm sample --checkpoint {run_dir})")
    assert "trained to step" not in r.stdout and snapshot(run_dir) == before
    # the run's own step count: a note, nothing changed
    assert main(["train", "--out", run_dir, "--resume", "--steps", "3", "--no-progress"]) == 0
    assert capsys.readouterr().err == (f"fastddpm train: the run in {run_dir!r} is already at step 3 (steps=3): "
                                       "nothing to train, no file changed\n")
    assert snapshot(run_dir) == before
    # the Python API compares the whole configuration it is given
    with pytest.raises(ValueError, match="^" + re.escape(
            f"resume=True (--resume) continues the run in {run_dir!r} as it was configured, but seed=1 (the run's: "
            "0) contradicts its checkpoint (step 3); pass seed=0 (--seed 0) or leave")):
        train(cfg, resume=True, seed=1, steps=5)
    assert snapshot(run_dir) == before

    # a tunable option may change: said on stderr and in log.jsonl; the options not given are the run's
    assert main(["train", "--out", run_dir, "--resume", "--steps", "4", "--lr", "2e-3", "--no-progress"]) == 0
    assert capsys.readouterr().err == (f"fastddpm train: resuming the run in {run_dir!r} at step 3 with changed "
                                       "options: lr 0.001 -> 0.002\n")
    log = [json.loads(ln) for ln in open(os.path.join(run_dir, "log.jsonl"))]
    assert [rec["step"] for rec in log] == [1, 2, 3, 3, 4] and log[3] == {"step": 3, "changed": {"lr": [1e-3, 2e-3]}}
    meta = ck.read(os.path.join(run_dir, "checkpoint.safetensors"))[1]
    stored = json.loads(meta["config"])
    assert (meta["step"], stored["data"], stored["batch_size"], stored["prediction"], stored["lr"]) == \
        ("4", "moons", 16, "eps", 2e-3)

"""torchrun on the CPU (gloo): sharded sampling equals one process, a killed run completes
its set, and two-process training makes the one-process update."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastddpm
from cond_models import tiny_cond_unet
from fastddpm import checkpoint as ck
from fastddpm.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def fastddpm_cmd(args, nproc=None):
    if nproc is None:
        return [sys.executable, "-m", "fastddpm", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "fastddpm", *args]


def run(args, nproc=None, timeout=300):
    r = subprocess.run(fastddpm_cmd(args, nproc), capture_output=True, text=True, timeout=timeout, env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ck") / "tiny.safetensors")
    torch.manual_seed(0)
    unet = fastddpm.UNet.from_preset("tiny", ch=16, norm_groups=8, image_size=8)
    ck.save_model(unet, path, arch="unet", schedule=ck.schedule_meta("linear", 1000), prediction="eps")
    return path


def load_npz(path):
    with np.load(path) as f:
        return f["arr_0"]


def sample_args(ckpt, out, **kw):
    args = {"--checkpoint": ckpt, "--num-samples": "10", "--out": str(out), "--steps": "6", "--seed": "3",
            "--shard-size": "3", "--no-progress": None}
    args.update(kw)
    return ["sample"] + [x for k, v in args.items() for x in ((k,) if v is None else (k, v))]


def test_sharded_sampling_equals_one_process(tiny_checkpoint, tmp_path):
    run(sample_args(tiny_checkpoint, tmp_path / "one"))
    run(sample_args(tiny_checkpoint, tmp_path / "two"), nproc=2)
    one, two = load_npz(tmp_path / "one/samples.npz"), load_npz(tmp_path / "two/samples.npz")
    assert one.shape == (10, 8, 8, 3) and one.dtype == np.uint8
    np.testing.assert_array_equal(one, two)
    index = json.load(open(tmp_path / "two/shards/index.json"))
    assert [(s["start"], s["stop"]) for s in index["shards"]] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert (tmp_path / "two/grid.png").exists()
    # the library keyword does the same from a user's own code
    model = fastddpm.load(tiny_checkpoint)
    full = fastddpm.sample(model, 10, steps=6, method="ddim", seed=3, batch_size=3)
    part = fastddpm.sample(model, 4, steps=6, method="ddim", seed=3, batch_size=3, sample_offset=3)
    torch.testing.assert_close(part[:3], full[3:6], rtol=0, atol=0)


def test_killed_run_completes_the_set(tiny_checkpoint, tmp_path):
    run(sample_args(tiny_checkpoint, tmp_path / "ref", **{"--shard-size": "1"}))
    out = tmp_path / "killed"
    args = sample_args(tiny_checkpoint, out, **{"--shard-size": "1", "--steps": "40"})
    proc = subprocess.Popen(fastddpm_cmd(args, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    shards = out / "shards"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if shards.exists() and len([f for f in os.listdir(shards) if f.startswith("shard-")]) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(f for f in os.listdir(shards) if f.startswith("shard-"))
    assert 2 <= len(done) < 10, done
    assert not (out / "samples.npz").exists()
    mtimes = {f: os.path.getmtime(shards / f) for f in done}
    run(args, nproc=2)
    assert all(os.path.getmtime(shards / f) == m for f, m in mtimes.items())  # finished shards were skipped
    got = load_npz(out / "samples.npz")
    assert got.shape[0] == 10 and not [f for f in os.listdir(shards) if f.startswith(".tmp")]
    ref_args = sample_args(tiny_checkpoint, tmp_path / "ref40", **{"--shard-size": "1", "--steps": "40"})
    run(ref_args)
    np.testing.assert_array_equal(got, load_npz(tmp_path / "ref40/samples.npz"))


def test_restart_with_other_arguments_is_refused(tiny_checkpoint, tmp_path):
    run(sample_args(tiny_checkpoint, tmp_path / "r"))
    r = subprocess.run(fastddpm_cmd(sample_args(tiny_checkpoint, tmp_path / "r", **{"--seed": "4"})),
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "other arguments" in r.stderr and "seed" in r.stderr


def test_two_process_training_makes_the_one_process_update(tmp_path):
    common = ["--data", "moons", "--batch-size", "64", "--lr", "1e-3", "--warmup", "1", "--ckpt-every", "2",
              "--log-every", "1", "--no-progress"]
    run(["train", "--out", str(tmp_path / "two"), "--steps", "3", *common], nproc=2)
    train(TrainConfig(data="moons", out=str(tmp_path / "one"), model="mlp", steps=3, batch_size=64, lr=1e-3,
                      warmup=1, ckpt_every=2, log_every=1, progress=False))
    a, _ = ck.read(str(tmp_path / "one/checkpoint.safetensors"))
    b, meta = ck.read(str(tmp_path / "two/checkpoint.safetensors"))
    assert meta["step"] == "3"
    for k in a:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # resume the two-process run on one process: the same as six steps on one process
    run(["train", "--out", str(tmp_path / "two"), "--steps", "6", "--resume", *common])
    train(TrainConfig(data="moons", out=str(tmp_path / "one"), model="mlp", steps=6, batch_size=64, lr=1e-3,
                      warmup=1, ckpt_every=2, log_every=1, progress=False), resume=True)
    a, _ = ck.read(str(tmp_path / "one/checkpoint.safetensors"))
    b, meta = ck.read(str(tmp_path / "two/checkpoint.safetensors"))
    assert meta["step"] == "6"
    for k in a:
        if k.startswith("model."):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)
    log = [json.loads(ln)["step"] for ln in open(tmp_path / "two/log.jsonl")]
    assert log == [1, 2, 3, 4, 5, 6]


def _workers(parent_pid):
    """{rank: pid} of torchrun's worker processes (Linux /proc)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent_pid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env:
            out[int(env[b"RANK"])] = int(pid)
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("target", ["rank 1", "torchrun"])
def test_sigterm_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path, target):
    """SIGTERM to one rank (a scheduler's kill) or to torchrun (which forwards it to the workers,
    not at the same step): every rank stops after the same step, rank 0's checkpoint is of that
    step, and the run resumes to the uninterrupted run's weights."""
    out = tmp_path / "run"
    common = ["--data", "moons", "--batch-size", "64", "--lr", "1e-3", "--warmup", "1", "--log-every", "5",
              "--no-progress"]
    proc = subprocess.Popen(fastddpm_cmd(["train", "--out", str(out), "--steps", "1000000", "--ckpt-every",
                                          "1000000", "--ckpt-minutes", "60", *common], nproc=2),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    log = out / "log.jsonl"
    deadline = time.time() + 240
    while not (log.exists() and log.read_text()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = _workers(proc.pid)
    assert sorted(workers) == [0, 1] and proc.poll() is None, (workers, proc.poll())
    os.kill(workers[1] if target == "rank 1" else proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0  # the workers ended by SIGTERM, as the signal's usual course
    ckfile = str(out / "checkpoint.safetensors")
    step = int(ck.read(ckfile)[1]["step"])
    assert step >= 5
    assert (f"fastddpm train: SIGTERM received: checkpoint of step {step} written to {ckfile}; continue with "
            "resume=True (--resume)") in err, err[-3000:]
    assert f"fastddpm train: rank 1: SIGTERM received: stopped after step {step} (rank 0 writes" in err, err[-3000:]
    assert err.count("SIGTERM received") == 2, err[-3000:]
    assert all(json.loads(ln)["step"] <= step for ln in log.read_text().splitlines())
    # the checkpoint resumes exactly: two more steps on 2 ranks = the uninterrupted run on one process
    run(["train", "--out", str(out), "--steps", str(step + 2), "--ckpt-every", "1000000", "--resume", *common],
        nproc=2)
    train(TrainConfig(data="moons", out=str(tmp_path / "one"), model="mlp", steps=step + 2, batch_size=64, lr=1e-3,
                      warmup=1, ckpt_every=1_000_000, log_every=5, progress=False))
    a, _ = ck.read(str(tmp_path / "one/checkpoint.safetensors"))
    b, meta = ck.read(ckfile)
    assert meta["step"] == str(step + 2)
    for k in a:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)


# ------------------------------------------------------------------ class labels and guidance (issue 22)
def test_sharded_guided_sampling_cuts_labels_and_conditions_with_the_shards(tmp_path):
    """Two ranks (run one after the other in this process: without a process group the barriers
    pass) sample their shards of a guided call with per-sample labels and a per-sample uncond
    tensor: samples.npz equals one sample() call over all n, and records the labels."""
    from fastddpm.distributed import sample_to_folder
    from fastddpm.images import to_uint8_nhwc

    model, n = tiny_cond_unet(), 5
    labels = torch.tensor([2, 0, 1, 1, 0])
    kw = dict(steps=3, method="ddim", seed=4, backend="reference", class_labels=labels, guidance_scale=3.0,
              uncond={"y": torch.full((n,), 3)}, guidance_rescale=0.3)
    os.makedirs(tmp_path / "shards")  # as rank 0 makes it before the barrier
    for rank in (1, 0):  # rank 0 last: it assembles
        out = sample_to_folder(model, n, str(tmp_path), shard_size=2, rank=rank, world=2, manifest={"test": 1}, **kw)
    with np.load(out) as f:
        got, lab = f["arr_0"], f["labels"]
    assert lab.dtype == np.int64 and lab.tolist() == labels.tolist()
    want = to_uint8_nhwc(fastddpm.sample(model, n, **kw))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    with np.load(tmp_path / "shards/shard-000001.npz") as f:  # rank 1's shard: samples 2, 3
        assert f["labels"].tolist() == [1, 1]
    manifest = json.load(open(tmp_path / "shards/manifest.json"))
    assert manifest["guidance_scale"] == 3.0 and manifest["guidance_rescale"] == 0.3
    assert {"labels_sha256", "uncond_sha256"} <= set(manifest)
    with pytest.raises(ValueError, match="other arguments.*labels_sha256"):  # other labels: refused
        sample_to_folder(model, n, str(tmp_path), shard_size=2, **{**kw, "class_labels": labels.flip(0)})


@pytest.fixture(scope="module")
def tiny_cond_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ck") / "tiny-cond.safetensors")
    torch.manual_seed(0)
    unet = fastddpm.UNet.from_preset("tiny", ch=16, norm_groups=8, image_size=8, num_classes=3)
    ck.save_model(unet, path, arch="unet", schedule=ck.schedule_meta("linear", 1000), prediction="eps")
    return path


def test_torchrun_class_sampling_equals_one_process(tiny_cond_checkpoint, tmp_path):
    """`torchrun --nproc_per_node=2 -m fastddpm sample --class all [--guidance 3]`: each rank samples
    its shards with their rows of the labels; the set equals one process's, labels in order.
    (--guidance where the loaded UNet has its null class, label embedding row K.)"""
    model = fastddpm.load(tiny_cond_checkpoint)
    guided = model.label_emb.num_embeddings > 3
    args = sample_args(tiny_cond_checkpoint, tmp_path / "two", **{"--class": "all"},
                       **({"--guidance": "3"} if guided else {}))
    run(args, nproc=2)
    with np.load(tmp_path / "two/samples.npz") as f:
        got, lab = f["arr_0"], f["labels"]
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])  # 10 images, 3 classes in order: i * 3 // 10
    assert lab.tolist() == labels.tolist()
    from fastddpm.images import to_uint8_nhwc

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1)
    try:
        want = to_uint8_nhwc(fastddpm.sample(model, 10, steps=6, method="ddim", seed=3, batch_size=3,
                                             class_labels=labels, guidance_scale=3.0 if guided else 1.0))
    finally:
        torch.set_num_threads(threads)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1

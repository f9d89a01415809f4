"""Beyond one process: sharded sampling to a folder, and the process-group plumbing for
data-parallel training. Uses torch.distributed as torchrun sets it up (gloo on CPUs,
NCCL on GPUs); with no torchrun environment everything runs as one process.

Sharded sampling (`sample_to_folder`): the N sample indices are cut into shards of
`shard_size`; shard k holds samples [k S, (k+1) S) and is sampled by rank k % world with
`fastddpm.sample(..., sample_offset=k S)`. Seed-mode noise is keyed by the global sample
index, so every shard, and the assembled set, is identical to a one-process run with the
same seed. Each shard is written atomically (temporary file + rename) as
OUT/shards/shard-<k>.npz (uint8 NHWC under arr_0, the indices under "indices"); a run
started again with the same arguments skips the shards that exist, and a manifest (written
with the first shard: a run that wrote none claims nothing) refuses a restart with different
arguments. Progress: one bar, per sampling step, on rank 0. Rank 0 then writes OUT/samples.npz (exactly N samples
in index order), OUT/grid.png and OUT/shards/index.json (which samples each shard holds).

Conditioning: `class_labels` (an int, or one label per sample: a sequence or LongTensor of N)
and per-sample tensors of `cond` / `uncond` (first dimension N) are cut with the shards: shard k
is sampled with rows [k S, (k+1) S), so each image equals the one-process run's image of the same
index. The labels go into every shard (key "labels") and into OUT/samples.npz (key "labels",
int64, one per image, in index order), and the grid has one row per class; the manifest records
the labels' SHA-256 and the guidance options given, so a restart with other labels or guidance
is refused.

One run at a time per folder: rank 0 holds an exclusive lock on OUT/shards/lock (flock, with its
pid, host and start time written inside) from before the manifest check to the end of the run;
the other ranks wait for it on the barrier. A second run into the same folder fails at once,
before sampling, naming the run that holds it. The operating system releases the lock when its
process ends, however it ends, so a killed run's folder is resumed by the same command.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from .images import class_grid, grid, save_png, to_uint8_nhwc

__all__ = ["world_info", "init_process_group", "barrier", "sample_to_folder", "check_out_folder"]


def world_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group() -> tuple[int, int, torch.device]:
    """Join torchrun's process group (NCCL with CUDA, else gloo); returns (rank, world, device)."""
    rank, world, local = world_info()
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return rank, world, device


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_npz(path, **arrays):
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _valid_shard(path, start, stop, labels=None):
    try:
        with np.load(path) as f:
            ok = f["indices"].tolist() == list(range(start, stop)) and f["arr_0"].shape[0] == stop - start
            if labels is not None:
                ok = ok and "labels" in f and f["labels"].tolist() == labels[start:stop].tolist()
            return ok
    except Exception:  # unreadable: sample it again
        return False


GUIDANCE_OPTIONS = ("guidance_scale", "guidance_interval", "guidance_rescale", "guidance_parallel", "null_class")


def _call_labels(class_labels, n):
    """The labels of a sharded call: None, or a LongTensor (n,) on the CPU (an int is every sample's)."""
    if class_labels is None:
        return None
    from .guidance import _labels

    return _labels(class_labels, n, "class_labels", None).cpu()


def _shard_kwargs(sample_kwargs, labels, n, start, stop):
    """sample()'s keyword arguments for samples [start, stop): the labels' rows and the rows of every
    per-sample tensor (first dimension n) of cond / uncond."""
    kw = dict(sample_kwargs)
    if labels is not None:
        kw["class_labels"] = labels[start:stop]
    for name in ("cond", "uncond"):
        d = kw.get(name)
        if isinstance(d, dict):
            kw[name] = {k: v[start:stop] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n else v
                        for k, v in d.items()}
    return kw


def _conditioning_manifest(sample_kwargs, labels):
    """What the manifest records of the conditioning: the guidance options given, the labels' digest."""
    out = {}
    for k in GUIDANCE_OPTIONS:
        v = sample_kwargs.get(k)
        if v is not None:
            out[k] = list(v) if isinstance(v, tuple) else v
    if labels is not None:
        out["labels_sha256"] = hashlib.sha256(labels.numpy().astype("<i8").tobytes()).hexdigest()
    for name in ("cond", "uncond"):
        d = sample_kwargs.get(name)
        if d:
            out[f"{name}_sha256"] = hashlib.sha256(repr(sorted(
                (k, v.cpu().numpy().tobytes() if isinstance(v, torch.Tensor) else repr(v)) for k, v in d.items()
            )).encode()).hexdigest()
    return out


def _has_shards(shards_dir):
    return any(f.startswith("shard-") and f.endswith(".npz") for f in os.listdir(shards_dir))


def _check_manifest(shards_dir, manifest):
    """Refuse to mix shards of runs with different arguments. Only a folder holding shards is
    claimed: a run that failed before writing one leaves nothing that blocks the next."""
    path = os.path.join(shards_dir, "manifest.json")
    if not (os.path.exists(path) and _has_shards(shards_dir)):
        return
    with open(path) as f:
        old = json.load(f)
    if old != json.loads(json.dumps(manifest)):
        diff = {k: (old.get(k), manifest.get(k)) for k in set(old) | set(manifest) if old.get(k) != manifest.get(k)}
        raise ValueError(f"{shards_dir} holds shards of a run with other arguments (was, now): {diff}; rerun with "
                         "the arguments it was started with to complete it, or choose another --out folder")


def _claim(shards_dir, manifest):
    """Write the manifest (atomically; any rank may) just before the folder's first shard."""
    path = os.path.join(shards_dir, "manifest.json")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=shards_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def check_out_folder(path, name="out_dir"):
    """path must be a folder, or not exist yet (it is created): never a file."""
    path = os.fspath(path)
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe.rstrip(os.sep))
    if probe and not os.path.isdir(probe):
        what = "is a file" if probe == path else f"is inside {probe!r}, which is a file"
        raise ValueError(f"{name}={path!r} {what}: it must be a folder (it receives samples.npz, grid.png and "
                         "shards/); pass a folder path")


@contextlib.contextmanager
def _folder_lock(out_dir, shards_dir):
    """Hold OUT/shards/lock exclusively (flock) for the run; the OS releases it when the process
    ends. A second run gets a ValueError naming the holder (pid, host, start time)."""
    import warnings

    def unguarded(why):
        warnings.warn(f"{out_dir}: {why}, so another run writing into the same folder at the same time is not "
                      "detected; run one at a time", RuntimeWarning, stacklevel=4)

    try:
        import fcntl
    except ImportError:  # not a POSIX system
        unguarded("this system has no fcntl.flock")
        yield
        return
    path = os.path.join(shards_dir, "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(path) as f:
                holder = f.read().strip() or "a run that has not written its details yet"
            raise ValueError(f"{out_dir} is in use by another fastddpm sample run ({holder}): two runs into one folder "
                             "would mix their samples. Wait for it to finish (to complete the same set, rerun with "
                             "the same arguments afterwards: finished shards are kept), or choose another --out "
                             "folder") from None
        except OSError as e:  # a file system without locks (some network mounts)
            unguarded(f"its file system cannot lock {path} ({e})")
        else:
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, ", ".join(f"{k} {v}" for k, v in holder.items()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock (as does the process ending)


def _steps_bar(model, kw, shard_lengths, rank, world):
    """A tqdm bar over the sampling steps of this rank's shards (per step, not per shard)."""
    import math

    from tqdm.auto import tqdm

    from .sampler import model_evaluations

    S = model_evaluations(model, **kw)  # model calls per batch
    bs = kw.get("batch_size")

    def steps_of(length):
        return math.ceil(length / (bs or min(length, 256))) * S

    desc = "sampling" if world == 1 else f"sampling (rank {rank} of {world} processes)"
    bar = tqdm(total=sum(steps_of(m) for m in shard_lengths), desc=desc, unit="step")
    bar.steps_of = steps_of
    return bar


def sample_to_folder(model, n: int, out_dir: str, *, shard_size: int, rank: int = 0, world: int = 1,
                     manifest: dict | None = None, progress: bool = False, **sample_kwargs) -> str | None:
    """Sample n images into out_dir in shards (see module docstring). Seed mode only.
    Returns the path of samples.npz on rank 0 (None on other ranks)."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"shard_size must be a positive int; got {shard_size!r}")
    if sample_kwargs.get("generator") is not None:
        raise ValueError("sharded sampling needs seed= noise (generator= draws depend on the batch order)")
    labels = _call_labels(sample_kwargs.get("class_labels"), n)  # checked before the folder is touched
    manifest = {**(manifest or {}), "n": n, "shard_size": shard_size, **_conditioning_manifest(sample_kwargs, labels)}
    check_out_folder(out_dir)
    shards_dir = os.path.join(out_dir, "shards")
    if rank == 0:
        os.makedirs(shards_dir, exist_ok=True)
    with _folder_lock(out_dir, shards_dir) if rank == 0 else contextlib.nullcontext():
        barrier()  # rank 0 holds the folder: the other ranks wait here
        return _sample_shards(model, n, out_dir, shards_dir, shard_size, rank, world, manifest, progress,
                              sample_kwargs, labels)


def _sample_shards(model, n, out_dir, shards_dir, shard_size, rank, world, manifest, progress, sample_kwargs,
                   labels):
    from .sampler import sample

    _check_manifest(shards_dir, manifest)
    barrier()  # every rank has checked before any rank claims the folder
    ranges = [(k, s, min(s + shard_size, n)) for k, s in enumerate(range(0, n, shard_size))]
    mine = [r for r in ranges if r[0] % world == rank]
    bar = None
    if progress and rank == 0:  # one bar for the whole run: rank 0's steps (every rank moves at about its pace)
        bar = _steps_bar(model, sample_kwargs, [stop - start for _, start, stop in mine], rank, world)
    claimed = False
    try:
        for k, start, stop in mine:
            path = os.path.join(shards_dir, f"shard-{k:06d}.npz")
            if os.path.exists(path) and _valid_shard(path, start, stop, labels):
                if bar is not None:
                    bar.update(bar.steps_of(stop - start))
                continue
            x = sample(model, stop - start, sample_offset=start, progress=bar if bar is not None else False,
                       **_shard_kwargs(sample_kwargs, labels, n, start, stop))
            if not claimed:
                _claim(shards_dir, manifest)
                claimed = True
            extra = {} if labels is None else {"labels": labels[start:stop].numpy().astype(np.int64)}
            _atomic_npz(path, arr_0=to_uint8_nhwc(x), indices=np.arange(start, stop), **extra)
    finally:
        if bar is not None:
            bar.close()
    barrier()
    if rank != 0:
        return None
    parts, shard_labels, index = [], [], []
    for k, start, stop in ranges:
        path = os.path.join(shards_dir, f"shard-{k:06d}.npz")
        with np.load(path) as f:
            if f["indices"].tolist() != list(range(start, stop)):
                raise ValueError(f"shard {path} does not hold samples {start}..{stop - 1}")
            parts.append(f["arr_0"])
            if labels is not None:
                if "labels" not in f or f["labels"].tolist() != labels[start:stop].tolist():
                    raise ValueError(f"shard {path} does not hold the labels requested for samples {start}.."
                                     f"{stop - 1}")
                shard_labels.append(f["labels"].astype(np.int64))
        index.append({"shard": os.path.basename(path), "start": start, "stop": stop})
    arr = np.concatenate(parts)
    out = os.path.join(out_dir, "samples.npz")
    scale = max(1, 64 // arr.shape[1])
    if labels is None:
        _atomic_npz(out, arr_0=arr)
        picture = grid(arr[:256], scale=scale)
    else:
        lab = np.concatenate(shard_labels)
        _atomic_npz(out, arr_0=arr, labels=lab)
        picture = class_grid(arr, lab, scale=scale) if len(set(lab.tolist())) > 1 else grid(arr[:256], scale=scale)
    with open(os.path.join(shards_dir, "index.json"), "w") as f:
        json.dump({"n": n, "shards": index}, f, indent=1)
    save_png(picture, os.path.join(out_dir, "grid.png"))
    return out

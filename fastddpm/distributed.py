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
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import torch
import torch.distributed as dist

from .images import grid, save_png, to_uint8_nhwc

__all__ = ["world_info", "init_process_group", "barrier", "sample_to_folder"]


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


def _valid_shard(path, start, stop):
    try:
        with np.load(path) as f:
            return f["indices"].tolist() == list(range(start, stop)) and f["arr_0"].shape[0] == stop - start
    except Exception:  # unreadable: sample it again
        return False


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
    from .sampler import sample

    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"shard_size must be a positive int; got {shard_size!r}")
    if sample_kwargs.get("generator") is not None:
        raise ValueError("sharded sampling needs seed= noise (generator= draws depend on the batch order)")
    shards_dir = os.path.join(out_dir, "shards")
    os.makedirs(shards_dir, exist_ok=True)
    manifest = {**(manifest or {}), "n": n, "shard_size": shard_size}
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
            if os.path.exists(path) and _valid_shard(path, start, stop):
                if bar is not None:
                    bar.update(bar.steps_of(stop - start))
                continue
            x = sample(model, stop - start, sample_offset=start, progress=bar if bar is not None else False,
                       **sample_kwargs)
            if not claimed:
                _claim(shards_dir, manifest)
                claimed = True
            _atomic_npz(path, arr_0=to_uint8_nhwc(x), indices=np.arange(start, stop))
    finally:
        if bar is not None:
            bar.close()
    barrier()
    if rank != 0:
        return None
    parts, index = [], []
    for k, start, stop in ranges:
        path = os.path.join(shards_dir, f"shard-{k:06d}.npz")
        with np.load(path) as f:
            if f["indices"].tolist() != list(range(start, stop)):
                raise ValueError(f"shard {path} does not hold samples {start}..{stop - 1}")
            parts.append(f["arr_0"])
        index.append({"shard": os.path.basename(path), "start": start, "stop": stop})
    arr = np.concatenate(parts)
    out = os.path.join(out_dir, "samples.npz")
    _atomic_npz(out, arr_0=arr)
    with open(os.path.join(shards_dir, "index.json"), "w") as f:
        json.dump({"n": n, "shards": index}, f, indent=1)
    save_png(grid(arr[:256], scale=max(1, 64 // arr.shape[1])), os.path.join(out_dir, "grid.png"))
    return out

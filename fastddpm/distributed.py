"""Beyond one process: sharded sampling to a folder, and the process-group plumbing for
data-parallel training. Uses torch.distributed as torchrun sets it up (gloo on CPUs,
NCCL on GPUs); with no torchrun environment everything runs as one process.

Sharded sampling (`sample_to_folder`): the N sample indices are cut into shards of
`shard_size`; shard k holds samples [k S, (k+1) S) and is sampled by rank k % world with
`fastddpm.sample(..., sample_offset=k S)`. Seed-mode noise is keyed by the global sample
index, so every shard, and the assembled set, is identical to a one-process run with the
same seed. Each shard is written atomically (temporary file + rename) as
OUT/shards/shard-<k>.npz (uint8 NHWC under arr_0, the indices under "indices"); a run
started again with the same arguments skips the shards that exist, and a manifest refuses
a restart with different arguments. Rank 0 then writes OUT/samples.npz (exactly N samples
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


def _check_manifest(shards_dir, manifest, rank):
    path = os.path.join(shards_dir, "manifest.json")
    if rank == 0 and not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)
    barrier()
    with open(path) as f:
        old = json.load(f)
    if old != json.loads(json.dumps(manifest)):
        diff = {k: (old.get(k), manifest.get(k)) for k in set(old) | set(manifest) if old.get(k) != manifest.get(k)}
        raise ValueError(f"{shards_dir} holds shards of a run with other arguments (was, now): {diff}; "
                         "use another --out folder or delete that one")


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
    _check_manifest(shards_dir, {**(manifest or {}), "n": n, "shard_size": shard_size}, rank)
    ranges = [(k, s, min(s + shard_size, n)) for k, s in enumerate(range(0, n, shard_size))]
    mine = [r for r in ranges if r[0] % world == rank]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ranges), desc=f"shards ({world} processes)", unit="shard")
    for k, start, stop in mine:
        path = os.path.join(shards_dir, f"shard-{k:06d}.npz")
        if not (os.path.exists(path) and _valid_shard(path, start, stop)):
            x = sample(model, stop - start, sample_offset=start, **sample_kwargs)
            _atomic_npz(path, arr_0=to_uint8_nhwc(x), indices=np.arange(start, stop))
        if bar is not None:
            bar.update(world)
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

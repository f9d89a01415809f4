"""Checkpoints and model files: safetensors only (nothing is ever unpickled).

A run folder holds
  checkpoint.safetensors  everything needed to resume: model, EMA, AdamW state, global RNG
                          state, and (metadata) the step count and the configs
  model.safetensors       the EMA weights and the configs: what `fastddpm.load` returns
  log.jsonl               one JSON line per log interval (loss, lr, images/s); a resumed run that
                          changed a tunable option adds {"step", "changed": {option: [was, now]}}
Each file is written to a temporary name in the same folder, fsync'ed and renamed over
the old one, so a kill at any moment leaves either the old file or the new one.
"""
from __future__ import annotations

import json
import os
import tempfile

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .schedule import Schedule

FORMAT = "fastddpm-v1"
CHECKPOINT = "checkpoint.safetensors"
MODEL = "model.safetensors"


def atomic_save(tensors: dict, path: str, metadata: dict):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={"format": FORMAT, **metadata})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _sniff(path: str) -> str | None:
    """What the file is when it is not a whole safetensors file: an explanation, or None."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    safetensors_like = head[8:9] == b"{"  # 8-byte little-endian header length, then a JSON header
    if head.startswith(b"PK\x03\x04"):
        kind = "a zip archive: a PyTorch pickle checkpoint (torch.save, usually .pt / .pth / .ckpt)"
    elif not safetensors_like and len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        kind = "a pickle file (a legacy torch.save checkpoint, usually .pt / .pth / .pkl)"
    else:
        kind = None
    if kind is not None:
        return (f"{path!r} is {kind}, not a safetensors file. fastddpm never unpickles files (unpickling can run "
                "arbitrary code). To convert a checkpoint you trust: in a trusted environment, "
                "state = torch.load(path, map_location='cpu', weights_only=True); load it into the model "
                "(model.load_state_dict(state)) and write it with fastddpm.checkpoint.save_model(model, "
                "'model.safetensors', arch=..., schedule=..., prediction=...), or save the tensors with "
                "safetensors.torch.save_file(state, 'weights.safetensors')")
    if size < 8:
        return f"{path!r} is not a safetensors file: it holds only {size} bytes (a safetensors file starts with an " \
               "8-byte header length)"
    n = int.from_bytes(head[:8], "little")
    if len(head) > 8 and not safetensors_like:
        text = head.isascii() and all(32 <= c < 127 or c in b"\t\r\n" for c in head)
        what = "a text file" if text else "a file of another format"
        return f"{path!r} is not a safetensors file: it looks like {what} (it starts with {head[:16]!r})"
    if 8 + n > size:
        return (f"{path!r} is a truncated or corrupt safetensors file: its header says {8 + n} bytes of header, "
                f"the file holds {size} bytes; it was cut short (an interrupted copy or download?): copy or "
                "write it again")
    return None


def read(path: str, device="cpu"):
    """(tensors, metadata) of a fastddpm safetensors file. A clear error if it is not one: a pickle
    checkpoint (with how to convert it), another format, a truncated file, or a device that is
    not available here (checked before the file is touched)."""
    from ._checks import check_device

    device = check_device(device)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    return _open(path, lambda f: {k: f.get_tensor(k).to(device) for k in f.keys()},
                 hint="; for diffusers weights use fastddpm.compat.load_diffusers_unet")


def read_metadata(path: str) -> dict:
    """The metadata of a fastddpm safetensors file, without reading its tensors (the same checks as `read`)."""
    return _open(path, lambda f: None)[1]


def _open(path: str, take, hint: str = ""):
    """(take(the open file), metadata) of a fastddpm safetensors file, or a ValueError saying what it is."""
    why = _sniff(path)
    if why is not None:
        raise ValueError(why)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            got = take(f)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path!r} is a truncated or corrupt safetensors file ({e}); copy or write it "
                         "again") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is a safetensors file but not a fastddpm checkpoint (format="
                         f"{meta.get('format')!r}){hint}")
    return got, meta


def schedule_meta(kind: str, num_timesteps: int) -> str:
    return json.dumps({"kind": kind, "num_timesteps": num_timesteps})


def schedule_from_meta(text: str) -> Schedule:
    d = json.loads(text)
    if d["kind"] == "linear":
        return Schedule.linear(d["num_timesteps"])
    if d["kind"] == "cosine":
        return Schedule.cosine(d["num_timesteps"])
    raise ValueError(f"unknown schedule kind {d['kind']!r} in checkpoint")


def build_model(arch: str, config: dict):
    if arch == "unet":
        from .unet import UNet

        return UNet(**config)
    if arch == "mlp":
        from .mlp import MLPDenoiser

        return MLPDenoiser(**config)
    raise ValueError(f"unknown model architecture {arch!r} in checkpoint")


def save_model(model, path: str, *, arch: str, schedule: str, prediction: str):
    meta = {"arch": arch, "model_config": json.dumps(model.config_dict()), "schedule": schedule,
            "prediction": prediction}
    atomic_save(dict(model.state_dict()), path, meta)


SHIPPED = {"digits": "digits-16.safetensors", "digits-cond": "digits-cond-16.safetensors"}  # name -> asset file


def load(path: str | None = None, device="cpu", weights: str = "ema"):
    """The EMA model of a training run (folder) or a model/checkpoint file, in eval mode;
    with no path, the shipped digits model (a 16x16 grey-scale U-Net); a shipped model by name
    ("digits", "digits-cond": the class-conditional one, UNet(num_classes=10), y = the digit,
    10 = unconditional) where no file or folder of that name exists:

        model = fastddpm.load()                       # the shipped digits model (= load("digits"))
        cond = fastddpm.load("digits-cond")           # class-conditional, for classifier-free guidance
        x = fastddpm.sample(model, 16, steps=50, method="ddim")
        raw = fastddpm.load("runs/d", weights="raw")  # a run's raw (not averaged) weights

    weights: "ema" (default) or "raw", the optimizer's own weights, which only a training
    checkpoint (RUN/checkpoint.safetensors) holds. The model carries `fastddpm_schedule` (its
    training schedule) and `fastddpm_prediction`, which `fastddpm.sample` uses."""
    from ._checks import check_device, one_of

    device = check_device(device)
    one_of(weights, ("ema", "raw"), "weights")
    if path is None:
        path = shipped_model_path()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a run folder or a .safetensors file path (or None for the shipped model); "
                        f"got {type(path).__name__}")
    path = os.fspath(path)
    if path in SHIPPED and not os.path.exists(path):
        path = shipped_model_path(path)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"no run folder or checkpoint file at {path!r} (the shipped models load by name: "
                                f"{', '.join(repr(k) for k in SHIPPED)})")
    if os.path.isdir(path):
        names = (CHECKPOINT,) if weights == "raw" else (MODEL, CHECKPOINT)
        for name in names:
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path!r} has " + (f"no {CHECKPOINT} (weights='raw' reads a training run's "
                                    "checkpoint, which holds the raw and the EMA weights)" if weights == "raw"
                                    else f"neither {MODEL} nor {CHECKPOINT}"))
    tensors, meta = read(path, device)
    if any(k.startswith("ema.") for k in tensors):  # a training checkpoint: the EMA or the raw weights
        prefix = "ema." if weights == "ema" else "model."
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    elif weights == "raw":
        raise ValueError(f"weights='raw' needs a training checkpoint ({CHECKPOINT} of a run folder, which holds the "
                         f"raw and the EMA weights); {path!r} is a model file with one set of weights: "
                         "load it with weights='ema' (the default)")
    model = build_model(meta["arch"], json.loads(meta["model_config"]))
    model.load_state_dict(tensors)
    model.to(device).eval().requires_grad_(False)
    model.fastddpm_schedule = schedule_from_meta(meta["schedule"])
    model.fastddpm_prediction = meta.get("prediction", "eps")
    return model


def shipped_model_path(name: str = "digits") -> str:
    """The file of a shipped model: "digits" (unconditional) or "digits-cond" (class-conditional)."""
    from importlib import resources

    from ._checks import one_of

    one_of(name, tuple(SHIPPED), "name")
    return str(resources.files("fastddpm").joinpath("assets", SHIPPED[name]))

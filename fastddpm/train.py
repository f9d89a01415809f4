"""Training: the DDPM objective (Ho et al. 2020 Algorithm 1).

Each step: x0 from the data, t ~ U{0..T-1}, eps ~ N(0, I), x_t = q_sample(x0, t, eps),
loss = || model(x_t, t) - target ||^2 with target eps, x0 or v (Salimans & Ho 2022).
AdamW with linear warm-up, gradient clipping, an EMA of the weights, bf16 autocast on
CUDA, optional torch.compile; q_sample runs as the fused kernel on CUDA (it writes x_t
and the eps target in one pass).

Class-conditional training (classes=True, `--classes`; labelled data only: digits) trains a
`UNet(num_classes=K)` on the data and its labels with label dropout (Ho & Salimans 2022): each
example's label is replaced by the null class K with probability label_dropout (default 0.1),
so the one model learns the conditional and the unconditional outputs that classifier-free
guidance combines (`fastddpm.sample(..., class_labels=..., guidance_scale=w)`).

All randomness of step k (batch indices, t, label dropout, eps) is a function of (seed, k), and the
global RNG state is checkpointed, so a resumed run makes exactly the updates the
uninterrupted run would have made. Checkpoints are written every `ckpt_every` steps, at
least every `ckpt_minutes` minutes, at the end, and on SIGTERM / SIGINT (the step in
flight finishes, the checkpoint is written, then the signal takes its usual course), so a
kill loses at most a few minutes. resume=True with no checkpoint in the folder warns and
starts from step 0 (a job script can always pass --resume).

The EMA copies the weights while the learning rate warms up (as ema-pytorch's
update_after_step does), then averages with a warm-up counted from there: decay
min(decay, (1 + j) / (20 + j)) at update j after the lr warm-up (an average that lags the
weights by about j / 20 steps) until `decay` takes over. A short run's EMA is then neither
stuck near the random initialisation nor behind the raw weights: on 200-step digits runs at
the defaults it scores better than the raw weights (README), where the usual
(1 + k) / (10 + k) counted from step 0 averaged over the fast early moves and lagged behind
them (FD 145 against 134).

Resuming (resume=True, `--resume`) continues the run as it was configured; the checkpoint's
configuration is compared with the one given, before any work:
- options that define the run are errors naming both values when they differ: data, model
  (preset, and model_overrides), schedule, num_timesteps, prediction, batch_size, seed, classes,
  label_dropout (of a class-conditional run) (and the
  model built from them must have the checkpoint's model_config): changing one would switch the
  objective, the data or the random stream mid-run, or not fit the saved weights;
- tunable options may change, and each change is said on stderr and in log.jsonl: lr,
  weight_decay, warmup, grad_clip, ema_decay;
- the rest say how and how long to run, and change silently: steps, ckpt_every, ckpt_minutes,
  log_every, device, bf16, compile, progress.
`fastddpm train --resume` takes every option it is not given from the checkpoint (the defaults
of the command line do not count as given). steps at or below the run's step trains nothing and
changes no file: below, it is an error saying the run is already past it; equal, a note.

Under torchrun (K processes) the model is wrapped in DistributedDataParallel: every rank
draws the same global batch of indices, t and label drops and keeps its contiguous slice, and its noise
is keyed by the global sample index, so K processes make exactly the update one process
makes on the same global batch (batch_size must divide by K), and a run resumes on any K.
Only rank 0 writes checkpoints and logs. A SIGTERM / SIGINT reaching any rank stops every rank
after the same step, with rank 0's checkpoint of that step (the noted signal is all-reduced
every step).
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import _checks as C
from . import checkpoint as ckpt
from . import diffusion, ops
from .data import load_dataset, load_labels
from .distributed import barrier, init_process_group
from .schedule import Schedule

__all__ = ["TrainConfig", "train", "diffusion_loss", "step_draws"]


@dataclass
class TrainConfig:
    data: str = "digits"            # "digits", "moons", "gaussians" or a folder of images
    out: str = "runs/digits"
    model: str = "digits-16"        # a UNet preset, or "mlp" (for 2-D data)
    model_overrides: dict = field(default_factory=dict)
    schedule: str = "linear"        # "linear" or "cosine"
    num_timesteps: int = 1000
    prediction: str = "eps"         # training target: "eps", "x0" or "v"
    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    ckpt_every: int = 500           # a checkpoint every this many steps ...
    ckpt_minutes: float | None = 5.0  # ... and at least every this many minutes (None: steps only)
    log_every: int = 50
    device: str | None = None
    bf16: bool | None = None        # None: on for CUDA
    compile: bool = False
    progress: bool = True
    classes: bool = False           # class-conditional: train on the data's labels (labelled data: digits)
    label_dropout: float = 0.1      # classes=True: probability of replacing a label by the null class

    def validate(self):
        C.one_of(self.schedule, ("linear", "cosine"), "schedule")
        C.one_of(self.prediction, C.PREDICTIONS, "prediction")
        for name in ("num_timesteps", "steps", "batch_size", "ckpt_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (learning-rate warm-up steps; 0 = none); got {self.warmup!r}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay}")
        m = self.ckpt_minutes
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0):
            raise ValueError(f"ckpt_minutes must be a positive number of minutes or None; got {m!r}")
        if not isinstance(self.classes, bool):
            raise ValueError(f"classes must be True or False; got {self.classes!r}")
        p = self.label_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"label_dropout (--label-dropout) must be a probability in [0, 1) (the share of labels "
                             f"replaced by the null class); got {p!r}")
        k = self.model_overrides.get("num_classes")
        if self.classes:
            from .data import LABELLED_DATASETS

            if self.data not in LABELLED_DATASETS:
                raise ValueError(f"classes=True (--classes) trains a class-conditional model on labelled data, but "
                                 f"data={self.data!r} has no labels; labelled data: {sorted(LABELLED_DATASETS)}")
            if self.model == "mlp":
                raise ValueError("classes=True (--classes) needs a UNet preset (model=...); got model='mlp', "
                                 "which takes no labels")
            if k is not None and k != LABELLED_DATASETS[self.data]:
                raise ValueError(f"model_overrides num_classes={k!r} but data={self.data!r} has "
                                 f"{LABELLED_DATASETS[self.data]} classes; leave num_classes out (classes=True sets "
                                 "it)")
        elif k is not None:
            raise ValueError(f"model_overrides num_classes={k!r} makes a class-conditional model: pass classes=True "
                             "(--classes), which sets num_classes from the data")


def _mix(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): a 63-bit seed for step `step`'s randomness."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) >> 1


EMA_WARMUP = 20  # decay (1 + j) / (EMA_WARMUP + j) at update j after the lr warm-up, until `decay`


def ema_decay_at(step: int, decay: float, start: int = 0) -> float:
    """EMA decay of update `step` (0-based): 0 before `start` (the EMA copies the weights during
    the learning-rate warm-up), then min(decay, (1 + j) / (20 + j)) with j = step - start: update
    i's weight in the average goes as (i + 2)(i + 3)...(i + 19), about i^18, so the average lags
    the weights by about j / 20 steps; a short run's EMA neither sits near the random
    initialisation (with a flat 0.999, 200 steps keep 82% of the init's weight) nor far behind."""
    if step < start:
        return 0.0
    j = step - start
    return min(decay, (1 + j) / (EMA_WARMUP + j))


def step_draws(seed: int, step: int, n_data: int, num_steps: int, batch_size: int,
               label_dropout: float | None = None):
    """The random draws of training step `step` for the whole global batch, a function of (seed, step)
    only: data indices (batch_size,), timesteps (batch_size,), and with label_dropout a bool mask
    (batch_size,) of the examples whose label becomes the null class (else None). Every rank draws
    them all and keeps its slice; the label drops are drawn last, so an unconditional run's draws
    are those of a class-conditional run with the same seed."""
    g = torch.Generator().manual_seed(_mix(seed, step))
    idx = torch.randint(0, n_data, (batch_size,), generator=g)
    t = torch.randint(0, num_steps, (batch_size,), generator=g)
    drop = None if label_dropout is None else torch.rand(batch_size, generator=g, dtype=torch.float64) < label_dropout
    return idx, t, drop


def _make_model(cfg: TrainConfig, data: torch.Tensor):
    if cfg.model == "mlp":
        from .mlp import MLPDenoiser

        if data.ndim != 2:
            raise ValueError(f"model='mlp' needs vector data (N, D); got data of shape {tuple(data.shape)}")
        return "mlp", MLPDenoiser(dim=data.shape[1], **cfg.model_overrides)
    from .unet import PRESETS, UNet

    if data.ndim != 4 or data.shape[2] != data.shape[3]:
        raise ValueError(f"a UNet needs square images (N, C, H, H); got data of shape {tuple(data.shape)}; "
                         "use model='mlp' for vector data")
    if cfg.model not in PRESETS:
        raise ValueError(f"model must be 'mlp' or a UNet preset {sorted(PRESETS)}; got {cfg.model!r}")
    over = {"in_channels": data.shape[1], "image_size": data.shape[2], **cfg.model_overrides}
    if cfg.classes:
        from .data import LABELLED_DATASETS

        over["num_classes"] = LABELLED_DATASETS[cfg.data]
    return "unet", UNet.from_preset(cfg.model, **over)


def _schedule(cfg):
    return Schedule.linear(cfg.num_timesteps) if cfg.schedule == "linear" else Schedule.cosine(cfg.num_timesteps)


def _save_checkpoint(path, model, ema, opt, step, cfg, arch):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": str(step), "config": json.dumps(asdict(cfg)), "arch": arch,
            "model_config": json.dumps(model.config_dict()), "schedule": ckpt.schedule_meta(cfg.schedule,
                                                                                          cfg.num_timesteps),
            "prediction": cfg.prediction}
    ckpt.atomic_save(tensors, path, meta)


def _load_checkpoint(path, model, ema, opt, device):
    tensors, meta = ckpt.read(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = {k.split(".", 2)[2]: v.to(device) for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if st:
            if "step" in st:
                st["step"] = st["step"].cpu()
            opt.state[p] = st
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


def diffusion_loss(fwd, s: Schedule, x0: torch.Tensor, t: torch.Tensor, *, noise_seed: int, sample_offset: int = 0,
                   prediction: str = "eps", bf16: bool = False, fused: bool = False,
                   y: torch.Tensor | None = None) -> torch.Tensor:
    """Ho et al. Algorithm 1 for one batch: x_t = q_sample(x0, t, eps) with stream noise, then
    the MSE between fwd(x_t, t) (fwd(x_t, t, y=y) given class labels y) and the target (eps, x0
    or v). fused=True uses the Triton q_sample (one pass writes x_t and eps); bf16 runs the model
    under autocast."""
    q = ops.q_sample if fused else diffusion.q_sample
    x_t, eps = q(s, x0, t, seed=noise_seed, sample_offset=sample_offset)
    target = diffusion.training_target(s, x0, t, eps, prediction)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = fwd(x_t, t) if y is None else fwd(x_t, t, y=y)
    return F.mse_loss(pred.float(), target)


class _StopOnSignal:
    """While training (every rank, main thread): SIGTERM and SIGINT are noted, the current step
    finishes, a checkpoint is written, and then the signal takes its usual course.

    Under torchrun a signal may reach one rank only (a scheduler's kill) or the ranks at
    different steps (torchrun forwarding it): `agreed()` all-reduces the noted signal (max) at
    every step, so every rank stops after the same step, rank 0 writing that step's checkpoint
    and the others waiting for it. The all-reduce runs on the CPU (gloo; a gloo group beside
    NCCL), one int64 per step: no device synchronisation."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, world: int = 1):
        self.signum = None
        self.old = {}
        self.world = world
        self.group = None
        if world > 1:
            import torch.distributed as dist

            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                # a signal ignored from the start (SIGINT of a background job, `nohup`) stays ignored:
                # noting it would write a checkpoint, then re-raise into SIG_IGN and train on
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self.old[sig] = signal.signal(sig, self._note)

    def _note(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now, without waiting for the step
            self.restore()
            signal.raise_signal(signum)
        self.signum = signum

    def agreed(self):
        """The signal every rank stops on after this step (the largest any rank noted), or None."""
        if self.world == 1:
            return self.signum
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag) or None

    def restore(self):
        for sig, handler in self.old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.old = {}

    def reraise(self, signum=None):
        self.restore()
        signal.raise_signal(signum or self.signum)


RUN_OPTIONS = ("data", "model", "model_overrides", "schedule", "num_timesteps", "prediction", "batch_size", "seed",
               "classes", "label_dropout")
TUNABLE_OPTIONS = ("lr", "weight_decay", "warmup", "grad_clip", "ema_decay")
RESUMED_OPTIONS = RUN_OPTIONS + TUNABLE_OPTIONS + ("steps", "ckpt_every", "ckpt_minutes", "log_every")


def checkpoint_config(out: str):
    """(step, configuration dict) of the checkpoint in run folder `out`, or None without one."""
    path = os.path.join(out, ckpt.CHECKPOINT)
    if not os.path.exists(path):
        return None
    meta = ckpt.read_metadata(path)
    return int(meta["step"]), {**json.loads(meta.get("config", "{}")), "model_config": meta.get("model_config")}


def _flag(name, value):
    if isinstance(value, bool):
        return f"--{name}" if value else f"no --{name}"
    return f"--{name.replace('_', '-')} {value}" if name != "model_overrides" else "model_overrides (Python only)"


def _check_resume(cfg, rank) -> tuple[bool, dict]:
    """Compare cfg with the checkpoint's configuration (see the module docstring). Returns (done,
    changes): done when the run is already at cfg.steps (nothing to do), changes {option: [was,
    now]} of the tunable options. Raises ValueError for a contradiction or steps below the run's."""
    step, old = checkpoint_config(cfg.out)
    new = json.loads(json.dumps(asdict(cfg)))  # as stored: tuples become lists
    bad = [k for k in RUN_OPTIONS if k in old and old[k] != new[k]
           and not (k == "label_dropout" and not old.get("classes") and not new["classes"])]  # unused unconditionally
    if bad:
        given = ", ".join(f"{k}={new[k]!r} (the run's: {old[k]!r})" for k in bad)
        fix = ", ".join(f"{k}={old[k]!r} ({_flag(k, old[k])})" for k in bad)
        raise ValueError(f"resume=True (--resume) continues the run in {cfg.out!r} as it was configured, but {given} "
                         f"contradict{'s' if len(bad) == 1 else ''} its checkpoint (step {step}); pass {fix} or leave "
                         "them out on the command line, or train a new run into another out folder")
    if cfg.steps < step:
        raise ValueError(f"steps={cfg.steps} but the run in {cfg.out!r} is already at step {step} (its checkpoint), "
                         f"past {cfg.steps}: nothing was trained and no file was changed; pass steps above {step} "
                         f"(--steps) to train further, or sample the run as it is (fastddpm sample --checkpoint "
                         f"{cfg.out})")
    if cfg.steps == step and os.path.exists(os.path.join(cfg.out, ckpt.MODEL)):
        if rank == 0:
            print(f"fastddpm train: the run in {cfg.out!r} is already at step {step} (steps={cfg.steps}): nothing to "
                  "train, no file changed", file=sys.stderr, flush=True)
        return True, {}
    changes = {k: [old[k], new[k]] for k in TUNABLE_OPTIONS if k in old and old[k] != new[k]}
    if changes and rank == 0:
        said = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
        print(f"fastddpm train: resuming the run in {cfg.out!r} at step {step} with changed options: {said}",
              file=sys.stderr, flush=True)
    return False, changes


def _check_model_config(model, cfg):
    """The model built from a resumed run's options must be the checkpoint's (its saved weights' shapes)."""
    old = checkpoint_config(cfg.out)[1].get("model_config")
    if old is not None and json.loads(old) != model.config_dict():
        raise ValueError(f"the model built from these options ({model.config_dict()}) differs from the one in "
                         f"{cfg.out!r}'s checkpoint ({json.loads(old)}): resume it with the fastddpm version that "
                         "wrote it, or train a new run into another out folder")


def _truncate_log(path, step):
    """Drop log lines written after the checkpoint we resume from (the killed run's tail)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def train(cfg: TrainConfig | None = None, *, resume: bool = False, **overrides) -> str:
    """Train a model; returns the run folder. See TrainConfig for the options."""
    cfg = cfg or TrainConfig()
    cfg = TrainConfig(**{**asdict(cfg), **overrides})
    cfg.validate()
    rank, world, device = init_process_group()
    if cfg.device is not None:
        device = C.check_device(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
    local_b = cfg.batch_size // world
    lo = rank * local_b  # this rank's slice of the global batch
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    ck_path = os.path.join(cfg.out, ckpt.CHECKPOINT)
    if os.path.exists(ck_path) and not resume:
        raise FileExistsError(f"{cfg.out!r} already holds a checkpoint: pass resume=True (--resume) to continue it, "
                              "or choose another out folder")
    done, changes = _check_resume(cfg, rank) if resume and os.path.exists(ck_path) else (False, {})
    if done:
        return cfg.out
    barrier()
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)

    data = load_dataset(cfg.data, seed=cfg.seed).to(device)
    labels = load_labels(cfg.data).to(device) if cfg.classes else None
    torch.manual_seed(cfg.seed)
    arch, model = _make_model(cfg, data)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    s = _schedule(cfg)
    step = 0
    if resume and os.path.exists(ck_path):
        _check_model_config(model, cfg)
        step = _load_checkpoint(ck_path, model, ema, opt, device)
        if rank == 0:
            _truncate_log(os.path.join(cfg.out, "log.jsonl"), step)
    elif resume and rank == 0:
        warnings.warn(f"resume=True (--resume) but {cfg.out!r} holds no {ckpt.CHECKPOINT}: nothing to resume, "
                      "training starts from step 0", UserWarning, stacklevel=2)
    fwd = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(fwd) if cfg.compile else fwd
    fused_q = ops.backend_for(data) == "triton"
    model.train()

    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="training", unit="step")
    log = open(os.path.join(cfg.out, "log.jsonl"), "a") if rank == 0 else None
    if log is not None and changes:
        log.write(json.dumps({"step": step, "changed": changes}) + "\n")
    loss_sum = torch.zeros((), device=device)
    n_in_window, t_window = 0, time.perf_counter()
    stop = _StopOnSignal(world)
    last_save = time.monotonic()
    try:
        while step < cfg.steps:
            idx, t, drop = step_draws(cfg.seed, step, data.shape[0], s.num_steps, cfg.batch_size,
                                      cfg.label_dropout if cfg.classes else None)
            idx, t = idx[lo:lo + local_b].to(device), t[lo:lo + local_b].to(device)
            x0 = data[idx]
            y = None
            if cfg.classes:  # dropped labels become the null class num_classes
                y = torch.where(drop[lo:lo + local_b].to(device), model.null_class, labels[idx])
            loss = diffusion_loss(fwd, s, x0, t, noise_seed=_mix(cfg.seed + 1, step), sample_offset=lo,
                                  prediction=cfg.prediction, bf16=bf16, fused=fused_q, y=y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for grp in opt.param_groups:
                grp["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
            opt.step()
            with torch.no_grad():
                decay = ema_decay_at(step, cfg.ema_decay, start=cfg.warmup)
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
            step += 1
            loss_sum += loss.detach()
            n_in_window += 1
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                if world > 1:
                    torch.distributed.all_reduce(loss_sum)
                    loss_sum /= world
                mean_loss = loss_sum.item() / n_in_window  # one sync per log interval
                dt = time.perf_counter() - t_window
                rec = {"step": step, "loss": mean_loss, "lr": opt.param_groups[0]["lr"],
                       "images_per_s": n_in_window * cfg.batch_size / max(dt, 1e-9)}
                if log is not None:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rec['images_per_s']:.0f}")
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training loss became {mean_loss} by step {step}; lower lr= "
                                             "or check the data (values should be in [-1, 1])")
                loss_sum.zero_()
                n_in_window, t_window = 0, time.perf_counter()
            signum = stop.agreed()  # the same on every rank
            if rank == 0 and (signum is not None or step % cfg.ckpt_every == 0 or step == cfg.steps or (
                    cfg.ckpt_minutes is not None and time.monotonic() - last_save >= 60 * cfg.ckpt_minutes)):
                _save_checkpoint(ck_path, model, ema, opt, step, cfg, arch)
                last_save = time.monotonic()
            if signum is not None:
                if bar is not None:
                    bar.close()
                    bar = None
                name = signal.Signals(signum).name
                print(f"fastddpm train: {name} received: checkpoint of step {step} written to {ck_path}; continue "
                      "with resume=True (--resume)" if rank == 0 else
                      f"fastddpm train: rank {rank}: {name} received: stopped after step {step} (rank 0 writes "
                      "its checkpoint)", file=sys.stderr, flush=True)
                barrier()  # rank 0's checkpoint is on disk before any rank goes
                stop.reraise(signum)  # its usual course: SIGTERM ends the process, SIGINT raises KeyboardInterrupt
    finally:
        stop.restore()
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()
    if rank == 0:
        ckpt.save_model(ema, os.path.join(cfg.out, ckpt.MODEL), arch=arch,
                        schedule=ckpt.schedule_meta(cfg.schedule, cfg.num_timesteps), prediction=cfg.prediction)
    barrier()
    return cfg.out

"""The training loop: AdamW + cosine with warmup, checkpoints each epoch, exact resume, DDP.

One call of :func:`fit` trains a model for ``settings.epochs`` epochs and writes into ``out``:
``checkpoint.pt`` (atomically, after every epoch and when stopped), ``log.csv``, and TensorBoard
events under ``tb/``. Ctrl-C (SIGINT) or SIGTERM stops after the current step and writes a
checkpoint from which ``resume=True`` continues *exactly* where it stopped: model, optimizer,
scheduler, RNG, epoch and step within the epoch (batch order and augmentation are functions of
seed, epoch and step), so on CPU a resumed run ends with the same weights bit for bit.
"""
from __future__ import annotations

import csv
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from effst.data import DataSplit, batches, num_batches
from effst.train import distributed as dist_utils
from effst.train.checkpoint import (
    CheckpointError, load_checkpoint, make_checkpoint, save_atomic, set_rng_state, unwrap,
)
from effst.train.config import Settings
from effst.train.metrics import autocast_context, evaluate, reset_states

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.csv"
LOG_FIELDS = ("epoch", "step", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_time_s")


def interrupted_message(where: Path | str) -> str:
    """The one "interrupted" message of every effst command (CLI stages and the pipeline)."""
    return f"interrupted; the run in {where} is kept — continue it with --resume --out {where}"


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C, SIGTERM, ``stop_after_steps``); a checkpoint was written."""

    def __init__(self, checkpoint: Path):
        super().__init__(interrupted_message(Path(checkpoint).parent))
        self.checkpoint = checkpoint


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written (if any) is the last good one.

    ``reason`` says where; ``checkpoint`` is that last good checkpoint, or None when none was written.
    """

    def __init__(self, reason: str, checkpoint: Optional[Path] = None):
        kept = f"the last good checkpoint {checkpoint} is kept" if checkpoint is not None else "no checkpoint was written"
        super().__init__(f"{reason}; {kept} — lower --lr or check the data")
        self.reason = reason
        self.checkpoint = checkpoint

    def __reduce__(self):  # pickled from a pipeline worker process: rebuilt from its parts, not its text
        return type(self), (self.reason, self.checkpoint)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    test: dict = field(default_factory=dict)
    checkpoint: Optional[Path] = None
    seconds: float = 0.0


# ----------------------------------------------------------------------------- optimisation
def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on vectors and scalars (BN, biases, neuron tau/threshold)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from lr/warmup to lr, then cosine down to ``min_lr_ratio`` · lr (per step)."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- stop requests
class StopRequest:
    """First SIGINT/SIGTERM asks the loop to stop after the current step; a second SIGINT aborts.

    Pipeline workers set ``interactive = False``: they print nothing (their parent prints the one
    message) and a repeated SIGINT (the terminal's and the parent's) still only asks them to stop.
    """

    interactive = True

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def simulate(self) -> None:
        """Deliver a real SIGINT to this process (when our handler is installed), as Ctrl-C would."""
        if signal.SIGINT in self._previous and not self.requested:
            os.kill(os.getpid(), signal.SIGINT)
        self.requested = True

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT and self.interactive:
            raise KeyboardInterrupt
        self.requested = True
        if self.interactive:
            print("\neffst: stopping after this step and writing a checkpoint (Ctrl-C again to abort)",
                  file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ----------------------------------------------------------------------------- the loop
def fit(
    model: torch.nn.Module,
    recipe: list[dict],
    train_split: DataSplit,
    test_split: DataSplit,
    settings: Settings,
    out: str | Path,
    *,
    env: Optional[dist_utils.DistEnv] = None,
    resume: bool | str | Path = False,
    stage: str = "train",
    metrics: Optional[dict] = None,
) -> FitResult:
    """Train ``model`` (built from ``recipe``) and return its history and final test metrics.

    ``metrics`` (e.g. the accuracy of earlier stages) is stored in every checkpoint next to the
    latest test metrics. Raises :class:`Interrupted` after writing a checkpoint when stopped early,
    and :class:`TrainingDiverged` (writing nothing more) when the loss stops being finite.

    A model with a callable ``auxiliary_losses()`` returning ``{name: scalar tensor}`` (computed
    in its last forward pass) trains on cross-entropy plus their sum; each is logged per epoch.
    """
    out = Path(out)
    env = env or dist_utils.setup(settings.device)
    device = env.device
    ckpt_path = out / CHECKPOINT_NAME
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(settings.seed)
    model = unwrap(model).to(device)
    steps_per_epoch = num_batches(len(train_split), settings.batch_size, env.world_size, drop_last=True)
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size: {settings.batch_size} × {env.world_size} process(es) is larger than the training set "
            f"({len(train_split)} samples); use a smaller batch size"
        )
    total_steps = steps_per_epoch * settings.epochs
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay)
    scheduler = warmup_cosine(optimizer, round(settings.warmup_epochs * steps_per_epoch), total_steps, settings.min_lr_ratio)

    start_epoch, start_step, history = 0, 0, []
    running = _fresh_running()
    if resume:
        path = Path(resume) if not isinstance(resume, bool) else ckpt_path
        ckpt = load_checkpoint(path)
        if _canonical(ckpt["recipe"]) != _canonical(recipe):
            raise CheckpointError(f"checkpoint {path}: made for another model ({_recipe_difference(ckpt['recipe'], recipe)})")
        if ckpt.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {path}: holds no optimizer state, so training cannot be resumed from it")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        progress = ckpt["progress"]
        start_epoch, start_step = int(progress["epoch"]), int(progress["step"])
        history = list(progress.get("history", []))
        running.update(progress.get("running", {}))
        set_rng_state(ckpt["rng"])
        _check_epochs_reachable(progress, settings.epochs, path, recipe)
        _warn_if_changed(ckpt.get("settings", {}), settings, path, finished=bool(progress.get("finished")))
        if progress.get("finished"):
            start_epoch, start_step = settings.epochs, 0

    train_model = model
    if env.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    writer = _tensorboard(out) if (env.is_main and settings.tensorboard) else None
    result = FitResult(history=history, checkpoint=ckpt_path)
    t_start = time.perf_counter()
    global_step = start_epoch * steps_per_epoch + start_step

    def checkpoint(epoch: int, step: int, finished: bool = False) -> None:
        if not env.is_main:
            return
        progress = {"epoch": epoch, "step": step, "finished": finished, "history": history,
                    "running": dict(running), "stage": stage, "steps_per_epoch": steps_per_epoch,
                    "world_size": env.world_size}
        save_atomic(make_checkpoint(model, recipe, optimizer=optimizer, scheduler=scheduler, progress=progress,
                                    settings=settings.to_dict(), metrics={**(metrics or {}), "test": result.test}),
                    ckpt_path)

    try:
        stopping = False
        on_gpu = device.type == "cuda"
        pending = _zero_pending(device)
        with StopRequest() as stop:
            for epoch in range(start_epoch, settings.epochs):
                model.train()
                first = start_step if epoch == start_epoch else 0
                if first == 0:
                    running = _fresh_running()
                t_epoch = time.perf_counter()
                bar = _progress(settings.progress and env.is_main, steps_per_epoch, first, f"{stage} {epoch + 1}/{settings.epochs}")
                for step, (x, y) in enumerate(
                        batches(train_split, settings.batch_size, seed=settings.seed, epoch=epoch, train=True,
                                rank=env.rank, world_size=env.world_size, start=first, num_workers=settings.workers),
                        start=first):
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    reset_states(model)
                    with autocast_context(device, settings.amp):
                        logits = train_model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=settings.label_smoothing)
                    auxiliary = _auxiliary_losses(model)
                    if auxiliary:
                        loss = loss + sum(auxiliary.values())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    reset_states(model)
                    batch_loss = loss.detach() * y.numel()
                    batch_correct = (logits.detach().argmax(-1) == y).sum()
                    if on_gpu:  # no host sync per step: flushed at checkpoints and epoch ends
                        pending = batch_loss.double() + pending[0], batch_correct.double() + pending[1]
                    else:
                        running["loss"] += float(batch_loss)
                        running["correct"] += float(batch_correct)
                    for name, value in auxiliary.items():
                        running["auxiliary"][name] = running["auxiliary"].get(name, 0.0) + float(value.detach()) * y.numel()
                    running["count"] += y.numel()
                    global_step += 1
                    if bar is not None:
                        bar.update(1)
                        if not on_gpu or step % 20 == 0:
                            bar.set_postfix(loss=f"{(running['loss'] + float(pending[0])) / running['count']:.3f}")
                    if settings.stop_after_steps is not None and global_step >= settings.stop_after_steps:
                        stop.simulate()  # the same path as a Ctrl-C at this step
                    want_stop = stop.requested
                    # Under DDP all ranks must agree to stop at the same step: on the GPU that
                    # all-reduce is a host sync, so it is done every 20 steps and at epoch ends.
                    check = not (on_gpu and env.distributed) or step % 20 == 19 or step + 1 == steps_per_epoch
                    # The finiteness check reads the GPU-side sum: every 20 steps there, every step on the CPU.
                    if (not on_gpu or step % 20 == 19) and dist_utils.any_rank(
                            not math.isfinite(running["loss"] + float(pending[0])), env):
                        _diverged(ckpt_path, epoch, step, bar)
                    if check and dist_utils.any_rank(want_stop, env):
                        stopping = True
                        if step + 1 < steps_per_epoch:  # mid-epoch: save the position and leave
                            pending = _flush(running, pending)
                            if dist_utils.any_rank(not math.isfinite(running["loss"]), env):
                                _diverged(ckpt_path, epoch, step, bar)
                            running["time"] += time.perf_counter() - t_epoch
                            if bar is not None:
                                bar.close()
                            checkpoint(epoch, step + 1)
                            dist_utils.barrier(env)
                            raise Interrupted(ckpt_path)
                        break  # last step of the epoch: finish the epoch first
                if bar is not None:
                    bar.close()
                pending = _flush(running, pending)
                running["time"] += time.perf_counter() - t_epoch
                if dist_utils.any_rank(not math.isfinite(running["loss"]), env):
                    _diverged(ckpt_path, epoch, steps_per_epoch - 1, None)

                row = _epoch_row(epoch, global_step, scheduler, running, env)
                if (epoch + 1) % settings.eval_every == 0 or epoch + 1 == settings.epochs:
                    test = evaluate(model, test_split, batch_size=settings.eval_batch_size, device=device,
                                    amp=settings.amp, env=env, workers=settings.workers)
                    row["test_loss"], row["test_accuracy"] = test["loss"], test["accuracy"]
                    result.test = test
                history.append(row)
                if env.is_main and settings.progress:
                    print(_epoch_line(stage, row, settings.epochs), file=sys.stderr, flush=True)
                if env.is_main:
                    _write_csv(out / LOG_NAME, history)
                    if writer is not None:
                        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "epoch_time_s",
                                    *(k for k in row if k.startswith("aux_"))):
                            if row.get(key) is not None:
                                writer.add_scalar(f"{stage}/{key}", row[key], epoch + 1)
                        writer.flush()
                checkpoint(epoch + 1, 0, finished=epoch + 1 == settings.epochs)
                if stopping and epoch + 1 < settings.epochs:
                    dist_utils.barrier(env)
                    raise Interrupted(ckpt_path)
        if not result.test:  # resumed from a finished checkpoint: nothing trained, measure it
            result.test = evaluate(model, test_split, batch_size=settings.eval_batch_size, device=device,
                                   amp=settings.amp, env=env, workers=settings.workers)
    finally:
        if writer is not None:
            writer.close()
    result.seconds = time.perf_counter() - t_start
    return result


def _fresh_running() -> dict:
    return {"loss": 0.0, "correct": 0.0, "count": 0.0, "time": 0.0, "auxiliary": {}}


def _auxiliary_losses(model: torch.nn.Module) -> dict:
    """The model's extra loss terms of its last forward pass ({} when it has none)."""
    hook = getattr(unwrap(model), "auxiliary_losses", None)
    if not callable(hook):
        return {}
    losses = hook() or {}
    if not isinstance(losses, dict) or not all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in losses.values()):
        raise TypeError("auxiliary_losses(): expected a dict of name -> scalar tensor, "
                        f"got {type(losses).__name__}")
    return {str(k): v.reshape(()).float() for k, v in losses.items()}


def _diverged(ckpt_path: Path, epoch: int, step: int, bar) -> None:
    if bar is not None:
        bar.close()
    raise TrainingDiverged(f"training diverged: the loss is not finite at epoch {epoch + 1}, step {step + 1}",
                           ckpt_path if ckpt_path.is_file() else None)


def _epoch_line(stage: str, row: dict, epochs: int) -> str:
    """One console line per epoch: loss, accuracies, time."""
    test = "" if row.get("test_accuracy") is None else f", test accuracy {100 * row['test_accuracy']:.2f} %"
    extra = "".join(f", {k} {v:.4f}" for k, v in row.items() if k.startswith("aux_"))
    return (f"effst: {stage} epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}, train accuracy "
            f"{100 * row['train_accuracy']:.2f} %{test}{extra} ({row['epoch_time_s']:.1f} s)")


def _zero_pending(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return zero, zero


def _flush(running: dict, pending: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the GPU-side loss/correct sums into ``running`` (one host sync); returns zeros."""
    loss, correct = pending
    if loss.device.type != "cpu":
        running["loss"] += float(loss)
        running["correct"] += float(correct)
    return _zero_pending(loss.device)


def _recipe_difference(saved: list[dict], wanted: list[dict]) -> str:
    """The first step where two recipes differ, and only the keys that differ."""
    for i, (a, b) in enumerate(zip(saved, wanted)):
        if _canonical([a]) != _canonical([b]):
            keys = sorted(k for k in set(a) | set(b) if k != "backend" and a.get(k) != b.get(k))
            return (f"step {i + 1} ({a.get('op')}): " +
                    ", ".join(f"{k} {a.get(k)!r} in the checkpoint, {b.get(k)!r} here" for k in keys))
    return f"{len(saved)} recipe steps in the checkpoint, {len(wanted)} here"


def _canonical(recipe: list[dict]) -> str:
    """A recipe as JSON (tuples and lists alike), without the kernel backend: resuming on
    another device or backend is the same model."""
    import json

    steps = [{k: v for k, v in step.items() if k != "backend"} for step in recipe]
    return json.dumps(steps, sort_keys=True, default=str)


def _check_epochs_reachable(progress: dict, epochs: int, path: Path, recipe: list[dict]) -> None:
    """``epochs`` of a resumed run must lie ahead of where it stopped; a finished run is not
    extended (its learning-rate schedule has ended), so asking for other epochs is an error,
    not a run that silently trains nothing."""
    done, step = int(progress["epoch"]), int(progress["step"])
    if progress.get("finished") and epochs != done:
        neuron = [s["neuron"] for s in recipe if s.get("op") in ("build", "convert") and "neuron" in s][-1:] or ["lif"]
        raise ValueError(f"epochs: the run in {path.parent} already finished its {done} epoch(s), so --resume cannot "
                         f"train it to {epochs}; fine-tune its checkpoint instead (effst finetune {path} "
                         f"--neuron {neuron[0]} --epochs N --out NEW) or start a new run")
    if not progress.get("finished") and (done > epochs or (done == epochs and step > 0)):
        needed = done + 1 if step > 0 else done
        raise ValueError(f"epochs: the run in {path.parent} has already trained past {epochs} epoch(s) "
                         f"(it stopped at epoch {done + 1 if step > 0 else done}, step {step}); "
                         f"resume with --epochs {needed} or more")


def _warn_if_changed(saved: dict, settings: Settings, path: Path, finished: bool = False) -> None:
    """Resuming with other data-order or schedule settings cannot reproduce the original run; a
    finished run trains no more, so there such a change would only be reported, never applied."""
    current = settings.to_dict()
    changed = [k for k in ("data", "batch_size", "seed", "epochs", "lr", "weight_decay", "warmup_epochs", "min_lr_ratio")
               if k in saved and saved[k] != current.get(k)]
    if changed and finished:
        raise ValueError(f"--resume: the run in {path.parent} has finished, so "
                         f"{', '.join(f'{k} {saved[k]!r} -> {current[k]!r}' for k in changed)} would change nothing "
                         "it trained; drop the flag, or start a new run")
    if changed:
        print(f"effst: warning: resuming {path} with changed settings {', '.join(f'{k}: {saved[k]!r} -> {current[k]!r}' for k in changed)}; "
              "the result will differ from an uninterrupted run", file=sys.stderr)


def _epoch_row(epoch: int, global_step: int, scheduler, running: dict, env) -> dict:
    names = sorted(running.get("auxiliary", {}))
    sums = dist_utils.all_sum([running["loss"], running["correct"], running["count"]]
                              + [running["auxiliary"][n] for n in names], env)
    loss_sum, correct, count = sums[:3]
    auxiliary = {f"aux_{n}": s / max(count, 1) for n, s in zip(names, sums[3:])}
    return {
        "epoch": epoch + 1,
        "step": global_step,
        "lr": scheduler.get_last_lr()[0],
        "train_loss": loss_sum / max(count, 1),
        "train_accuracy": correct / max(count, 1),
        "test_loss": None,
        "test_accuracy": None,
        "epoch_time_s": running["time"],
        **auxiliary,
    }


def _write_csv(path: Path, history: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        extra = sorted({k for row in history for k in row if k.startswith("aux_")})
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS + tuple(extra))
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k) for k in LOG_FIELDS + tuple(extra)})
    tmp.replace(path)


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from effst.data.optional import require

    tqdm = require("tqdm", "progress bars (or pass --no-progress)").tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _tensorboard(out: Path):
    """A SummaryWriter under ``out/tb``, or None (with a note) when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("effst: tensorboard is not installed; writing the CSV log only (pip install 'effst[train]')",
              file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(out / "tb"))

"""The one training and evaluation loop, used by the teacher and every method.

Methods differ only in their Distiller: the loop sums the loss terms `forward_train` returns, steps
SGD, evaluates every named output of `predict` each epoch, keeps the best epoch by the Distiller's
`selection_score`, writes TensorBoard scalars and saves best/final checkpoints.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from kd.base import Distiller
from kd.checkpoint import load_state, save_checkpoint, save_state
from kd.config import UserError
from kd.data import ImageData

log = logging.getLogger("kd")


class RunFailed(Exception):
    """One run could not finish (e.g. its loss diverged); the experiment records it and goes on."""


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed, resolved once per experiment."""
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def resolve_device(name: str) -> torch.device:
    """"auto" picks cuda, then mps, then cpu; an explicit device must exist."""
    mps_ok = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; "
                            "use --device cuda:0 or auto")
    if name == "mps" and not mps_ok:
        raise UserError("--device mps: MPS is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 (else fp16) autocast on CUDA, bf16 on CPUs with native bf16 math, fp32 otherwise."""
    bf16_cpu = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and bf16_cpu else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs a GPU; on the CPU use --precision bf16, fp32 or auto")
    return precision


def lr_factor(cfg: dict, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step learning-rate multiplier: optional linear warm-up, then StepLR or cosine ("onecycle")."""
    warmup = cfg["warmup_epochs"] * steps_per_epoch
    total = cfg["epochs"] * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg["scheduler"] == "step":
            return cfg["gamma"] ** ((step // steps_per_epoch) // cfg["step_size"])
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


@dataclass
class Evaluation:
    """Top-1 accuracy of every named output of `predict`, and the "student" output's probabilities."""
    accuracies: dict[str, float]
    probs: torch.Tensor   # (N, K) softmax of the "student" output, on the CPU
    labels: torch.Tensor  # (N,)


@torch.no_grad()
def evaluate(distiller: Distiller, data: ImageData, split: str, batch_size: int, runtime: Runtime) -> Evaluation:
    """Evaluate every named output of `predict` on a whole split."""
    distiller.eval()
    correct: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=runtime.device))
    probs, labels_seen = [], []
    for images, labels in data.eval_batches(split, batch_size, runtime.device, runtime.channels_last):
        with runtime.autocast():
            outputs = distiller.predict(images)
        for name, logits in outputs.items():
            correct[name] += (logits.argmax(dim=1) == labels).sum()
        probs.append(outputs["student"].float().softmax(dim=1).cpu())
        labels_seen.append(labels.cpu())
    total = len(data.splits[split])
    return Evaluation({name: value.item() / total for name, value in correct.items()},
                      torch.cat(probs), torch.cat(labels_seen))


@dataclass
class RunSpec:
    """One training run: its name for logs, settings, seed and where its outputs go."""
    name: str                 # e.g. "Teacher", "KD"
    train_cfg: dict           # a validated TEACHER_CONFIG / STUDENT_CONFIG
    seed: int
    tensorboard_dir: Path
    checkpoint_prefix: Path   # "<dir>/<METHOD>_<arch>"; "_best.pth"/"_final.pth" are appended
    meta: dict                # checkpoint metadata shared by best and final
    resume_path: Path | None = None  # the run's state after each epoch: an interrupted run continues here


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A short sha256 of tensors' bytes: records show that runs started alike (weights, first batch)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _save(distiller: Distiller, spec: RunSpec, tag: str, epoch: int, best_accuracy: float, started: float) -> None:
    meta = {**spec.meta, "epoch": epoch, "best_accuracy": best_accuracy,
            "training_time": time.perf_counter() - started}
    for suffix, model in distiller.deployable_models().items():
        save_checkpoint(f"{spec.checkpoint_prefix}{suffix}_{tag}.pth", model, meta)


def _run_state(distiller: Distiller, optimizer, scheduler, scaler, progress: dict, best_eval: Evaluation | None
               ) -> dict:
    """Everything an interrupted run needs to continue exactly (the frozen teacher is saved elsewhere)."""
    return {"distiller": {k: v for k, v in distiller.state_dict().items() if not k.startswith("teacher.")},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": torch.get_rng_state(), "progress": progress,
            "best_eval": None if best_eval is None else vars(best_eval)}


def _restore(path: Path, distiller: Distiller, optimizer, scheduler, scaler) -> tuple[dict, Evaluation | None]:
    state = load_state(path, fix="delete it to restart that run from its first epoch")
    missing, unexpected = distiller.load_state_dict(state["distiller"], strict=False)
    if unexpected or any(not key.startswith("teacher.") for key in missing):
        raise UserError(f"'{path}' holds another model's state: start a new experiment without --resume")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    best = state["best_eval"]
    return state["progress"], None if best is None else Evaluation(**best)


def fit(distiller: Distiller, data: ImageData, spec: RunSpec, runtime: Runtime) -> tuple[dict, Evaluation]:
    """Train `distiller` per `spec.train_cfg`; return its results (best/final accuracy, history...) and
    the val evaluation of its best epoch. With `spec.resume_path` set, the state after every epoch is
    kept there and an existing state is continued from."""
    cfg = spec.train_cfg
    runtime.place(distiller)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"])
    steps_per_epoch = math.ceil(data.counts["train"] / cfg["batch_size"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    progress = {"history": [], "best_score": -1.0, "best_epoch": 0, "test_at_best": None, "elapsed": 0.0,
                "student_init": tensor_digest(*distiller.student.state_dict().values())}
    best_eval = None
    if spec.resume_path is not None and spec.resume_path.exists():
        progress, best_eval = _restore(spec.resume_path, distiller, optimizer, scheduler, scaler)
        log.info("%s seed %d: continuing after epoch %d", spec.name, spec.seed, len(progress["history"]))
    history = progress["history"]

    def test_score() -> float | None:
        """The method's score on test/ now (never used to select an epoch); None without a test split."""
        if "test" not in data.splits:
            return None
        return distiller.selection_score(evaluate(distiller, data, "test", cfg["batch_size"], runtime).accuracies)

    writer = SummaryWriter(str(spec.tensorboard_dir))
    started = time.perf_counter() - progress["elapsed"]
    try:
        for epoch in tqdm(range(len(history), cfg["epochs"]), desc=spec.name, unit="epoch", disable=None,
                          initial=len(history), total=cfg["epochs"]):
            entry = _train_epoch(distiller, data, spec, runtime, optimizer, scheduler, scaler, epoch)
            val = evaluate(distiller, data, "val", cfg["batch_size"], runtime)
            entry["val"] = val.accuracies
            entry["score"] = distiller.selection_score(val.accuracies)
            history.append(entry)
            _log_epoch(writer, spec, entry)
            if entry["score"] > progress["best_score"]:
                progress.update(best_score=entry["score"], best_epoch=epoch + 1)
                best_eval = val
                progress["test_at_best"] = test_score()
                _save(distiller, spec, "best", epoch + 1, progress["best_score"], started)
            progress["elapsed"] = time.perf_counter() - started
            if spec.resume_path is not None:
                state = _run_state(distiller, optimizer, scheduler, scaler, progress, best_eval)
                save_state(spec.resume_path, state)
        _save(distiller, spec, "final", cfg["epochs"], progress["best_score"], started)
    except torch.OutOfMemoryError:
        raise UserError(f"{runtime.device} ran out of memory training {spec.name}: try a smaller "
                        f"--batch-size (now {cfg['batch_size']}) or --device cpu") from None
    finally:
        writer.close()
    final_test = test_score()
    best_epoch = progress["best_epoch"]
    return {
        "best_accuracy": progress["best_score"],
        "final_accuracy": history[-1]["score"],
        "best_epoch": best_epoch,
        "test_accuracy": progress["test_at_best"],
        "final_test_accuracy": final_test,
        "training_time": time.perf_counter() - started,
        "epochs": cfg["epochs"],
        "images_per_s": sum(h["images"] for h in history) / sum(h["train_seconds"] for h in history),
        "student_init_sha256": progress["student_init"],
        "first_batch_sha256": history[0]["first_batch_sha256"],
        **distiller.record_extras(history, best_epoch),
        "history": history,
    }, best_eval


def _train_epoch(distiller: Distiller, data: ImageData, spec: RunSpec, runtime: Runtime,
                 optimizer: torch.optim.Optimizer, scheduler, scaler, epoch: int) -> dict:
    cfg = spec.train_cfg
    distiller.train()
    distiller.start_epoch(epoch, cfg["epochs"])
    loss_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=runtime.device))
    correct, seen = torch.zeros((), device=runtime.device), 0
    lr = optimizer.param_groups[0]["lr"]
    started = time.perf_counter()
    batches = tqdm(data.train_batches(spec.seed, epoch, cfg["batch_size"], runtime.device, runtime.channels_last),
                   total=math.ceil(data.counts["train"] / cfg["batch_size"]), desc=f"epoch {epoch + 1}",
                   unit="batch", leave=False, disable=None)
    first_batch = None
    for step, (images, labels) in enumerate(batches):
        if first_batch is None:
            first_batch = tensor_digest(images, labels)
        with runtime.autocast():
            logits, losses = distiller.forward_train(images, labels)
            loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = labels.shape[0]
        for name, value in losses.items():
            loss_sums[name] += value.detach().float() * n
        correct += (logits.argmax(dim=1) == labels).sum()
        seen += n
        if step % 10 == 0:  # .item() synchronises a GPU: refresh the bar now and then, not every step
            batches.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct.item() / seen:.3f}",
                                img_s=f"{seen / (time.perf_counter() - started):.0f}")
    seconds = time.perf_counter() - started
    losses_mean = {name: value.item() / seen for name, value in loss_sums.items()}
    if not all(math.isfinite(v) for v in losses_mean.values()):
        raise RunFailed(f"{spec.name} (seed {spec.seed}) diverged in epoch {epoch + 1}: loss "
                        f"{losses_mean}; try a lower lr or --precision fp32")
    return {"epoch": epoch + 1, "lr": lr, "train_loss": losses_mean, "train_accuracy": correct.item() / seen,
            "images": seen, "train_seconds": seconds, "images_per_s": seen / seconds,
            "first_batch_sha256": first_batch}


def _log_epoch(writer: SummaryWriter, spec: RunSpec, entry: dict) -> None:
    step = entry["epoch"]
    for name, value in entry["train_loss"].items():
        writer.add_scalar(f"train/{name}", value, step)
    writer.add_scalar("train/loss_total", sum(entry["train_loss"].values()), step)
    writer.add_scalar("train/accuracy", entry["train_accuracy"], step)
    writer.add_scalar("train/lr", entry["lr"], step)
    writer.add_scalar("train/images_per_s", entry["images_per_s"], step)
    for name, value in entry["val"].items():
        writer.add_scalar(f"val/accuracy_{name}", value, step)
    writer.add_scalar("val/accuracy", entry["score"], step)
    writer.flush()
    log.info("%s seed %d epoch %d/%d: loss %.4f train acc %.4f val acc %.4f (%.0f img/s)", spec.name,
             spec.seed, step, spec.train_cfg["epochs"], sum(entry["train_loss"].values()),
             entry["train_accuracy"], entry["score"], entry["images_per_s"])

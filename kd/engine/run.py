"""One training run inside the loop: its settings (`RunSpec`), its optimizer and lr schedule, its history
and best epoch, its checkpoints, TensorBoard scalars and per-epoch resume state (`TrainingRun`)."""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.tensorboard import SummaryWriter

from kd.data.batches import ImageData, StrongView
from kd.engine import distributed
from kd.engine.checkpoint import load_state, save_checkpoint, save_state
from kd.engine.evaluation import Evaluation, evaluate
from kd.engine.result import RunResult, TrainingLog
from kd.engine.runtime import Runtime
from kd.errors import UserError
from kd.methods.base import Distiller

log = logging.getLogger("kd")


class RunFailed(Exception):
    """One run could not finish (e.g. its loss diverged); the experiment records it and goes on."""


def lr_factor(cfg: dict, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step learning-rate multiplier: optional linear warm-up, then steps ("step": × gamma every step_size
    epochs, or at each epoch of a step_size list, as StepLR and MultiStepLR) or cosine ("onecycle")."""
    warmup = cfg["warmup_epochs"] * steps_per_epoch
    total = cfg["epochs"] * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg["scheduler"] == "step":
            epoch, every = step // steps_per_epoch, cfg["step_size"]
            steps = sum(epoch >= at for at in every) if isinstance(every, list) else epoch // every
            return cfg["gamma"] ** steps
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


@dataclass
class RunSpec:
    """One training run: its name for logs, settings, seed and where its outputs go."""
    name: str                 # the method's name, or "Teacher"
    train_cfg: dict           # a validated TEACHER_CONFIG / STUDENT_CONFIG
    seed: int
    tensorboard_dir: Path
    checkpoint_prefix: Path | None  # "<dir>/<METHOD>_<arch>"; "_best.pth"/"_final.pth" appended; None: no files
    meta: dict                # checkpoint metadata shared by best and final
    resume_path: Path | None = None  # the run's state after each epoch: an interrupted run continues here
    # called with each epoch's history entry once it is logged (a tuning trial reports it, and may stop there)
    after_epoch: Callable[[dict], None] | None = None


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A short sha256 of tensors' bytes: records show that runs started alike (weights, first batch)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _save(distiller: Distiller, spec: RunSpec, tag: str, epoch: int, best_accuracy: float, seconds: float) -> None:
    if spec.checkpoint_prefix is None:
        return
    meta = {**spec.meta, "epoch": epoch, "best_accuracy": best_accuracy, "training_time": seconds}
    for suffix, model in distiller.deployable_models().items():
        save_checkpoint(f"{spec.checkpoint_prefix}{suffix}_{tag}.pth", model, meta)


class TrainingRun:
    """One distiller's training state (optimizer, schedule, history, best epoch) inside `fit_together`."""

    def __init__(self, distiller: Distiller, spec: RunSpec, data: ImageData, runtime: Runtime):
        cfg = spec.train_cfg
        self.distiller, self.spec, self.data, self.runtime = distiller, spec, data, runtime
        distiller.attach_data(data.splits["train"].labels.cpu(), spec.seed)
        runtime.place(distiller)
        self.model = runtime.capture(distributed.wrap(distiller, runtime.device))
        self.optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                         weight_decay=cfg["weight_decay"])
        schedule = lr_factor(cfg, data.steps_per_epoch(cfg["batch_size"]))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
        self.progress = {"history": [], "best_score": -1.0, "best_epoch": 0, "test_at_best": None,
                         "elapsed": 0.0, "student_init": tensor_digest(*distiller.student.state_dict().values())}
        self.best_eval: Evaluation | None = None
        self.failure: RunFailed | None = None
        if spec.resume_path is not None and spec.resume_path.exists():
            self._restore(spec.resume_path)
            log.info("%s seed %d: continuing after epoch %d", spec.name, spec.seed, len(self.history))
        self.writer = distributed.summary_writer(spec.tensorboard_dir)

    @property
    def history(self) -> list[dict]:
        return self.progress["history"]

    def _restore(self, path: Path) -> None:
        state = load_state(path, fix="delete it to restart that run from its first epoch")
        missing, unexpected = self.distiller.load_state_dict(state["distiller"], strict=False)
        if unexpected or any(not key.startswith("teacher.") for key in missing):
            raise UserError(f"'{path}' holds another model's state: start a new experiment without --resume")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("precision", self.runtime.precision) != self.runtime.precision:
            raise UserError(f"'{path}' was trained in {state['precision']}, this run is set up for "
                            f"{self.runtime.precision}: resume with the experiment's own precision")
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        self.progress = state["progress"]
        self.best_eval = None if state["best_eval"] is None else Evaluation(**state["best_eval"])

    def _state(self) -> dict:
        """Everything an interrupted run needs to continue exactly (the frozen teacher is saved elsewhere)."""
        return {"distiller": {k: v for k, v in self.distiller.state_dict().items() if not k.startswith("teacher.")},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "precision": self.runtime.precision,
                "rng": torch.get_rng_state(), "progress": self.progress,
                "best_eval": None if self.best_eval is None else vars(self.best_eval)}

    def start_epoch(self, epoch: int) -> None:
        self.distiller.train()
        self.distiller.start_epoch(epoch, self.spec.train_cfg["epochs"])
        self.loss_weights = self.distiller.loss_weights()
        self.loss_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.runtime.device))
        self.correct, self.seen = torch.zeros((), device=self.runtime.device), 0
        self.stopwatch = self.runtime.stopwatch()  # this run's own steps; shared work is timed by the epoch
        self.lr = self.optimizer.param_groups[0]["lr"]

    def step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
             strong_view: StrongView | None = None) -> torch.Tensor:
        self.stopwatch.start()
        batch = {"indices": indices} if self.distiller.needs_index else {}
        if self.distiller.needs_strong_view:  # made here, by the first run that asks: its clock pays
            batch["strong_images"] = strong_view()
        with self.runtime.autocast():
            logits, losses = self.model(images, labels, **batch)
            loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        n = labels.shape[0]
        for name, value in losses.items():
            self.loss_sums[name] += value.detach().float() * n
        self.correct += (logits.argmax(dim=1) == labels).sum()
        self.seen += n
        self.stopwatch.stop()
        return loss

    def end_epoch(self, epoch: int, first_batch: str, shared_seconds: float) -> None:
        """Evaluate on val, log, keep the best epoch, save its state; a diverged run is marked failed."""
        spec, cfg = self.spec, self.spec.train_cfg
        images = self.seen * distributed.world_size()
        losses = {name: distributed.sum_all(value).item() / images for name, value in self.loss_sums.items()}
        if not all(math.isfinite(v) for v in losses.values()):
            self._diverged(epoch, f"loss {losses}")
            return
        seconds = self.stopwatch.seconds() + shared_seconds
        started = time.perf_counter()
        distributed.sync_buffers(self.distiller)  # evaluate (and save) rank 0's BatchNorm statistics
        val = evaluate(self.distiller, self.data, "val", cfg["batch_size"], self.runtime)
        if not torch.isfinite(val.probs).all():
            # the epoch's last step can turn weights non-finite after a finite loss: its outputs show it
            self._diverged(epoch, "its val outputs are not finite")
            return
        entry = {"epoch": epoch + 1, "lr": self.lr, "train_loss": losses,
                 "train_accuracy": distributed.sum_all(self.correct).item() / images, "images": images,
                 "train_seconds": seconds, "images_per_s": images / seconds, "first_batch_sha256": first_batch,
                 "val": val.accuracies, "score": self.distiller.selection_score(val.accuracies)}
        if self.loss_weights:
            entry["loss_weights"] = self.loss_weights
        self.history.append(entry)
        _log_epoch(self.writer, spec, entry)
        progress = self.progress
        if entry["score"] > progress["best_score"]:
            progress.update(best_score=entry["score"], best_epoch=epoch + 1)
            self.best_eval = val
            progress["test_at_best"] = self.test_score()
        progress["elapsed"] += seconds + time.perf_counter() - started  # training time counts evaluation too
        if progress["best_epoch"] == epoch + 1:
            _save(self.distiller, spec, "best", epoch + 1, progress["best_score"], progress["elapsed"])
        if spec.resume_path is not None:
            save_state(spec.resume_path, self._state())
        if spec.after_epoch is not None:
            spec.after_epoch(entry)

    def _diverged(self, epoch: int, evidence: str) -> None:
        self.failure = RunFailed(f"{self.spec.name} (seed {self.spec.seed}) diverged in epoch {epoch + 1}: "
                                 f"{evidence}; try a lower lr or --precision fp32")

    def test_score(self) -> float | None:
        """The method's score on test/ now (never used to select an epoch); None without a test split."""
        if "test" not in self.data.splits:
            return None
        evaluation = evaluate(self.distiller, self.data, "test", self.spec.train_cfg["batch_size"], self.runtime)
        return self.distiller.selection_score(evaluation.accuracies)

    def result(self) -> tuple[RunResult, TrainingLog, Evaluation]:
        """Save the final checkpoint; the run's outcome, its log and the val evaluation of its best epoch."""
        progress, history, cfg = self.progress, self.history, self.spec.train_cfg
        _save(self.distiller, self.spec, "final", cfg["epochs"], progress["best_score"], progress["elapsed"])
        outcome = RunResult(best_accuracy=progress["best_score"], final_accuracy=history[-1]["score"],
                            best_epoch=progress["best_epoch"], test_accuracy=progress["test_at_best"],
                            training_time=progress["elapsed"], epochs=cfg["epochs"])
        log = TrainingLog(final_test_accuracy=self.test_score(),
                          images_per_s=sum(h["images"] for h in history) / sum(h["train_seconds"] for h in history),
                          student_init_sha256=progress["student_init"],
                          first_batch_sha256=history[0]["first_batch_sha256"], history=history)
        return outcome, log, self.best_eval


def _log_epoch(writer: SummaryWriter, spec: RunSpec, entry: dict) -> None:
    step = entry["epoch"]
    for name, value in entry["train_loss"].items():
        writer.add_scalar(f"train/{name}", value, step)
    writer.add_scalar("train/loss_total", sum(entry["train_loss"].values()), step)
    writer.add_scalar("train/accuracy", entry["train_accuracy"], step)
    writer.add_scalar("train/lr", entry["lr"], step)
    for name, value in entry.get("loss_weights", {}).items():
        writer.add_scalar(f"train/weight_{name}", value, step)
    writer.add_scalar("train/images_per_s", entry["images_per_s"], step)
    for name, value in entry["val"].items():
        writer.add_scalar(f"val/accuracy_{name}", value, step)
    writer.add_scalar("val/accuracy", entry["score"], step)
    writer.flush()
    log.info("%s seed %d epoch %d/%d: loss %.4f train acc %.4f val acc %.4f (%.0f img/s)", spec.name,
             spec.seed, step, spec.train_cfg["epochs"], sum(entry["train_loss"].values()),
             entry["train_accuracy"], entry["score"], entry["images_per_s"])

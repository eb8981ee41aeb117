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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from kd import distributed
from kd.base import Distiller
from kd.checkpoint import load_state, save_checkpoint, save_state
from kd.config import UserError
from kd.batches import ImageData
from kd.runtime import Runtime

log = logging.getLogger("kd")


class RunFailed(Exception):
    """One run could not finish (e.g. its loss diverged); the experiment records it and goes on."""


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
    """Evaluate every named output of `predict` on a whole split (each process its share of it).

    Evaluation runs in float32 whatever the training precision: the recorded accuracy, NLL, ECE and
    agreement are those of the saved checkpoint loaded in float32.
    """
    distiller.eval()
    correct: dict[str, torch.Tensor] = {}
    probs, labels_seen = [], []
    for images, labels in data.eval_batches(split, batch_size, runtime.device, runtime.channels_last):
        outputs = distiller.predict(images)
        for name, logits in outputs.items():
            correct[name] = correct.get(name, 0) + (logits.float().argmax(dim=1) == labels).sum()
        probs.append(outputs["student"].float().softmax(dim=1))
        labels_seen.append(labels)
    classes = len(data.class_names)
    share = {"indices": data.eval_indices(split), "correct": {name: int(count) for name, count in correct.items()},
             "probs": torch.cat(probs).cpu() if probs else torch.empty(0, classes),
             "labels": torch.cat(labels_seen).cpu() if labels_seen else torch.empty(0, dtype=torch.long)}
    # One collective, whatever each process holds: a process whose share is empty (a split with fewer
    # images than processes) still answers, and learns the output names from the others.
    shares = distributed.gather_objects(share)
    total = len(data.splits[split])
    names = dict.fromkeys(name for part in shares for name in part["correct"])
    accuracies = {name: sum(part["correct"].get(name, 0) for part in shares) / total for name in names}
    order = torch.cat([part["indices"] for part in shares]).argsort()  # back to the split's order
    return Evaluation(accuracies, torch.cat([part["probs"] for part in shares])[order],
                      torch.cat([part["labels"] for part in shares])[order])


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


def _save(distiller: Distiller, spec: RunSpec, tag: str, epoch: int, best_accuracy: float, seconds: float) -> None:
    meta = {**spec.meta, "epoch": epoch, "best_accuracy": best_accuracy, "training_time": seconds}
    for suffix, model in distiller.deployable_models().items():
        save_checkpoint(f"{spec.checkpoint_prefix}{suffix}_{tag}.pth", model, meta)


class _Run:
    """One distiller's training state (optimizer, schedule, history, best epoch) inside `fit_together`."""

    def __init__(self, distiller: Distiller, spec: RunSpec, data: ImageData, runtime: Runtime):
        cfg = spec.train_cfg
        self.distiller, self.spec, self.data, self.runtime = distiller, spec, data, runtime
        distiller.attach_data(data.splits["train"].labels.cpu(), spec.seed)
        runtime.place(distiller)
        self.model = distributed.wrap(distiller, runtime.device)
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

    def step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        self.stopwatch.start()
        batch = {"indices": indices} if self.distiller.needs_index else {}
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

    def _diverged(self, epoch: int, evidence: str) -> None:
        self.failure = RunFailed(f"{self.spec.name} (seed {self.spec.seed}) diverged in epoch {epoch + 1}: "
                                 f"{evidence}; try a lower lr or --precision fp32")

    def test_score(self) -> float | None:
        """The method's score on test/ now (never used to select an epoch); None without a test split."""
        if "test" not in self.data.splits:
            return None
        evaluation = evaluate(self.distiller, self.data, "test", self.spec.train_cfg["batch_size"], self.runtime)
        return self.distiller.selection_score(evaluation.accuracies)

    def result(self) -> tuple[dict, Evaluation]:
        progress, history, cfg = self.progress, self.history, self.spec.train_cfg
        _save(self.distiller, self.spec, "final", cfg["epochs"], progress["best_score"], progress["elapsed"])
        return {
            "best_accuracy": progress["best_score"],
            "final_accuracy": history[-1]["score"],
            "best_epoch": progress["best_epoch"],
            "test_accuracy": progress["test_at_best"],
            "final_test_accuracy": self.test_score(),
            "training_time": progress["elapsed"],
            "epochs": cfg["epochs"],
            "images_per_s": sum(h["images"] for h in history) / sum(h["train_seconds"] for h in history),
            "student_init_sha256": progress["student_init"],
            "first_batch_sha256": history[0]["first_batch_sha256"],
            **self.distiller.record_extras(history, progress["best_epoch"]),
            "history": history,
        }, self.best_eval


def fit(distiller: Distiller, data: ImageData, spec: RunSpec, runtime: Runtime) -> tuple[dict, Evaluation]:
    """Train one distiller (see `fit_together`); a diverged run raises RunFailed."""
    (outcome,) = fit_together([(distiller, spec)], data, runtime)
    if isinstance(outcome, RunFailed):
        raise outcome
    return outcome


def fit_together(jobs: list[tuple[Distiller, RunSpec]], data: ImageData, runtime: Runtime
                 ) -> list[tuple[dict, Evaluation] | RunFailed]:
    """Train several distillers in one pass over the data; return each one's results (best/final accuracy,
    history...) and the val evaluation of its best epoch, or the RunFailed that stopped it.

    The runs share a seed and a batch size, so they see exactly the batches they would see one by one;
    their frozen teacher runs once per batch for all of them (its logits and hooked features are reused),
    which is where training several teacher-based methods together saves time. The shared work (data and
    teacher forward) is split evenly between the runs' training times. With `spec.resume_path` set, each
    run's state after every epoch is kept there and an existing state is continued from.
    """
    specs = [spec for _, spec in jobs]
    if len({(spec.seed, spec.train_cfg["batch_size"], spec.train_cfg["epochs"]) for spec in specs}) != 1:
        raise ValueError("runs trained together need the same seed, batch size and epochs")
    seed, batch_size, epochs = specs[0].seed, specs[0].train_cfg["batch_size"], specs[0].train_cfg["epochs"]
    runs = [_Run(distiller, spec, data, runtime) for distiller, spec in jobs]
    name = "+".join(spec.name for spec in specs)
    try:
        first_epoch = min(len(run.history) for run in runs)
        for epoch in tqdm(range(first_epoch, epochs), desc=name, unit="epoch", initial=first_epoch, total=epochs,
                          disable=distributed.quiet()):
            active = [run for run in runs if len(run.history) == epoch and run.failure is None]
            if not active:
                break
            _train_epoch(active, data, seed, epoch, batch_size, runtime)
    except torch.OutOfMemoryError:
        message = (f"{runtime.device} ran out of memory training {name}: try a smaller --batch-size (now "
                   f"{batch_size}), fewer processes per GPU (--parallel runs) or --device cpu")
        if distributed.active():  # the other processes of this run would wait for this one forever
            raise UserError(message) from None
        runtime.empty_cache()  # the runs after these get the memory back
        for run in runs:
            run.failure = run.failure or RunFailed(message)
    finally:
        for run in runs:
            run.writer.close()
    return [run.failure or run.result() for run in runs]


def _train_epoch(runs: list[_Run], data: ImageData, seed: int, epoch: int, batch_size: int, runtime: Runtime
                 ) -> None:
    """One epoch of every run in `runs`, batch by batch; the teacher they share runs once per batch."""
    for run in runs:
        run.start_epoch(epoch)
    teacher_user = next((run.distiller for run in runs if run.distiller.teacher is not None), None)
    runtime.synchronize()  # the clock starts with an idle device: no earlier work counts in this epoch
    started = time.perf_counter()
    batches = tqdm(data.train_batches(seed, epoch, batch_size, runtime.device, runtime.channels_last),
                   total=data.steps_per_epoch(batch_size), desc=f"epoch {epoch + 1}",
                   unit="batch", leave=False, disable=distributed.quiet())
    first_batch = None
    for step, (images, labels, indices) in enumerate(batches):
        if first_batch is None:
            first_batch = tensor_digest(images, labels)
        if teacher_user is not None:
            with runtime.autocast():
                teacher_user.teacher_forward(images)  # cached: each teacher-based run reuses it for this batch
        losses = [run.step(images, labels, indices) for run in runs]
        if step % 10 == 0:  # .item() synchronises a GPU: refresh the bar now and then, not every step
            seen = runs[0].seen
            batches.set_postfix(loss="/".join(f"{loss.item():.3f}" for loss in losses),
                                img_s=f"{seen * len(runs) / (time.perf_counter() - started):.0f}")
    runtime.synchronize()  # the epoch's last steps have run, not only been queued
    shared = max(0.0, time.perf_counter() - started - sum(run.stopwatch.seconds() for run in runs))
    for run in runs:
        run.end_epoch(epoch, first_batch, shared / len(runs))


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

"""The one training loop, used by the teacher and every method.

Methods differ only in their Distiller: the loop sums the loss terms `forward_train` returns, steps
SGD, evaluates every named output of `predict` each epoch, keeps the best epoch by the Distiller's
`selection_score`, writes TensorBoard scalars and saves best/final checkpoints (kd/engine/run.py keeps
each run's state).
"""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from kd.data.batches import ImageData
from kd.engine import distributed
from kd.engine.evaluation import Evaluation
from kd.engine.result import RunResult, TrainingLog
from kd.engine.run import RunFailed, RunSpec, TrainingRun, tensor_digest
from kd.engine.runtime import Runtime
from kd.errors import UserError
from kd.methods.base import Distiller


def fit(distiller: Distiller, data: ImageData, spec: RunSpec, runtime: Runtime
        ) -> tuple[RunResult, TrainingLog, Evaluation]:
    """Train one distiller (see `fit_together`); a diverged run raises RunFailed."""
    (outcome,) = fit_together([(distiller, spec)], data, runtime)
    if isinstance(outcome, RunFailed):
        raise outcome
    return outcome


def fit_together(jobs: list[tuple[Distiller, RunSpec]], data: ImageData, runtime: Runtime
                 ) -> list[tuple[RunResult, TrainingLog, Evaluation] | RunFailed]:
    """Train several distillers in one pass over the data; return each one's outcome (best/final accuracy ...),
    training log (history ...) and the val evaluation of its best epoch, or the RunFailed that stopped it.

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
    runs = [TrainingRun(distiller, spec, data, runtime) for distiller, spec in jobs]
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


def _train_epoch(runs: list[TrainingRun], data: ImageData, seed: int, epoch: int, batch_size: int, runtime: Runtime
                 ) -> None:
    """One epoch of every run in `runs`, batch by batch; the teacher they share runs once per batch."""
    for run in runs:
        run.start_epoch(epoch)
    teacher_user = next((run.distiller for run in runs if run.distiller.teacher is not None), None)
    # a two-view run's teacher forward of the strong view replaces the cached one: it steps after the others
    runs = sorted(runs, key=lambda run: run.distiller.needs_strong_view)
    two_views = runs[-1].distiller.needs_strong_view
    runtime.synchronize()  # the clock starts with an idle device: no earlier work counts in this epoch
    started = time.perf_counter()
    batches = tqdm(data.train_batches(seed, epoch, batch_size, runtime.device, runtime.channels_last, two_views),
                   total=data.steps_per_epoch(batch_size), desc=f"epoch {epoch + 1}",
                   unit="batch", leave=False, disable=distributed.quiet())
    first_batch = None
    for step, (images, labels, indices, strong_view) in enumerate(batches):
        if first_batch is None:
            first_batch = tensor_digest(images, labels)
        if teacher_user is not None:
            with runtime.autocast():
                teacher_user.teacher_forward(images)  # cached: each teacher-based run reuses it for this batch
        losses = [run.step(images, labels, indices, strong_view) for run in runs]
        if step % 10 == 0:  # .item() synchronises a GPU: refresh the bar now and then, not every step
            seen = runs[0].seen
            batches.set_postfix(loss="/".join(f"{loss.item():.3f}" for loss in losses),
                                img_s=f"{seen * len(runs) / (time.perf_counter() - started):.0f}")
    runtime.synchronize()  # the epoch's last steps have run, not only been queued
    shared = max(0.0, time.perf_counter() - started - sum(run.stopwatch.seconds() for run in runs))
    for run in runs:
        run.end_epoch(epoch, first_batch, shared / len(runs))

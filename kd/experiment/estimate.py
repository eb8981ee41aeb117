"""`--check`'s time estimate: a few training steps of the teacher and the student, timed on the run's
device, precision, batch size and image size, then multiplied out over the plan's epochs and runs."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kd.engine import distributed
from kd.engine.runtime import Runtime
from kd.errors import UserError
from kd.experiment.plan import method_groups
from kd.experiment.setup import Setup
from kd.methods import METHODS


def seconds_per_call(call: Callable[[], None], runtime: Runtime) -> float:
    """One untimed warm-up call (kernel selection, caches), then the mean of three timed calls (of one when
    a call takes over a second: the estimate must not take minutes on a slow CPU)."""
    started = time.perf_counter()
    call()
    runtime.synchronize()
    repeats = 1 if time.perf_counter() - started > 1.0 else 3
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    runtime.synchronize()
    return (time.perf_counter() - started) / repeats


def random_batch(batch_size: int, image_size: int, classes: int, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(batch_size, 3, image_size, image_size, device=runtime.device)
    if runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, classes, (batch_size,), device=runtime.device)


def training_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, runtime: Runtime
                  ) -> Callable[[], None]:
    """One SGD step of `model` on a fixed batch, taken as the trainer takes it (autocast, fp16 scaler), with
    every parameter trained (a model checked as a teacher before may have been frozen)."""
    model.requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")

    def step() -> None:
        model.train()
        with runtime.autocast():
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def forward_pass(model: nn.Module, images: torch.Tensor, runtime: Runtime) -> Callable[[], None]:
    @torch.no_grad()
    def forward() -> None:
        model.eval()
        with runtime.autocast():
            model(images)
    return forward


@dataclass(frozen=True)
class StepTimes:
    """Seconds of one batch, timed on the run's device, precision, batch size and image size."""
    teacher_train: float    # 0 when the teacher is not trained
    teacher_forward: float  # at the students' batch size
    student_train: float
    student_forward: float


def time_steps(setup: Setup, train_teacher: bool) -> StepTimes:
    """A few steps of each model timed (the teacher's training step only when it will be trained)."""
    config, data, runtime = setup.config, setup.data, setup.runtime
    teacher_cfg, student_cfg = config["teacher"], config["student"]
    classes = len(data.class_names)

    def batch(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return random_batch(cfg["batch_size"], data.image_size, classes, runtime)

    try:
        teacher = runtime.place(setup.plain(setup.teacher_spec))
        student = runtime.place(setup.plain(setup.student_spec))
        return StepTimes(
            seconds_per_call(training_step(teacher, *batch(teacher_cfg), runtime), runtime) if train_teacher else 0.0,
            seconds_per_call(forward_pass(teacher, batch(student_cfg)[0], runtime), runtime),
            seconds_per_call(training_step(student, *batch(student_cfg), runtime), runtime),
            seconds_per_call(forward_pass(student, batch(student_cfg)[0], runtime), runtime))
    except torch.OutOfMemoryError:
        raise UserError(f"{runtime.device} ran out of memory timing a training step for the estimate: try a "
                        f"smaller --batch-size (now {student_cfg['batch_size']})") from None


def _epochs_seconds(setup: Setup, cfg: dict, step: float, forward: float) -> float:
    data = setup.data
    val_batches = math.ceil(data.counts["val"] / distributed.world_size() / cfg["batch_size"])
    return cfg["epochs"] * (data.steps_per_epoch(cfg["batch_size"]) * step + val_batches * forward)


def teacher_seconds(setup: Setup, times: StepTimes) -> float:
    if not times.teacher_train:
        return 0.0
    return _epochs_seconds(setup, setup.config["teacher"], times.teacher_train, times.teacher_forward)


def group_seconds(setup: Setup, times: StepTimes, methods: list[str] | tuple[str, ...]) -> float:
    """One seed of methods trained together: each method's step counts its cost in student steps (DML: one
    per peer), and they share one teacher forward per batch."""
    config = setup.config
    students = sum(METHODS[m].cost(config["methods"][m]) for m in methods)
    shared = times.teacher_forward if any(METHODS[m].distiller.needs_teacher for m in methods) else 0.0
    return _epochs_seconds(setup, config["student"], students * times.student_train + shared,
                           students * times.student_forward)


def estimate_seconds(setup: Setup, times: StepTimes) -> dict[str, float]:
    """Estimated seconds of the teacher's training (0 when a saved one is reused) and of all student runs.

    Every epoch adds a forward pass over this process's share of the val split. Extra modules
    (regressors, exit heads) are small and not counted.
    """
    exp = setup.config["experiment"]
    groups = method_groups(exp["methods"], exp["share_teacher"], setup.own_settings)
    return {"teacher": teacher_seconds(setup, times),
            "students": sum(group_seconds(setup, times, group) for group in groups) * len(exp["seeds"])}


def as_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def describe_estimate(seconds: dict[str, float], setup: Setup) -> str:
    teacher = as_minutes(seconds["teacher"]) if seconds["teacher"] else "reused"
    return (f"estimated time: ~{as_minutes(seconds['teacher'] + seconds['students'])} (teacher {teacher}, "
            f"students {as_minutes(seconds['students'])}), from timed training steps on {setup.runtime.device} "
            f"({setup.runtime.precision}); a rough guide")

"""`--check`'s time estimate: a few training steps of the teacher and the student, timed on the run's
device, precision, batch size and image size, then multiplied out over the plan's epochs and runs."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kd import METHODS
from kd.experiment import Setup, method_groups
from kd.runtime import Runtime
from models import build_resnet


def _seconds_per_call(call: Callable[[], None], runtime: Runtime, repeats: int = 2) -> float:
    call()  # warm-up: kernel selection (cudnn.benchmark), allocator, caches
    runtime.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    runtime.synchronize()
    return (time.perf_counter() - started) / repeats


def _step_costs(model: nn.Module, batch_size: int, setup: Setup) -> tuple[float, float]:
    """Seconds of one SGD training step and of one no-grad forward pass, at `batch_size`."""
    runtime, size = setup.runtime, setup.data.image_size
    model = runtime.place(model)
    images = torch.randn(batch_size, 3, size, size, device=runtime.device)
    if runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, len(setup.data.class_names), (batch_size,), device=runtime.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")

    def train_step() -> None:
        with runtime.autocast():
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    @torch.no_grad()
    def forward() -> None:
        with runtime.autocast():
            model(images)

    model.train()
    train = _seconds_per_call(train_step, runtime)
    model.eval()
    return train, _seconds_per_call(forward, runtime)


def estimate_seconds(setup: Setup, train_teacher: bool) -> dict[str, float]:
    """Estimated seconds of the teacher's training (0 when a saved one is reused) and of all student runs.

    A method's step counts one student step (DML: one per peer); methods trained together share one
    teacher forward per batch; every epoch adds a forward pass over the val split. Extra modules
    (regressors, exit heads) are small and not counted.
    """
    config, data = setup.config, setup.data
    classes = len(data.class_names)
    teacher_cfg, student_cfg = config["teacher"], config["student"]
    teacher = build_resnet(teacher_cfg["model"], classes, setup.stem)
    teacher_train, _ = _step_costs(teacher, teacher_cfg["batch_size"], setup) if train_teacher else (0.0, 0.0)
    _, teacher_forward = _step_costs(teacher, student_cfg["batch_size"], setup)
    student_train, student_forward = _step_costs(build_resnet(student_cfg["model"], classes, setup.stem),
                                                 student_cfg["batch_size"], setup)

    def epochs_cost(cfg: dict, step: float, forward: float) -> float:
        val_batches = math.ceil(data.counts["val"] / cfg["batch_size"])
        return cfg["epochs"] * (data.steps_per_epoch(cfg["batch_size"]) * step + val_batches * forward)

    exp = config["experiment"]
    students = 0.0
    for group in method_groups(exp["methods"], exp["share_teacher"]):
        peers = sum(config["methods"][m].get("num_peers", 1) for m in group)
        shared = teacher_forward if any(METHODS[m].needs_teacher for m in group) else 0.0
        students += epochs_cost(student_cfg, peers * student_train + shared, peers * student_forward)
    return {"teacher": epochs_cost(teacher_cfg, teacher_train, teacher_forward) if train_teacher else 0.0,
            "students": students * len(exp["seeds"])}


def describe_estimate(seconds: dict[str, float], setup: Setup) -> str:
    def minutes(value: float) -> str:
        return f"{value / 60:.1f} min" if value >= 60 else f"{value:.0f} s"
    teacher = minutes(seconds["teacher"]) if seconds["teacher"] else "reused"
    return (f"estimated time: ~{minutes(seconds['teacher'] + seconds['students'])} (teacher {teacher}, "
            f"students {minutes(seconds['students'])}), from timed training steps on {setup.runtime.device} "
            f"({setup.runtime.precision}); a rough guide, within a factor of about 2")

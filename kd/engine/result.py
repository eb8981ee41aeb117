"""What a finished run reports (kd/engine/run.py): its outcome, which a teacher used as it is reports too, and
the log of its training in this experiment. The run record (kd/results/record.py) holds both as they are."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunResult:
    """The outcome of a finished run."""
    best_accuracy: float           # the selection score (val) at the best epoch
    final_accuracy: float          # ... at the last epoch
    best_epoch: int                # from 1
    test_accuracy: float | None    # on test/ at the best val epoch (None without test/)
    training_time: float           # seconds, evaluation included
    epochs: int


@dataclass
class TrainingLog:
    """What training the run in this experiment adds (a reused teacher has none)."""
    final_test_accuracy: float | None  # on test/ at the last epoch
    images_per_s: float                # training images a second
    student_init_sha256: str           # digests that show runs started alike
    first_batch_sha256: str
    history: list[dict]                # one entry per epoch

"""The run record: one typed place that names every key comparison_results.json holds for a run, the
teacher's and every method's. The teacher (kd/experiment/teacher.py) and the runs (kd/experiment/runs.py) build
it; the table, the plots and report.md read it; `to_json`/`from_json` are its only conversions.

A record is made of parts, each present or not as a whole: a failed run has no result, metrics or cost; a
teacher used as it is has no training log; only the teacher's record has its file. In the JSON the parts' keys
stand flat beside the run's own keys, and a method's extra fields (`Method.record_fields`: DML's peers, BYOT's
exits) beside them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kd.engine.result import RunResult, TrainingLog

TEACHER = "Teacher"  # the `method` of the teacher's own record
TUNED, DEFAULT = "tuned", "default"  # a tuned experiment's run variants: at the chosen settings, at the defaults


def run_name(method: str, variant: str = "") -> str:
    """A run's name in file and folder names: the method, and its variant in a tuned experiment (KD_default)."""
    return f"{method}_{variant}" if variant else method


@dataclass
class PredictionMetrics:
    """Computed from the val probabilities of the run's best epoch (kd/results/metrics.py)."""
    top5_accuracy: float
    nll: float
    ece: float
    teacher_agreement: float | None  # None for the teacher itself
    per_class_accuracy: list[float]
    confusion_matrix: list[list[int]]
    reliability: dict[str, list]  # per confidence bin: count, confidence, accuracy


@dataclass
class ModelCost:
    """The deployed model's size and speed (measured once per architecture and experiment)."""
    params: int
    flops: int
    latency_ms: float


@dataclass
class TeacherFile:
    """The checkpoint the students learnt from."""
    checkpoint: str
    sha256: str
    reused: bool  # found from an earlier experiment, or the user's own, rather than trained in this one


_PARTS = {"teacher_file": TeacherFile, "result": RunResult, "training": TrainingLog, "metrics": PredictionMetrics,
          "cost": ModelCost}


@dataclass
class RunRecord:
    """One run: a method (or the teacher) with one seed."""
    method: str
    model: str
    teacher: str        # the teacher column: the teacher's model, or "None", "None (mutual)" ...
    seed: int
    status: str = "ok"  # "ok" or "failed"
    protocol: str = "common"  # or "own: lr=0.05" when the method trains its own student settings
    variant: str = ""   # in a tuned experiment: "tuned" (its chosen settings) or "default"
    reason: str | None = None  # why a failed run failed
    teacher_file: TeacherFile | None = None
    result: RunResult | None = None
    training: TrainingLog | None = None
    metrics: PredictionMetrics | None = None
    cost: ModelCost | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # the method's own fields

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fail(self, reason: str) -> None:
        self.status, self.reason = "failed", reason

    def to_json(self) -> dict[str, Any]:
        """The flat dict comparison_results.json stores."""
        flat = {"method": self.method, "model": self.model, "teacher": self.teacher, "seed": self.seed,
                "status": self.status, "protocol": self.protocol}
        if self.variant:
            flat["variant"] = self.variant
        if self.reason is not None:
            flat["reason"] = self.reason
        for name in _PARTS:
            part = getattr(self, name)
            if part is not None:
                flat.update(asdict(part))
        return {**flat, **self.extras}

    @classmethod
    def from_json(cls, flat: dict[str, Any]) -> RunRecord:
        """A stored record; a key of a part that files of older versions lack reads as None."""
        own = {f.name for f in fields(cls)} - {*_PARTS, "extras"}
        parts = {name: part_type(**{f.name: flat.get(f.name) for f in fields(part_type)})
                 for name, part_type in _PARTS.items() if any(f.name in flat for f in fields(part_type))}
        known = own | {f.name for part_type in _PARTS.values() for f in fields(part_type)}
        return cls(**{key: flat[key] for key in own if key in flat}, **parts,
                   extras={key: value for key, value in flat.items() if key not in known})

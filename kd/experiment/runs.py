"""One seed of methods trained: their students built alike, trained together, and their records completed."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kd.engine.evaluation import Evaluation
from kd.engine.result import RunResult
from kd.engine.run import RunFailed, RunSpec
from kd.engine.trainer import fit_together
from kd.experiment.setup import Setup
from kd.methods import METHODS, Distiller
from kd.results.files import ExperimentFolder
from kd.results.metrics import prediction_metrics
from kd.results.record import RunRecord, run_name
from models import ModelSpec
from models.weights import InputStats

log = logging.getLogger("kd")


def file_tag(name: str) -> str:
    """A model name as it appears in file and run names ("timm/resnet10t" -> "timm-resnet10t")."""
    return name.replace("/", "-")


def model_meta(spec: ModelSpec, setup: Setup, stats: InputStats | None = None) -> dict:
    """What a checkpoint says about its model: enough to rebuild the plain library model and to check reuse."""
    data = setup.data
    mean, std = (list(stats.mean), list(stats.std)) if stats is not None else (data.mean, data.std)
    return {"arch": spec.name, "source": spec.source, "builder": spec.builder, "weights": spec.weights,
            "num_classes": len(data.class_names), "class_names": data.class_names, "image_size": data.image_size,
            "stem": spec.stem, "mean": mean, "std": std, "data_fingerprint": data.fingerprint,
            "held_out": data.held_out,
            "torch_version": str(torch.__version__)}


@dataclass
class Teacher:
    """The trained teacher the runs learn from."""
    model: torch.nn.Module
    predictions: torch.Tensor  # its val top-1, for each student's agreement with it


def complete_record(record: RunRecord, result: RunResult, evaluation: Evaluation, setup: Setup,
                    model: torch.nn.Module, teacher_predictions: torch.Tensor | None) -> RunRecord:
    """Add the run's outcome, its best epoch's prediction metrics and the model's cost to a record."""
    record.result = result
    record.metrics = prediction_metrics(evaluation.probs, evaluation.labels, teacher_predictions)
    record.cost = setup.cost(record.model, model)
    return record


def initial_student(setup: Setup, spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """The weights every method of a seed starts from: the student built from the seed (library init or
    starting weights, and a new classifier drawn from the seed)."""
    torch.manual_seed(seed)
    return setup.build(spec).state_dict()


def make_distiller(setup: Setup, method: str, settings: dict, spec: ModelSpec, init_state: dict, seed: int,
                   teacher: Teacher) -> Distiller:
    """A method's Distiller around a student that starts from `init_state`."""
    distiller_cls = METHODS[method].distiller
    student = setup.build(spec, with_weights=False)
    student.load_state_dict(init_state)  # the same starting weights for every method in this seed
    torch.manual_seed(seed + 1)  # extra modules (regressor, heads, peers) also start alike per seed
    return distiller_cls(student, teacher.model if distiller_cls.needs_teacher else None, **settings)


def run_methods(methods: list[str], seed: int, setup: Setup, teacher: Teacher, folder: ExperimentFolder,
                variant: str = "") -> list[RunRecord]:
    """Train one student per method (several in one pass over the data) and return their records.

    Every method of the group starts from the same weights (`initial_student`).
    """
    config = setup.config
    seed_tag = f"_seed{seed}" if len(config["experiment"]["seeds"]) > 1 else ""
    init_state = initial_student(setup, setup.student_settings(methods[0], variant)[2], seed)
    jobs, records = [], []
    for name in methods:
        settings, cfg, spec = setup.student_settings(name, variant)
        distiller_cls, tag, label = METHODS[name].distiller, file_tag(spec.name), run_name(name, variant)
        distiller = make_distiller(setup, name, settings, spec, init_state, seed, teacher)
        run_spec = RunSpec(label, cfg, seed, setup.logs / name / f"{label}_{tag}_Final_{folder.stamp}{seed_tag}",
                           setup.checkpoints / "students" / f"{label}_{tag}{seed_tag}",
                           {**model_meta(spec, setup), "method": name, "seed": seed, "epochs": cfg["epochs"],
                            "config": {**cfg, **settings}}, folder.resume_path(label, seed))
        jobs.append((distiller, run_spec))
        column = setup.teacher_spec.name if distiller_cls.needs_teacher else distiller_cls.teacher_column
        own = setup.own_settings(name)
        records.append(RunRecord(name, spec.name, column, seed, variant=variant,
                                 protocol="own: " + ", ".join(f"{k}={v}" for k, v in own.items()) if own else "common"))
        log.info("Training %s student %s with %s (seed %d)", spec.name, name, settings or "CE only", seed)
    if len(jobs) > 1:
        log.info("%s train together, sharing one teacher forward per batch (--no-share-teacher: one by one)",
                 ", ".join(methods))
    try:
        outcomes = fit_together(jobs, setup.data, setup.runtime)
    finally:
        for distiller, _ in jobs:
            distiller.close()
    for record, (distiller, _), outcome in zip(records, jobs, outcomes):
        if isinstance(outcome, RunFailed):
            log.error("%s failed: %s", record.method, outcome)
            record.fail(str(outcome))
            continue
        result, record.training, best_val = outcome
        complete_record(record, result, best_val, setup, distiller.student, teacher.predictions)
        record.extras = distiller.record_extras(record.training.history, result.best_epoch)
        declared = METHODS[record.method].record_fields
        if record.extras.keys() != declared.keys():  # a method's own mistake: its run fails, the others stand
            record.fail(f"{record.method}'s record_extras gave {sorted(record.extras)}, but its Method declares "
                        f"record_fields {sorted(declared)}")
            log.error("%s failed: %s", record.method, record.reason)
    return records

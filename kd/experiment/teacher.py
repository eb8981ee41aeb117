"""The teacher of an experiment: trained here, reused from an earlier experiment, or the user's own."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kd.engine import distributed
from kd.engine.checkpoint import load_checkpoint
from kd.engine.evaluation import evaluate
from kd.engine.result import RunResult
from kd.engine.run import RunSpec
from kd.engine.trainer import fit
from kd.errors import UserError
from kd.experiment.runs import Teacher, complete_record, file_tag, model_meta
from kd.experiment.setup import Setup
from kd.methods import METHODS, REFERENCE, Distiller
from kd.results.files import ExperimentFolder
from kd.results.record import TEACHER, RunRecord, TeacherFile
from models import num_outputs, set_classifier
from models.builders import state_dict_outputs
from models.weights import InputStats, input_stats, load_state_strictly

log = logging.getLogger("kd")

# What a saved teacher must share with this experiment to be reused (besides its starting weights).
# A teacher trained on all of train/ must not be reused where a share of it is held out to select (tuning).
REUSE_KEYS = ("source", "builder", "weights", "class_names", "image_size", "stem", "held_out")


def teacher_prefix(setup: Setup) -> Path:
    """Where the experiment's teacher is saved, less "_best.pth"/"_final.pth". One trained without a held-out
    share of train/ (tuning without test/) has files of its own, so neither kind of experiment overwrites, or
    reuses, the other's teacher."""
    held_out = "_heldout" if setup.data.held_out else ""
    return setup.checkpoints / "teachers" / f"{file_tag(setup.config['teacher']['model'])}_teacher{held_out}"


def teacher_path(setup: Setup, tag: str = "best") -> Path:
    return Path(f"{teacher_prefix(setup)}_{tag}.pth")


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _start(setup: Setup) -> dict | None:
    """The teacher.checkpoint a teacher starts from, as checkpoint meta records it."""
    path = setup.config["teacher"]["checkpoint"]
    return None if path is None else {"checkpoint": str(path), "sha256": _sha256(path)}


def external_teacher_state(setup: Setup, fine_tune: bool) -> dict[str, torch.Tensor]:
    """The state_dict of teacher.checkpoint for this experiment's teacher, checked: library, architecture,
    input size and classes must fit (one line each), unless fine-tuning replaces its classifier."""
    state, meta = setup.teacher_file
    path, data, spec = setup.config["teacher"]["checkpoint"], setup.data, setup.teacher_spec
    if meta is not None:
        saved = (meta.get("source", spec.source), meta.get("builder", spec.builder))
        if saved != (spec.source, spec.builder):
            name = f"timm/{saved[1]}" if saved[0] == "timm" else saved[1]
            raise UserError(f"teacher checkpoint '{path}' is a {name}, but teacher.model is {spec.name}: set "
                            f"teacher.model to {name}")
        if meta.get("image_size") not in (None, data.image_size):
            raise UserError(f"teacher checkpoint '{path}' was trained at {meta['image_size']} px, this run uses "
                            f"{data.image_size} px: set experiment.image_size to {meta['image_size']}")
    other_classes = meta is not None and meta.get("class_names") not in (None, data.class_names)
    if other_classes and not fine_tune:
        raise UserError(f"teacher checkpoint '{path}' knows the classes {', '.join(meta['class_names'][:6])}"
                        f"{' ...' if len(meta['class_names']) > 6 else ''}, not this data's "
                        f"{', '.join(data.class_names[:6])}: use a teacher of these classes or fine-tune it "
                        "(teacher.epochs > 0)")
    model = setup.build(spec, with_weights=False)
    outputs = state_dict_outputs(state, model)
    if outputs is not None and outputs != len(data.class_names):
        if not fine_tune:
            raise UserError(f"teacher checkpoint '{path}' has {outputs} outputs, this data has "
                            f"{len(data.class_names)} classes: fine-tune it (teacher.epochs > 0) or use a teacher "
                            "of these classes")
        set_classifier(model, outputs)
    load_state_strictly(model, state, f"teacher checkpoint '{path}'", f"teacher.model {spec.name}")
    if meta is None and not fine_tune:
        log.warning("Teacher checkpoint %s has no class names (a plain state_dict): only its number of outputs "
                    "(%d) could be checked against the data's classes", path, num_outputs(model))
    if other_classes or num_outputs(model) != len(data.class_names):
        set_classifier(model, len(data.class_names))  # a new classifier for these classes, drawn from the seed
    return model.state_dict()


def _unchanged(path: str | Path, stored: TeacherFile) -> None:
    if _sha256(path) != stored.sha256:
        raise UserError(f"cannot resume: teacher checkpoint '{path}' changed since the experiment started; start "
                        "a new experiment without --resume")


@dataclass
class TeacherSource:
    """Where the experiment's teacher comes from, decided before anything is written."""
    checkpoint: dict | None = None  # a teacher to use as it is (reused, or the user's own); None: train one
    start: dict | None = None       # the state_dict training starts from (teacher.checkpoint, fine-tuned)


def find_teacher(setup: Setup, resume_records: list[RunRecord] | None = None) -> TeacherSource:
    """The teacher checkpoint to use as it is, or what to train one from; a misfit is a UserError.

    teacher.checkpoint with teacher.epochs = 0 is used as it is (with epochs > 0 it is checked here and
    fine-tuned). Otherwise a teacher counts as finished when its best and final checkpoints come from the
    same run; a resumed experiment keeps its own teacher (the file must be unchanged) or continues training
    it. Checked before anything is written, so a mismatch leaves no half-started experiment behind.
    """
    cfg = setup.config["teacher"]
    stored = next((r.teacher_file for r in resume_records or [] if r.method == TEACHER), None)
    start = external_teacher_state(setup, fine_tune=cfg["epochs"] > 0) if cfg["checkpoint"] else None
    if start is not None and cfg["epochs"] == 0:
        if stored is not None:
            _unchanged(cfg["checkpoint"], stored)
        return TeacherSource({"model": start, "meta": {"epoch": 0, "training_time": 0.0, "epochs": 0},
                              "path": cfg["checkpoint"]})
    best_path = teacher_path(setup)
    if resume_records is not None:
        if stored is None:
            return TeacherSource(start=start)  # the teacher's own training was interrupted: it continues
        checkpoint = load_checkpoint(stored.checkpoint)
        _unchanged(stored.checkpoint, stored)
        return TeacherSource(checkpoint)
    if setup.config["experiment"]["retrain_teacher"] or not best_path.exists():
        return TeacherSource(start=start)
    checkpoint = load_checkpoint(best_path)
    wanted = {**model_meta(setup.teacher_spec, setup), "start": _start(setup)}
    saved = {"source": "torchvision", "builder": str(checkpoint["meta"].get("arch", "")).lower(), "weights": None,
             "start": None, "held_out": None, **checkpoint["meta"]}  # checkpoints from before any-model support name only arch
    for key in (*REUSE_KEYS, "start"):
        if saved.get(key) != wanted[key]:
            raise UserError(f"teacher checkpoint '{best_path}' does not fit this experiment: {key} is "
                            f"{saved.get(key)!r} there but {wanted[key]!r} here; pass --retrain-teacher to train "
                            "a new teacher (it replaces that file)")
    final_path = teacher_path(setup, "final")
    if not final_path.exists() or load_checkpoint(final_path)["meta"].get("run") != checkpoint["meta"].get("run"):
        log.info("Teacher checkpoint %s is from an unfinished training run: training a new teacher", best_path)
        return TeacherSource(start=start)
    return TeacherSource(checkpoint)


class _Renormalize:
    """A forward pre-hook that turns the experiment's normalised images into what the teacher's own weights
    expect (another mean/std), leaving the model itself unmodified."""

    def __init__(self, data_mean: list[float], data_std: list[float], stats: InputStats):
        to_tensor = lambda values: torch.tensor(values).view(1, 3, 1, 1)  # noqa: E731
        self.scale = to_tensor(data_std) / to_tensor(stats.std)
        self.shift = (to_tensor(data_mean) - to_tensor(stats.mean)) / to_tensor(stats.std)

    def __call__(self, _module: nn.Module, inputs: tuple) -> tuple:
        images = inputs[0]
        return (images * self.scale.to(images.device) + self.shift.to(images.device), *inputs[1:])


def build_teacher(setup: Setup, checkpoint: dict | None) -> nn.Module:
    """The teacher model, taking this experiment's normalised images: with `checkpoint`'s weights, or without
    one with its starting weights (to be trained)."""
    spec = setup.teacher_spec
    # what the teacher's weights expect: its starting weights', or a reused checkpoint's own normalisation
    stats = input_stats(spec, checkpoint["meta"]) if checkpoint and "mean" in checkpoint["meta"] else setup.teacher_stats
    with_weights = checkpoint is None and not setup.config["teacher"]["checkpoint"]
    teacher = setup.runtime.place(setup.build(spec, with_weights=with_weights))
    if stats is not None and (list(stats.mean), list(stats.std)) != (setup.data.mean, setup.data.std):
        log.info("The teacher's weights expect mean %s std %s: its input is renormalised", stats.mean, stats.std)
        teacher.register_forward_pre_hook(_Renormalize(setup.data.mean, setup.data.std, stats))
    if checkpoint is not None:
        teacher.load_state_dict(checkpoint["model"])
    return teacher


def obtain_teacher(setup: Setup, source: TeacherSource, folder: ExperimentFolder) -> tuple[Teacher, RunRecord]:
    """Use the source's teacher checkpoint (a reused or the user's own), else train one; return it and its record."""
    cfg, spec = setup.config["teacher"], setup.teacher_spec
    best_path = teacher_path(setup)
    seed = setup.config["experiment"]["seeds"][0]
    checkpoint = source.checkpoint
    path = str(checkpoint.get("path", best_path)) if checkpoint else str(best_path)
    torch.manual_seed(seed)
    teacher = build_teacher(setup, checkpoint)
    trains = checkpoint is None
    if trains:
        if source.start is not None:
            teacher.load_state_dict(source.start)
        log.info("Training teacher %s for %d epochs", spec.name, cfg["epochs"])
        tag = file_tag(spec.name)
        run_spec = RunSpec(TEACHER, cfg, seed, setup.logs / "teachers" / f"{tag}_Teacher_Final_{folder.stamp}",
                           teacher_prefix(setup),
                           {**model_meta(spec, setup, setup.teacher_stats), "config": cfg, "epochs": cfg["epochs"],
                            "run": folder.stamp, "start": _start(setup)}, folder.resume_path(TEACHER, seed))
        result, training, _ = fit(plain_training(teacher), setup.data, run_spec, setup.runtime)
        # distil from the best epoch, exactly as a reuse would; only rank 0 wrote it: data-parallel, the others
        # (maybe on other machines) get it from rank 0
        checkpoint = distributed.broadcast_object(load_checkpoint(best_path) if distributed.is_main() else None)
        teacher.load_state_dict(checkpoint["model"])
    scores = {split: evaluate(plain_training(teacher), setup.data, split, cfg["batch_size"], setup.runtime)
              for split in setup.data.splits if split != "train"}
    if not trains:
        meta, val = checkpoint["meta"], scores["val"].accuracies["student"]
        log.info("%s %s (val accuracy %.4f, epoch %d)%s", "Using your teacher" if "path" in checkpoint
                 else "Reusing teacher", path, val, meta["epoch"],
                 "" if "path" in checkpoint else "; pass --retrain-teacher to train a new one")
        test = scores["test"].accuracies["student"] if "test" in scores else None
        # used as it is: its one checkpoint is both the best and the last epoch, and nothing trained here
        result, training = RunResult(best_accuracy=val, final_accuracy=val, best_epoch=meta["epoch"],
                                     test_accuracy=test, training_time=meta["training_time"],
                                     epochs=meta["epochs"]), None
    # the file is on rank 0's disk: the others take its digest from rank 0
    teacher_file = distributed.broadcast_object(TeacherFile(path, _sha256(path), not trains)
                                                if distributed.is_main() else None)
    record = RunRecord(TEACHER, spec.name, "None", seed, teacher_file=teacher_file, training=training)
    complete_record(record, result, scores["val"], setup, teacher, teacher_predictions=None)
    return Teacher(teacher.eval(), scores["val"].probs.argmax(dim=1)), record


def plain_training(model: nn.Module) -> Distiller:
    """The teacher trained, and evaluated, as the reference method trains its student: cross-entropy alone."""
    return METHODS[REFERENCE].distiller(model)

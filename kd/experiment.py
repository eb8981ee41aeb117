"""The steps of an experiment that final.main strings together: data and device, teacher, one method run."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from kd import METHODS, distributed
from kd.baseline import Baseline
from kd.checkpoint import load_checkpoint
from kd.config import UserError
from kd.batches import ImageData
from kd.data import load_image_data
from kd.metrics import model_cost, prediction_metrics
from kd.runtime import Runtime, resolve_device, resolve_precision
from kd.trainer import Evaluation, RunFailed, RunSpec, evaluate, fit, fit_together
from models import build_resnet, resolve_stem

log = logging.getLogger("kd")


@dataclass
class Setup:
    """What every run of an experiment shares."""
    config: dict          # validated
    data: ImageData
    stem: str
    runtime: Runtime
    logs: Path = Path("logs")
    checkpoints: Path = Path("checkpoints")
    stamp: str = ""       # the experiment folder's timestamp, used in TensorBoard run names
    exp_dir: Path | None = None
    teacher_predictions: torch.Tensor | None = None  # the teacher's val top-1, for agreement

    def __post_init__(self) -> None:
        self._costs: dict[str, dict] = {}

    def resume_path(self, name: str, seed: int) -> Path:
        """Where a run keeps its state between epochs (removed once its record is written)."""
        return self.exp_dir / "resume" / f"{name}_seed{seed}.pt"

    def cost(self, arch: str, model: torch.nn.Module) -> dict:
        """Params, FLOPs and latency of an architecture, measured once per experiment."""
        if arch not in self._costs:
            self._costs[arch] = model_cost(model, self.data.image_size, self.runtime)
        return self._costs[arch]


def prepare(config: dict, decode_all: bool = False) -> Setup:
    """Pick device and precision and check/load the data set for a validated config (`decode_all`:
    read every image once even when the set is too big to keep in memory, as --check does)."""
    exp = config["experiment"]
    device = resolve_device(distributed.init(exp["device"]))
    runtime = Runtime(device, resolve_precision(exp["precision"], device), channels_last=device.type != "mps")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed image and batch sizes: pick the fastest kernels
    data = load_image_data(exp["data_dir"], exp["image_size"], exp["hflip"], exp["cache_max_gb"],
                           exp["num_workers"], exp["skip_bad_images"], decode_all)
    processes = distributed.world_size()
    if data.counts["train"] // processes < 2:  # BatchNorm trains on batches of at least 2 images
        raise UserError(f"the train split has {data.counts['train']} image(s), too few for {processes} "
                        "process(es): each needs at least 2; add images or start fewer processes")
    if data.keep_on(device):
        log.info("Decoded images kept on %s for the whole experiment", device)
    return Setup(config, data, resolve_stem(exp["stem"], data.image_size), runtime,
                 Path(exp["logs_dir"]), Path(exp["checkpoints_dir"]))


def describe_plan(setup: Setup) -> str:
    config, data, exp = setup.config, setup.data, setup.config["experiment"]
    counts = ", ".join(f"{split} {n}" for split, n in data.counts.items())
    return "\n".join([
        f"data: {data.root} - {len(data.class_names)} classes ({', '.join(data.class_names[:12])}"
        f"{', ...' if len(data.class_names) > 12 else ''}); images: {counts}; "
        f"{data.ignored_files} non-image file(s) ignored",
        f"images: {data.image_size}x{data.image_size} px, {setup.stem} stem, "
        f"horizontal flip {'on' if exp['hflip'] else 'off'}",
        f"device: {setup.runtime.device}, precision {setup.runtime.precision}",
        f"teacher: {config['teacher']['model']}, {config['teacher']['epochs']} epochs",
        f"students: {config['student']['model']}, {config['student']['epochs']} epochs, methods "
        f"{', '.join(exp['methods'])}, seeds {', '.join(map(str, exp['seeds']))}",
    ])


def model_meta(arch: str, setup: Setup) -> dict:
    data = setup.data
    return {"arch": arch, "num_classes": len(data.class_names), "class_names": data.class_names,
            "image_size": data.image_size, "stem": setup.stem, "mean": data.mean, "std": data.std,
            "data_fingerprint": data.fingerprint, "torch_version": str(torch.__version__)}


def teacher_path(setup: Setup, tag: str = "best") -> Path:
    return setup.checkpoints / "teachers" / f"{setup.config['teacher']['model']}_teacher_{tag}.pth"


def reusable_teacher(setup: Setup, resume_records: list[dict] | None = None) -> dict | None:
    """The saved teacher checkpoint to reuse, or None to train one; a misfit is a UserError.

    A teacher counts as finished when its best and final checkpoints come from the same run; a resumed
    experiment keeps its own teacher (the file must be unchanged) or continues training it.
    Checked before anything is written, so a mismatch leaves no half-started experiment behind.
    """
    best_path = teacher_path(setup)
    if resume_records is not None:
        stored = next((r for r in resume_records if r["method"] == "Teacher"), None)
        if stored is None:
            return None  # the teacher's own training was interrupted: it continues from its state
        checkpoint = load_checkpoint(stored["checkpoint"])
        if hashlib.sha256(Path(stored["checkpoint"]).read_bytes()).hexdigest() != stored["sha256"]:
            raise UserError(f"cannot resume: teacher checkpoint '{stored['checkpoint']}' changed since the "
                            "experiment started; start a new experiment without --resume")
        return checkpoint
    if setup.config["experiment"]["retrain_teacher"] or not best_path.exists():
        return None
    checkpoint = load_checkpoint(best_path)
    wanted = model_meta(setup.config["teacher"]["model"], setup)
    for key in ("arch", "class_names", "image_size", "stem"):
        if checkpoint["meta"].get(key) != wanted[key]:
            raise UserError(f"teacher checkpoint '{best_path}' does not fit this data: {key} is "
                            f"{checkpoint['meta'].get(key)!r} there but {wanted[key]!r} here; pass "
                            "--retrain-teacher to train a new teacher (it replaces that file)")
    final_path = teacher_path(setup, "final")
    if not final_path.exists() or load_checkpoint(final_path)["meta"].get("run") != checkpoint["meta"].get("run"):
        log.info("Teacher checkpoint %s is from an unfinished training run: training a new teacher", best_path)
        return None
    return checkpoint


def _complete(record: dict, result: dict, evaluation: Evaluation, setup: Setup, model: torch.nn.Module) -> dict:
    """Add the run's results, its best epoch's prediction metrics and the model's cost to a record."""
    record.update(result)
    record.update(prediction_metrics(evaluation.probs, evaluation.labels, setup.teacher_predictions))
    record.update(setup.cost(record["model"], model))
    return record


def obtain_teacher(setup: Setup, checkpoint: dict | None) -> tuple[torch.nn.Module, dict]:
    """Reuse the fitting saved teacher (`checkpoint`), else train one; return it and its record."""
    cfg, arch = setup.config["teacher"], setup.config["teacher"]["model"]
    best_path = teacher_path(setup)
    seed = setup.config["experiment"]["seeds"][0]
    record = {"method": "Teacher", "model": arch, "teacher": "None", "seed": seed, "status": "ok",
              "checkpoint": str(best_path)}
    torch.manual_seed(seed)
    teacher = setup.runtime.place(build_resnet(arch, len(setup.data.class_names), setup.stem,
                                               cfg["zero_init_residual"]))
    if checkpoint is None:
        log.info("Training teacher %s for %d epochs", arch, cfg["epochs"])
        spec = RunSpec("Teacher", cfg, seed, setup.logs / "teachers" / f"{arch}_Teacher_Final_{setup.stamp}",
                       setup.checkpoints / "teachers" / f"{arch}_teacher",
                       {**model_meta(arch, setup), "config": cfg, "epochs": cfg["epochs"], "run": setup.stamp},
                       setup.resume_path("Teacher", seed))
        result, _ = fit(Baseline(teacher), setup.data, spec, setup.runtime)
        record["reused"] = False
        distributed.barrier()  # rank 0 has written the checkpoint the others read now
        checkpoint = load_checkpoint(best_path)  # distil from the best epoch, exactly as a reuse would
    else:
        meta = checkpoint["meta"]
        result = {"best_epoch": meta["epoch"], "training_time": meta["training_time"], "epochs": meta["epochs"]}
        record["reused"] = True
    teacher.load_state_dict(checkpoint["model"])
    scores = {split: evaluate(Baseline(teacher), setup.data, split, cfg["batch_size"], setup.runtime)
              for split in setup.data.splits if split != "train"}
    if record["reused"]:
        log.info("Reusing teacher %s (val accuracy %.4f, epoch %d); pass --retrain-teacher to train a new one",
                 best_path, scores["val"].accuracies["student"], checkpoint["meta"]["epoch"])
        result.update(best_accuracy=scores["val"].accuracies["student"],
                      final_accuracy=scores["val"].accuracies["student"],
                      test_accuracy=scores["test"].accuracies["student"] if "test" in scores else None)
    record["sha256"] = hashlib.sha256(best_path.read_bytes()).hexdigest()
    _complete(record, result, scores["val"], setup, teacher)
    setup.teacher_predictions = scores["val"].probs.argmax(dim=1)
    return teacher.eval(), record


def method_groups(methods: list[str], share_teacher: bool) -> list[list[str]]:
    """The order runs are trained in: with `share_teacher`, all teacher-based methods form one group
    (trained together where the first of them stands), every other method trains alone."""
    teacher_based = [m for m in methods if METHODS[m].needs_teacher] if share_teacher else []
    groups: list[list[str]] = []
    for method in methods:
        if method not in teacher_based:
            groups.append([method])
        elif method == teacher_based[0]:
            groups.append(teacher_based)
    return groups


def run_methods(methods: list[str], seed: int, setup: Setup, teacher: torch.nn.Module, init_state: dict
                ) -> list[dict]:
    """Train one student per method (several in one pass over the data) and return their records."""
    config = setup.config
    cfg, arch = config["student"], config["student"]["model"]
    seed_tag = f"_seed{seed}" if len(config["experiment"]["seeds"]) > 1 else ""
    jobs, records = [], []
    for method in methods:
        settings, distiller_cls = config["methods"][method], METHODS[method]
        student = build_resnet(arch, len(setup.data.class_names), setup.stem, cfg["zero_init_residual"])
        student.load_state_dict(init_state)  # the same starting weights for every method in this seed
        torch.manual_seed(seed + 1)  # extra modules (regressor, heads, peers) also start alike per seed
        distiller = distiller_cls(student, teacher if distiller_cls.needs_teacher else None, **settings)
        spec = RunSpec(method, cfg, seed, setup.logs / method / f"{method}_{arch}_Final_{setup.stamp}{seed_tag}",
                       setup.checkpoints / "students" / f"{method}_{arch}{seed_tag}",
                       {**model_meta(arch, setup), "method": method, "seed": seed, "epochs": cfg["epochs"],
                        "config": {**cfg, **settings}}, setup.resume_path(method, seed))
        jobs.append((distiller, spec))
        column = config["teacher"]["model"] if distiller_cls.needs_teacher else distiller_cls.teacher_column
        records.append({"method": method, "model": arch, "teacher": column, "seed": seed, "status": "ok"})
        log.info("Training %s student %s with %s (seed %d)", arch, method, settings or "CE only", seed)
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
            log.error("%s failed: %s", record["method"], outcome)
            record.update(status="failed", reason=str(outcome))
        else:
            result, best_val = outcome
            _complete(record, result, best_val, setup, distiller.student)
    return records

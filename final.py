"""Knowledge-distillation comparison: a ResNet50 teacher, then ResNet18 students with each method.

Edit the dicts below (or override any key from the command line: `--set student.lr=0.05`), then run
`python final.py` or `python run_experiment.py`. `main(config)` can also be imported and called.
"""
from __future__ import annotations

import copy
import functools
import logging
import sys
import time
from pathlib import Path

import torch

from kd import METHODS
from kd.checkpoint import load_checkpoint
from kd.config import UserError, resolve_method_names, validate_methods, validate_section
from kd.data import ImageData, load_image_data
from kd.report import create_experiment_dir, format_table, setup_logging, write_results
from kd.trainer import RunFailed, RunSpec, Runtime, evaluate, fit, resolve_device, resolve_precision
from kd.baseline import Baseline
from models import build_resnet, resolve_stem

TEACHER_CONFIG = {
    "model": "ResNet50",
    "epochs": 100,
    "lr": 0.1,
    "batch_size": 32,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "scheduler": "step",        # "step": StepLR(step_size, gamma); "onecycle": warm-up then cosine to 0
    "step_size": 30,
    "gamma": 0.1,
    "warmup_epochs": 0,         # linear lr warm-up epochs (both schedulers)
    "zero_init_residual": False,  # torchvision option: each residual branch starts as identity
}

STUDENT_CONFIG = {
    "model": "ResNet18",
    "epochs": 50,
    "lr": 0.01,
    "batch_size": 32,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "scheduler": "step",
    "step_size": 30,
    "gamma": 0.1,
    "warmup_epochs": 0,
    "zero_init_residual": False,
}

# Each method's loss settings; defaults from the papers / reference code (see README and METHOD_SPEC).
METHODS_CONFIG = {
    "Baseline": {},
    "KD": {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
    "AT": {"p": 2.0, "ce_weight": 1.0, "beta": 1000.0},
    "FitNets": {"hint_layer": "layer2", "ce_weight": 1.0, "beta": 100.0, "two_stage": False,
                "hint_epochs": None},  # None: 10% of the epochs (at least 1) when two_stage is on
    "DML": {"num_peers": 2, "kl_weight": 1.0, "temperature": 1.0},
    "BYOT": {"alpha": 0.1, "temperature": 3.0, "feat_weight": 1e-6},
}

EXPERIMENT_CONFIG = {
    "data_dir": "data",           # data/train/<class>/*, data/val/<class>/*, optional data/test/<class>/*
    "methods": ["Baseline", "KD", "AT", "FitNets", "DML", "BYOT"],
    "seeds": [0],
    "device": "auto",             # auto | cpu | cuda | cuda:N | mps
    "precision": "auto",          # auto | fp32 | bf16 | fp16
    "image_size": "auto",         # "auto" (typical shorter side of the images, 8..224) or pixels
    "stem": "auto",               # auto (cifar when image_size <= 64) | cifar | imagenet
    "hflip": True,                # random horizontal flips (off for digits and text)
    "cache_max_gb": 4.0,          # decode images into memory when they fit, else stream from disk
    "num_workers": 2,             # DataLoader workers when streaming
    "logs_dir": "logs",
    "checkpoints_dir": "checkpoints",
    "retrain_teacher": False,     # train a new teacher even if a fitting checkpoint exists
    "skip_bad_images": False,     # warn about unreadable images and go on without them
}

# `--demo`: scikit-learn's digits, small enough for a 2-core CPU, through the very same code path.
# Measured on that CPU: with the seed's constant lr 0.1 a ResNet50 diverges on 1,078 tiny images; with
# zero-initialised residual branches and a warm-up + cosine ("onecycle") schedule peaking at lr 0.05 it
# reaches 0.96 val accuracy in 5 epochs. 12 px (not the digits' native 8 px) keeps layer4 at 2x2, where
# BatchNorm statistics are stable; at 1x1 the teacher's gradients explode.
DEMO_PRESET = {
    "teacher": {"epochs": 6, "lr": 0.05, "scheduler": "onecycle", "warmup_epochs": 1, "zero_init_residual": True},
    "student": {"epochs": 4, "scheduler": "onecycle"},
    "experiment": {"data_dir": "data/digits", "hflip": False, "image_size": 12},
}

log = logging.getLogger("kd")


def default_config(demo: bool = False) -> dict:
    """A deep copy of the dicts above (with the demo preset applied when asked)."""
    config = copy.deepcopy({"teacher": TEACHER_CONFIG, "student": STUDENT_CONFIG,
                            "methods": METHODS_CONFIG, "experiment": EXPERIMENT_CONFIG})
    if demo:
        for section, overrides in DEMO_PRESET.items():
            config[section].update(overrides)
    return config


def create_teacher_config(**overrides) -> dict:
    return validate_section("teacher", {**TEACHER_CONFIG, **overrides})


def create_student_config(**overrides) -> dict:
    return validate_section("student", {**STUDENT_CONFIG, **overrides})


def create_experiment_config(**overrides) -> dict:
    return validate_section("experiment", {**EXPERIMENT_CONFIG, **overrides})


def create_method_config(method: str, **overrides) -> dict:
    """Validated loss settings of one method, e.g. create_method_config("KD", temperature=2.0)."""
    settings = {**METHODS_CONFIG[method], **overrides}
    return validate_methods({**METHODS_CONFIG, method: settings}, METHODS)[method]


create_baseline_config = functools.partial(create_method_config, "Baseline")
create_kd_config = functools.partial(create_method_config, "KD")
create_at_config = functools.partial(create_method_config, "AT")
create_fitnets_config = functools.partial(create_method_config, "FitNets")
create_dml_config = functools.partial(create_method_config, "DML")
create_byot_config = functools.partial(create_method_config, "BYOT")


def validate_config(config: dict) -> dict:
    """Check every section and key; return a validated copy with method names resolved."""
    expected = ["teacher", "student", "methods", "experiment"]
    unknown = [s for s in config if s not in expected]
    if unknown or len(config) != len(expected):
        raise UserError(f"config sections must be {', '.join(expected)} (got {', '.join(config)})")
    checked = {section: validate_section(section, config[section])
               for section in ("teacher", "student", "experiment")}
    checked["methods"] = validate_methods(config["methods"], METHODS)
    checked["experiment"]["methods"] = resolve_method_names(checked["experiment"]["methods"], METHODS)
    return checked


def _model_meta(arch: str, data: ImageData, stem: str) -> dict:
    return {"arch": arch, "num_classes": len(data.class_names), "class_names": data.class_names,
            "image_size": data.image_size, "stem": stem, "mean": data.mean, "std": data.std,
            "data_fingerprint": data.fingerprint, "torch_version": str(torch.__version__)}


def teacher_prefix(config: dict) -> Path:
    arch = config["teacher"]["model"]
    return Path(config["experiment"]["checkpoints_dir"]) / "teachers" / f"{arch}_teacher"


def reusable_teacher(config: dict, data: ImageData, stem: str) -> dict | None:
    """The saved teacher checkpoint if one exists and fits this data; a misfit is a UserError.

    Checked before anything is written, so a mismatch leaves no half-started experiment behind.
    """
    best_path = Path(f"{teacher_prefix(config)}_best.pth")
    if config["experiment"]["retrain_teacher"] or not best_path.exists():
        return None
    checkpoint = load_checkpoint(best_path)
    wanted = _model_meta(config["teacher"]["model"], data, stem)
    for key in ("arch", "class_names", "image_size", "stem"):
        if checkpoint["meta"].get(key) != wanted[key]:
            raise UserError(f"teacher checkpoint '{best_path}' does not fit this data: {key} is "
                            f"{checkpoint['meta'].get(key)!r} there but {wanted[key]!r} here; pass "
                            "--retrain-teacher to train a new teacher (it replaces that file)")
    return checkpoint


def obtain_teacher(config: dict, data: ImageData, stem: str, runtime: Runtime, paths: dict,
                   checkpoint: dict | None) -> tuple[torch.nn.Module, dict]:
    """Reuse the fitting saved teacher (`checkpoint`), else train one; return it and its record."""
    cfg, arch = config["teacher"], config["teacher"]["model"]
    prefix = teacher_prefix(config)
    best_path = Path(f"{prefix}_best.pth")
    record = {"method": "Teacher", "model": arch, "teacher": "None", "seed": config["experiment"]["seeds"][0],
              "status": "ok", "checkpoint": str(best_path)}
    torch.manual_seed(record["seed"])
    teacher = runtime.place(build_resnet(arch, len(data.class_names), stem, cfg["zero_init_residual"]))
    if checkpoint is not None:
        teacher.load_state_dict(checkpoint["model"])
        meta = checkpoint["meta"]
        scores = {split: evaluate(Baseline(teacher), data, split, cfg["batch_size"], runtime)["student"]
                  for split in data.splits if split != "train"}
        log.info("Reusing teacher %s (val accuracy %.4f, epoch %d); pass --retrain-teacher to train a new one",
                 best_path, scores["val"], meta["epoch"])
        record.update(best_accuracy=scores["val"], final_accuracy=scores["val"], best_epoch=meta["epoch"],
                      training_time=meta["training_time"], epochs=meta["epochs"],
                      test_accuracy=scores.get("test"), reused=True)
        return teacher.eval(), record
    log.info("Training teacher %s for %d epochs", arch, cfg["epochs"])
    spec = RunSpec("Teacher", cfg, record["seed"],
                   paths["logs"] / "teachers" / f"{arch}_Teacher_Final_{paths['stamp']}", prefix,
                   {**_model_meta(arch, data, stem), "config": cfg, "epochs": cfg["epochs"]})
    record.update(fit(Baseline(teacher), data, spec, runtime), reused=False)
    teacher.load_state_dict(load_checkpoint(best_path)["model"])  # distil from the best epoch, like a reuse
    return teacher.eval(), record


def run_method(method: str, seed: int, config: dict, data: ImageData, stem: str, teacher: torch.nn.Module,
               init_state: dict, runtime: Runtime, paths: dict) -> dict:
    """Train one ResNet student with one method and return its results record."""
    cfg, arch = config["student"], config["student"]["model"]
    distiller_cls = METHODS[method]
    student = build_resnet(arch, len(data.class_names), stem, cfg["zero_init_residual"])
    student.load_state_dict(init_state)  # the same starting weights for every method in this seed
    torch.manual_seed(seed + 1)  # extra modules (regressor, heads, peers) also start alike per seed
    distiller = distiller_cls(student, teacher if distiller_cls.needs_teacher else None,
                              **config["methods"][method])
    seed_tag = f"_seed{seed}" if len(config["experiment"]["seeds"]) > 1 else ""
    spec = RunSpec(method, cfg, seed,
                   paths["logs"] / method / f"{method}_{arch}_Final_{paths['stamp']}{seed_tag}",
                   paths["checkpoints"] / "students" / f"{method}_{arch}{seed_tag}",
                   {**_model_meta(arch, data, stem), "method": method, "seed": seed, "epochs": cfg["epochs"],
                    "config": {**cfg, **config["methods"][method]}})
    teacher_column = config["teacher"]["model"] if distiller_cls.needs_teacher else distiller_cls.teacher_column
    record = {"method": method, "model": arch, "teacher": teacher_column, "seed": seed, "status": "ok"}
    log.info("Training %s student %s with %s (seed %d)", arch, method, config["methods"][method] or "CE only", seed)
    try:
        record.update(fit(distiller, data, spec, runtime))
    except RunFailed as failure:
        log.error("%s failed: %s", method, failure)
        record.update(status="failed", reason=str(failure))
    finally:
        distiller.close()
    return record


def prepare(config: dict) -> tuple[dict, ImageData, str, Runtime]:
    """Validate the config, pick device and precision, and check/load the data set."""
    config = validate_config(config)
    exp = config["experiment"]
    device = resolve_device(exp["device"])
    runtime = Runtime(device, resolve_precision(exp["precision"], device), channels_last=device.type != "mps")
    data = load_image_data(exp["data_dir"], exp["image_size"], exp["hflip"], exp["cache_max_gb"],
                           exp["num_workers"], exp["skip_bad_images"])
    return config, data, resolve_stem(exp["stem"], data.image_size), runtime


def describe_plan(config: dict, data: ImageData, stem: str, runtime: Runtime) -> str:
    exp = config["experiment"]
    counts = ", ".join(f"{split} {n}" for split, n in data.counts.items())
    return "\n".join([
        f"data: {data.root} - {len(data.class_names)} classes ({', '.join(data.class_names[:12])}"
        f"{', ...' if len(data.class_names) > 12 else ''}); images: {counts}; "
        f"{data.ignored_files} non-image file(s) ignored",
        f"images: {data.image_size}x{data.image_size} px, {stem} stem, "
        f"horizontal flip {'on' if exp['hflip'] else 'off'}",
        f"device: {runtime.device}, precision {runtime.precision}",
        f"teacher: {config['teacher']['model']}, {config['teacher']['epochs']} epochs",
        f"students: {config['student']['model']}, {config['student']['epochs']} epochs, methods "
        f"{', '.join(exp['methods'])}, seeds {', '.join(map(str, exp['seeds']))}",
    ])


def main(config: dict | None = None, check_only: bool = False) -> list[dict]:
    """Run the whole experiment (teacher, then every method x seed) and return its records."""
    setup_logging()
    config, data, stem, runtime = prepare(config if config is not None else default_config())
    exp = config["experiment"]
    print(describe_plan(config, data, stem, runtime))
    saved_teacher = reusable_teacher(config, data, stem)
    if check_only:
        print("check passed: data and config are valid; nothing was trained")
        return []
    exp_dir, stamp = create_experiment_dir(Path(exp["logs_dir"]))
    setup_logging(exp_dir / "final_experiment.log")
    log.info("Experiment folder: %s", exp_dir)
    paths = {"logs": Path(exp["logs_dir"]), "checkpoints": Path(exp["checkpoints_dir"]), "stamp": stamp}
    summary = {"config": config, "experiment_dir": str(exp_dir), "environment": {
                   "device": str(runtime.device), "precision": runtime.precision},
               "data": {"root": str(data.root), "classes": data.class_names, "counts": data.counts,
                        "image_size": data.image_size, "stem": stem}}
    started = time.perf_counter()
    teacher, teacher_record = obtain_teacher(config, data, stem, runtime, paths, saved_teacher)
    records = [teacher_record]
    summary["teacher"] = {k: teacher_record[k] for k in ("checkpoint", "best_accuracy", "reused")}
    write_results(exp_dir, records, summary)
    for seed in exp["seeds"]:
        torch.manual_seed(seed)
        init_state = build_resnet(config["student"]["model"], len(data.class_names), stem,
                                  config["student"]["zero_init_residual"]).state_dict()
        for method in exp["methods"]:
            records.append(run_method(method, seed, config, data, stem, teacher, init_state, runtime, paths))
            write_results(exp_dir, records, summary)  # an interrupted experiment still shows its finished runs
    summary["total_time"] = time.perf_counter() - started
    table = write_results(exp_dir, records, summary)
    print(format_table(table))
    log.info("Total time %.1f s; results in %s", summary["total_time"], exp_dir)
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        log.error("%d run(s) failed: %s", len(failed), "; ".join(f"{r['method']} seed {r['seed']}: {r['reason']}"
                                                                  for r in failed))
    return records


if __name__ == "__main__":
    from run_experiment import cli
    sys.exit(cli())

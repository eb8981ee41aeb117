"""Knowledge-distillation comparison: a teacher (ResNet50 by default), then students (ResNet18) with each method.

Edit the dicts below (or override any key from the command line: `--set student.lr=0.05`), then run
`python final.py` or `python run_experiment.py`. `main(config)` can also be imported and called.
"""
from __future__ import annotations

import copy
import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

from kd import METHODS, distributed
from kd.config import UserError, resolve_method_names, validate_methods, validate_section
from kd.estimate import describe_estimate, estimate_seconds, time_steps
from kd.experiment import Setup, describe_plan, groups_to_train, prepare, run_methods
from kd.sweep import Unit, describe_spread, device_text, queue, stop_on_sigterm, train_spread
from kd.report import create_experiment_dir, experiment_summary, format_table, setup_logging, write_results
from kd.resume import first_difference, kept_precision
from kd.teacher import obtain_teacher, reusable_teacher
from models import ModelError, resolve_name

TEACHER_CONFIG = {
    "model": "ResNet50",        # any torchvision model (resnet50, convnext_tiny ...) or timm/<name>; see README
    "weights": None,            # None: from scratch; "DEFAULT"/"IMAGENET1K_V2"...; True (timm); or a file path
    "checkpoint": None,         # your own teacher (a checkpoint or state_dict); with epochs 0 used as it is
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
    "weights": None,
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

# Each method's loss settings; defaults from the papers / reference code (see README, "Methods"). An entry
# may also set any STUDENT_CONFIG key (model, epochs, lr ...): that method then trains its own student,
# outside the common protocol (reported as such, without a p-value).
METHODS_CONFIG = {
    "Baseline": {},
    "KD": {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "standardize": False},
    "AT": {"p": 2.0, "ce_weight": 1.0, "beta": 1000.0},
    "FitNets": {"hint_layer": 2, "ce_weight": 1.0, "beta": 100.0, "two_stage": False,
                "hint_epochs": None},  # None: 10% of the epochs (at least 1) when two_stage is on
    "DML": {"num_peers": 2, "kl_weight": 1.0, "temperature": 1.0},
    "BYOT": {"alpha": 0.1, "temperature": 3.0, "feat_weight": 1e-6},
    # the methods of 2018-2024; `--methods all` runs them too (mdistiller, RepDistiller, DIST_KD and the
    # logit-standardization repository's CIFAR-100 settings)
    "DKD": {"ce_weight": 1.0, "tckd_weight": 1.0, "nckd_weight": 8.0, "temperature": 4.0, "warmup_epochs": 20,
            "standardize": False},
    "DIST": {"ce_weight": 1.0, "beta": 2.0, "gamma": 2.0, "temperature": 4.0},
    "CRD": {"ce_weight": 1.0, "kd_weight": 0.0, "temperature": 4.0, "beta": 0.8, "feat_dim": 128, "nce_k": 16384,
            "nce_t": 0.07, "nce_m": 0.5},
    "ReviewKD": {"ce_weight": 1.0, "beta": 5.0, "warmup_epochs": 20},
    "RKD": {"ce_weight": 1.0, "beta": 1.0, "distance_weight": 25.0, "angle_weight": 50.0},
    "SP": {"ce_weight": 1.0, "beta": 3000.0},
    "PKT": {"ce_weight": 1.0, "beta": 30000.0},
    "KD_LS": {"temperature": 2.0, "ce_weight": 0.1, "kd_weight": 9.0, "standardize": True},
    "DKD_LS": {"ce_weight": 1.0, "tckd_weight": 9.0, "nckd_weight": 72.0, "temperature": 2.0, "warmup_epochs": 20,
               "standardize": True},
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
    "share_teacher": True,        # train the teacher-based methods together, one teacher forward per batch
    "parallel": "data",           # under torchrun: "data" (DDP: each run over all processes) | "runs" (whole
                                  # runs per process, from a queue; see README, "Performance")
}

# `--demo`: scikit-learn's digits, small enough for a 2-core CPU, through the very same code path.
# Measured on that CPU: with the seed's constant lr 0.1 a ResNet50 diverges on 1,078 tiny images; with
# zero-initialised residual branches and a warm-up + cosine ("onecycle") schedule peaking at lr 0.05 it
# reaches 0.96 val accuracy in 5 epochs. 12 px (not the digits' native 8 px) keeps layer4 at 2x2, where
# BatchNorm statistics are stable; at 1x1 the teacher's gradients explode.
# AT's loss is a mean over attention-map positions, so it grows as maps shrink: beta=1000 was set for
# CIFAR's 32 px; at 12 px the same strength is 1000 * (12/32)^2 ~ 140 (with 1000: 0.70 val after 4 epochs).
DEMO_PRESET = {
    "teacher": {"epochs": 6, "lr": 0.05, "scheduler": "onecycle", "warmup_epochs": 1, "zero_init_residual": True},
    "student": {"epochs": 4, "scheduler": "onecycle"},
    "methods": {"AT": {"beta": 140.0}},
    "experiment": {"data_dir": "data/digits", "hflip": False, "image_size": 12},
}

log = logging.getLogger("kd")


def default_config(demo: bool = False) -> dict:
    """A deep copy of the dicts above (with the demo preset applied when asked)."""
    config = copy.deepcopy({"teacher": TEACHER_CONFIG, "student": STUDENT_CONFIG,
                            "methods": METHODS_CONFIG, "experiment": EXPERIMENT_CONFIG})
    if demo:
        for section, overrides in DEMO_PRESET.items():
            if section == "methods":  # per-method settings: change only the keys the preset names
                for method, settings in overrides.items():
                    config["methods"][method].update(settings)
            else:
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
    models = [checked["teacher"]["model"], checked["student"]["model"],
              *(settings["model"] for settings in checked["methods"].values() if "model" in settings)]
    for name in models:
        try:
            resolve_name(name)
        except ModelError as err:
            raise UserError(str(err)) from None
    return checked


def main(config: dict | None = None, check_only: bool = False, resume: tuple[Path, list, dict] | None = None
         ) -> list[dict]:
    """Run the whole experiment (teacher, then every method x seed) and return its records.

    `resume` = (folder, records, summary) of an unfinished experiment (kd.resume.find_unfinished): its
    finished runs are kept, an interrupted run continues from its last epoch.
    """
    setup_logging()
    setup = prepare(validate_config(config if config is not None else default_config()), decode_all=check_only)
    config = setup.config
    if resume is not None:
        exp_dir, records, summary = resume
        difference = first_difference(summary["config"], config)
        if summary["data"]["fingerprint"] != setup.data.fingerprint:
            difference = f"the images in {setup.data.root} changed"
        if difference:
            raise UserError(f"cannot resume {exp_dir}: {difference}; resume with the same settings or start "
                            "a new experiment without --resume")
        records = [r for r in records if r["status"] == "ok"]  # failed runs are tried again
        setup.stamp = summary["stamp"]
        setup.runtime = kept_precision(setup.runtime, summary["environment"]["precision"], exp_dir)
    if distributed.is_main():
        print(describe_plan(setup))
    spread = distributed.spreads_runs()
    # spread over processes, only rank 0 looks for a saved teacher: the others get it from rank 0, and
    # on other machines the file need not exist
    saved_teacher = (reusable_teacher(setup, resume_records=records if resume else None)
                     if distributed.is_main() or not spread else None)
    # timed steps for the estimate (--check) and the queue of --parallel runs, on rank 0
    timed = distributed.is_main() and (check_only or spread)
    times = time_steps(setup, train_teacher=saved_teacher is None) if timed else None
    if spread:
        units = queue(setup, records if resume else [], times)
        devices = distributed.gather_objects(device_text(setup.runtime.device))
        if distributed.is_main():  # also when training: the queue and its estimate are part of the plan
            print(describe_spread(setup, units, times, devices))
    if check_only:
        if distributed.is_main() and not spread:
            print(describe_estimate(estimate_seconds(setup, times), setup))
        print("check passed: data and config are valid; nothing was trained")
        return []
    setup.planned()
    if resume is None:
        exp_dir, setup.stamp = create_experiment_dir(setup.logs)
        records, summary = [], experiment_summary(setup, exp_dir)
        write_results(exp_dir, records, summary)  # from now on the experiment can be resumed
    setup.exp_dir = exp_dir
    setup_logging(exp_dir / "final_experiment.log")
    log.info("Experiment folder: %s%s", exp_dir, " (resumed)" if resume else "")
    started = time.perf_counter() - summary.get("total_time", 0.0)
    resume_hint = f"Finished runs are saved; continue with: python run_experiment.py --resume {exp_dir}"

    def teacher_done(teacher_record: dict) -> None:
        if not records:
            records.append(teacher_record)
            summary["teacher"] = {"path": teacher_record["checkpoint"], "sha256": teacher_record["sha256"],
                                  "accuracy": teacher_record["best_accuracy"], "reused": teacher_record["reused"]}
        _finish_run(setup, records, summary, ["Teacher"], records[0]["seed"], started)

    def unit_done(unit: Unit, unit_records: list[dict], process: int) -> None:
        log.info("%s finished on process %d: %s", unit, process,
                 ", ".join(f"{r['method']} {r['status']}" for r in unit_records))
        records.extend(unit_records)
        _finish_run(setup, records, summary, [], unit.seed, started)

    try:
        if spread:
            stop_on_sigterm()
            train_spread(setup, saved_teacher, units, resume_hint, teacher_done, unit_done)
            if not distributed.is_main():
                return records  # rank 0 writes the results
        else:
            teacher, teacher_record = obtain_teacher(setup, saved_teacher)
            teacher_done(teacher_record)
            for seed, group in groups_to_train(setup, records):  # runs finished before an interruption are kept
                records.extend(run_methods(group, seed, setup, teacher))
                _finish_run(setup, records, summary, group, seed, started)
    except KeyboardInterrupt:
        log.error("Interrupted. %s", resume_hint)
        raise
    summary["finished"] = True
    leftover = exp_dir / "resume"
    if distributed.is_main() and leftover.is_dir() and not any(leftover.iterdir()):
        leftover.rmdir()  # every run finished: nothing left to resume
    table = write_results(exp_dir, records, summary, final=True)
    if distributed.is_main():
        print(format_table(table))
    log.info("Total time %.1f s; results in %s", summary["total_time"], exp_dir)
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        log.error("%d run(s) failed: %s", len(failed), "; ".join(f"{r['method']} seed {r['seed']}: {r['reason']}"
                                                                  for r in failed))
    return records


def _plan_order(setup: Setup) -> Callable[[dict], int]:
    """Sort key of records: the teacher, then seed by seed the methods in training order."""
    order = {(method, seed): i for i, (seed, method) in enumerate(
        (seed, method) for seed, group in groups_to_train(setup) for method in group)}
    return lambda record: -1 if record["method"] == "Teacher" else order[(record["method"], record["seed"])]


def _finish_run(setup: Setup, records: list[dict], summary: dict, names: list[str], seed: int, started: float) -> None:
    """Rewrite the comparison files (an interrupted experiment shows its finished runs), then drop the
    runs' resume state: from here on they count as finished."""
    summary["total_time"] = time.perf_counter() - started
    # in plan order, however the runs were spread over processes or interrupted and resumed
    records.sort(key=_plan_order(setup))
    write_results(setup.exp_dir, records, summary)
    for name in names:
        setup.resume_path(name, seed).unlink(missing_ok=True)


if __name__ == "__main__":
    # `python final.py` is `python run_experiment.py` without flags: the command line lives there, and it
    # imports this file for the dicts above (an exec, not an import, keeps the two free of a cycle)
    if len(sys.argv) > 1:
        sys.stderr.write("error: final.py runs the dicts above as they are and takes no flags; "
                         f"use python run_experiment.py {' '.join(sys.argv[1:])}\n")
        sys.exit(2)
    os.execv(sys.executable, [sys.executable, str(Path(__file__).with_name("run_experiment.py"))])

"""Knowledge-distillation comparison: a teacher (ResNet50 by default), then students (ResNet18) with each method.

Edit the dicts below (or override any key from the command line: `--set student.lr=0.05`), then run
`python final.py` or `python run_experiment.py`. `main(config)` can also be imported and called.
"""
from __future__ import annotations

import copy
import functools
import os
import sys
from pathlib import Path
from typing import Callable

from kd.errors import UserError
from kd.experiment.config import resolve_method_names, validate_methods, validate_section
from kd.experiment.logs import setup_logging
from kd.experiment.phases import check_resume, finish, make_plan, report_check, start, train
from kd.experiment.setup import prepare
from kd.methods import METHODS
from kd.results.record import RunRecord
from kd.tuning.spaces import check_tuning, final_seeds
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
    # warmup_epochs None: the references' 20 of 240 epochs as the same share of this run (4 of 50; at least 1)
    "DKD": {"ce_weight": 1.0, "tckd_weight": 1.0, "nckd_weight": 8.0, "temperature": 4.0, "warmup_epochs": None,
            "standardize": False},
    "DIST": {"ce_weight": 1.0, "beta": 2.0, "gamma": 2.0, "temperature": 4.0},
    "CRD": {"ce_weight": 1.0, "kd_weight": 0.0, "temperature": 4.0, "beta": 0.8, "feat_dim": 128, "nce_k": 16384,
            "nce_t": 0.07, "nce_m": 0.5},
    "ReviewKD": {"ce_weight": 1.0, "beta": 5.0, "warmup_epochs": None},
    "RKD": {"ce_weight": 1.0, "beta": 1.0, "distance_weight": 25.0, "angle_weight": 50.0},
    "SP": {"ce_weight": 1.0, "beta": 3000.0},
    "PKT": {"ce_weight": 1.0, "beta": 30000.0},
    "KD_LS": {"temperature": 2.0, "ce_weight": 0.1, "kd_weight": 9.0, "standardize": True},
    "DKD_LS": {"ce_weight": 1.0, "tckd_weight": 9.0, "nckd_weight": 72.0, "temperature": 2.0, "warmup_epochs": None,
               "standardize": True},
    # 2023-2024 (each method's file cites the authors' files these come from)
    "WTTM": {"gamma": 0.2, "ce_weight": 1.0, "wttm_weight": 4.0},
    # reversal_epochs None: the CTKD authors' 10 of 240 epochs as the same share of this run
    "CTKD": {"ce_weight": 0.1, "kd_weight": 0.9, "standardize": False, "temperature_min": 1.0,
             "temperature_span": 20.0, "reversal_max": 1.0, "reversal_epochs": None},
    "CTKD_DKD": {"ce_weight": 1.0, "tckd_weight": 1.0, "nckd_weight": 8.0, "warmup_epochs": None, "standardize": False,
                 "temperature_min": 1.0, "temperature_span": 20.0, "reversal_max": 1.0, "reversal_epochs": None},
    "NormKD": {"t_norm": 2.0, "ce_weight": 0.1, "kd_weight": 0.9},
    "MLKD": {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},  # trains on a weak and a strong view
    # the OFA-KD authors' train.py defaults and README.md's CIFAR-100 eps; stages None: all the student's stages
    "OFA": {"ce_weight": 1.0, "kd_weight": 1.0, "ofa_weight": 1.0, "eps": 1.0, "temperature": 1.0, "stages": None},
}

EXPERIMENT_CONFIG = {
    "data_dir": "data",           # data/train/<class>/*, data/val/<class>/*, optional data/test/<class>/*; or
                                  # cifar100:DIR / cifar10:DIR (torchvision's files, downloaded there if online)
    "methods": ["Baseline", "KD", "AT", "FitNets", "DML", "BYOT"],
    "seeds": [0],
    "device": "auto",             # auto | cpu | cuda | cuda:N | mps
    "precision": "auto",          # auto | fp32 | bf16 | fp16
    "image_size": "auto",         # "auto" (typical shorter side of the images, 16..224) or pixels (8..1024)
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
    "tune": False,                # tune the recipe, then every method's settings, on the selection split
                                  # (TUNE_CONFIG below, README "Tuning"); seeds then come from tune.final_seeds
    "cifar_val_images": 5000,     # CIFAR: training images held out (stratified, seed 0) as val; test/ reports
    "preset": None,               # "cifar100" under --preset cifar100: the plan then shows the pair's settings
    "compile": "auto",            # the training step through torch.compile (CUDA graphs on a GPU); auto: where
                                  # measured to gain, which is nowhere yet (bench/gpu_check.sh measures it)
}

# `--tune` (README, "Tuning"): every method gets the same number of Optuna trials, scored on the selection
# split; then every method trains at its chosen settings and at its defaults with fresh seeds, and is
# reported on a split that tuning never reads.
TUNE_CONFIG = {
    "trials": 8,                  # trials per method, and for the common recipe (the paper default is trial 0)
    "final_seeds": 3,             # fresh seeds for the final runs: the first ones that are not trial_seed
    "trial_seed": 0,              # the seed every trial trains with: each setting tried starts alike
    "recipe": True,               # stage 1: tune the student's lr and weight decay on Baseline, then every method
                                  # trains with them; False: keep student.lr and student.weight_decay
    "lr_range": [0.001, 0.3],     # stage 1's ranges, both on a log scale
    "weight_decay_range": [1e-5, 0.01],
    "spaces": {},                 # replace or add a method's search range: {"KD": {"temperature": [1, 10]}},
                                  # [low, high, "log"] for a log scale; each method declares its own in its file
    "pruner": "successive_halving",  # stop poor trials early on their per-epoch val accuracy, or "none"
    "pruner_min_epochs": 1,       # successive halving's first rung, in epochs ...
    "pruner_reduction": 3,        # ... and 1 in this many trials goes on at each rung
    "sampler_seed": 0,            # Optuna's TPE sampler
    "storage": None,              # None: a journal file in the experiment folder (one machine, any number of
                                  # processes); or a database URL for several machines: postgresql://user@host/db
    "holdout_fraction": 0.15,     # without test/: this stratified share of train/ selects, and val/ reports
    "holdout_seed": 0,
}

# `--demo`: scikit-learn's digits, small enough for a 2-core CPU, through the very same code path.
# Measured on that CPU: with the seed's constant lr 0.1 a ResNet50 diverges on 1,078 tiny images; with
# zero-initialised residual branches and a warm-up + cosine ("onecycle") schedule peaking at lr 0.05 it
# reaches 0.96 val accuracy in 5 epochs. 12 px (not the digits' native 8 px) keeps layer4 at 2x2, where
# BatchNorm statistics are stable; at 1x1 the teacher's gradients explode.
# AT's loss is a mean over attention-map positions, so it grows as maps shrink: beta=1000 was set for
# CIFAR's 32 px; at 12 px the same strength is 1000 * (12/32)^2 ~ 140 (with 1000: 0.70 val after 4 epochs).
# The CIFAR-100 weights of DKD's non-target term (β 8) and of WTTM's and NormKD's losses are too strong for 10
# classes in 4 epochs: measured on the digits (Zen 5, seed 0), DKD 0.14 val accuracy, CTKD_DKD 0.85, WTTM 0.54,
# NormKD 0.87; with β 2 (the tables' value for their small pairs), WTTM's weight 1 and NormKD's 0.5: 0.98, 0.99,
# 0.98 and 0.94. MLKD sums ten KD terms (five temperatures, two views): at kd_weight 0.9 its student collapsed to
# 0.18 (bf16 and fp32 alike), at 0.2 it reached 0.97.
DEMO_PRESET = {
    "teacher": {"epochs": 6, "lr": 0.05, "scheduler": "onecycle", "warmup_epochs": 1, "zero_init_residual": True},
    "student": {"epochs": 4, "scheduler": "onecycle"},
    "methods": {"AT": {"beta": 140.0}, "DKD": {"nckd_weight": 2.0}, "CTKD_DKD": {"nckd_weight": 2.0},
                "WTTM": {"wttm_weight": 1.0}, "NormKD": {"kd_weight": 0.5}, "MLKD": {"kd_weight": 0.2}},
    "experiment": {"data_dir": "data/digits", "hflip": False, "image_size": 12},
    # --demo --tune: 3 trials a study and 2 final seeds keep it near the plain demo's time; in 4 epochs the
    # first one (the one-cycle warm-up) says little, so the pruner first compares trials after 2
    "tune": {"trials": 3, "final_seeds": 2, "pruner_min_epochs": 2},
}


# `--preset cifar100`: the recipe of the published CIFAR-100 tables (RepDistiller's train_student.py, mdistiller's
# configs/cifar100/*.yaml): SGD at lr 0.05 (0.01 for MobileNetV2 and ShuffleNet, kd/experiment/presets.py),
# momentum 0.9, weight decay 5e-4, batch 64, 240 epochs with lr x 0.1 at 150, 180 and 210; random crop 32 with
# padding 4 and flips (this project's augmentation at 32 px). The methods' defaults above are the tables' for
# resnet32x4 -> resnet8x4; other pairs get the tables' own settings where you leave them unset.
_CIFAR_RECIPE = {"epochs": 240, "lr": 0.05, "batch_size": 64, "momentum": 0.9, "weight_decay": 5e-4,
                 "scheduler": "step", "step_size": [150, 180, 210], "gamma": 0.1, "warmup_epochs": 0,
                 "zero_init_residual": False}
CIFAR100_PRESET = {
    "teacher": {"model": "resnet32x4", **_CIFAR_RECIPE},
    "student": {"model": "resnet8x4", **_CIFAR_RECIPE},
    "experiment": {"data_dir": "cifar100:data/cifar100", "image_size": 32, "hflip": True, "seeds": [0, 1, 2],
                   "methods": ["Baseline", "KD", "AT", "FitNets", "CRD", "ReviewKD", "DKD", "DIST", "KD_LS", "DKD_LS"],
                   "preset": "cifar100"},
}
PRESETS = {"demo": DEMO_PRESET, "cifar100": CIFAR100_PRESET}


def merge(config: dict, overrides: dict) -> dict:
    """`config` with the keys that `overrides` names (by section; per method for "methods") replaced."""
    for section, values in overrides.items():
        if section == "methods":  # per-method settings: change only the keys named
            for method, settings in values.items():
                config["methods"][method].update(settings)
        else:
            config[section].update(values)
    return config


def default_config(preset: str | None = None) -> dict:
    """A deep copy of the dicts above, with a preset of PRESETS ("demo", "cifar100") applied when asked."""
    config = copy.deepcopy({"teacher": TEACHER_CONFIG, "student": STUDENT_CONFIG,
                            "methods": METHODS_CONFIG, "experiment": EXPERIMENT_CONFIG, "tune": TUNE_CONFIG})
    return merge(config, copy.deepcopy(PRESETS[preset])) if preset else config


def create_teacher_config(**overrides) -> dict:
    return validate_section("teacher", {**TEACHER_CONFIG, **overrides})


def create_student_config(**overrides) -> dict:
    return validate_section("student", {**STUDENT_CONFIG, **overrides})


def create_experiment_config(**overrides) -> dict:
    return validate_section("experiment", {**EXPERIMENT_CONFIG, **overrides})


def create_tune_config(**overrides) -> dict:
    return validate_section("tune", {**TUNE_CONFIG, **overrides})


def create_method_config(method: str, **overrides) -> dict:
    """Validated loss settings of one method, e.g. create_method_config("KD", temperature=2.0)."""
    settings = {**METHODS_CONFIG.get(method, {}), **overrides}  # a method without an entry: "lacks key(s)"
    return validate_methods({**METHODS_CONFIG, method: settings}, METHODS)[method]


def _method_config_helpers() -> dict[str, Callable[..., dict]]:
    """create_<method>_config(**overrides) for every registered method: create_kd_config, create_kd_ls_config ..."""
    return {f"create_{name.lower()}_config": functools.partial(create_method_config, name) for name in METHODS}


def __getattr__(name: str) -> Callable[..., dict]:
    # made from the registry when asked for, so that a method registered later has its helper too
    helper = _method_config_helpers().get(name)
    if helper is None:
        raise AttributeError(f"module 'final' has no attribute '{name}'")
    return helper


def __dir__() -> list[str]:
    return [*globals(), *_method_config_helpers()]


def validate_config(config: dict) -> dict:
    """Check every section and key; return a validated copy with method names resolved."""
    expected = ["teacher", "student", "methods", "experiment", "tune"]
    unknown = [s for s in config if s not in expected]
    if unknown or len(config) != len(expected):
        raise UserError(f"config sections must be {', '.join(expected)} (got {', '.join(config)})")
    checked = {section: validate_section(section, config[section])
               for section in ("teacher", "student", "experiment", "tune")}
    checked["methods"] = validate_methods(config["methods"], METHODS)
    checked["experiment"]["methods"] = resolve_method_names(checked["experiment"]["methods"], METHODS)
    if checked["experiment"]["tune"]:
        check_tuning(checked, METHODS)
        # the final runs train on fresh seeds, none of them the one every trial trained with
        checked["experiment"]["seeds"] = final_seeds(checked["tune"])
    models = [checked["teacher"]["model"], checked["student"]["model"],
              *(settings["model"] for settings in checked["methods"].values() if "model" in settings)]
    for name in models:
        try:
            resolve_name(name)
        except ModelError as err:
            raise UserError(str(err)) from None
    return checked


def main(config: dict | None = None, check_only: bool = False,
         resume: tuple[Path, list[RunRecord], dict] | None = None) -> list[dict]:
    """Run the whole experiment (teacher, then every method x seed) and return its records (as
    comparison_results.json stores them).

    `resume` = (folder, records, summary) of an unfinished experiment (kd.experiment.resume.find_unfinished):
    its finished runs are kept, an interrupted run continues from its last epoch.
    """
    setup_logging()
    setup = prepare(validate_config(config if config is not None else default_config()), decode_all=check_only)
    resumed = None
    if resume is not None:
        setup, resumed = check_resume(setup, *resume)
    plan = make_plan(setup, resumed, check_only)
    if check_only:
        report_check(setup, plan)
        return []
    progress = start(setup, resumed)
    train(progress, plan)
    return [record.to_json() for record in finish(progress)]


if __name__ == "__main__":
    # `python final.py` is `python run_experiment.py` without flags: the command line lives there, and it
    # imports this file for the dicts above (an exec, not an import, keeps the two free of a cycle)
    if len(sys.argv) > 1:
        sys.stderr.write("error: final.py runs the dicts above as they are and takes no flags; "
                         f"use python run_experiment.py {' '.join(sys.argv[1:])}\n")
        sys.exit(2)
    os.execv(sys.executable, [sys.executable, str(Path(__file__).with_name("run_experiment.py"))])

"""Validation of the config dicts in final.py and of `--set section.key=value` overrides.

Every key is checked by name against a rule (the sections' below, each method's in its own file), so a typo
anywhere (dict or command line) fails with the closest valid key instead of being silently ignored.
"""
from __future__ import annotations

import ast
import copy
import difflib
import re
from collections.abc import Mapping
from typing import Any

from kd.errors import UserError
from kd.methods import Method
from kd.rules import (
    BELOW_ONE,
    BOOL,
    NON_EMPTY_TEXT,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Rule,
    int_at_least,
    is_int,
    is_number,
    one_of,
)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STEMS = ("auto", "cifar", "imagenet")
SCHEDULERS = ("step", "onecycle")
PRUNERS = ("successive_halving", "none")


_PATH = Rule("a non-empty path", NON_EMPTY_TEXT.check)
_TRAIN_RULES: dict[str, Rule] = {
    # the name itself is checked against the libraries by models.resolve_name (closest names on a typo)
    "model": Rule("a torchvision model name (resnet18, mobilenet_v3_small ...) or timm/<name>", NON_EMPTY_TEXT.check),
    "weights": Rule("null (from scratch), a torchvision weights name (DEFAULT ...), true (timm's pretrained tag) "
                    "or a file path", lambda v: v is None or v is True or NON_EMPTY_TEXT.check(v)),
    "epochs": POSITIVE_INT,
    "lr": POSITIVE,
    "batch_size": POSITIVE_INT,
    "momentum": BELOW_ONE,
    "weight_decay": NON_NEGATIVE,
    "scheduler": one_of(*SCHEDULERS),
    "step_size": Rule("an integer >= 1 (lr × gamma every step_size epochs) or a list of epochs, e.g. "
                      "[150, 180, 210] (lr × gamma at each)",
                      lambda v: POSITIVE_INT.check(v) or (isinstance(v, list) and len(v) > 0
                                                          and all(POSITIVE_INT.check(e) for e in v))),
    "gamma": Rule("a number in (0, 1]", lambda v: is_number(v) and 0 < v <= 1),
    "warmup_epochs": NON_NEGATIVE_INT,
    "zero_init_residual": BOOL,
}
_TEACHER_RULES: dict[str, Rule] = {
    **_TRAIN_RULES,
    "epochs": Rule("an integer >= 1 (0 with teacher.checkpoint: use it as it is)", NON_NEGATIVE_INT.check),
    "checkpoint": Rule("null or the path of a teacher checkpoint or state_dict",
                       lambda v: v is None or NON_EMPTY_TEXT.check(v)),
}
_EXPERIMENT_RULES: dict[str, Rule] = {
    "data_dir": _PATH,
    "methods": Rule("a non-empty list of method names", lambda v: isinstance(v, list) and len(v) > 0),
    "seeds": Rule("a non-empty list of distinct integers >= 0",
                  lambda v: isinstance(v, list) and len(v) > 0 and all(NON_NEGATIVE_INT.check(s) for s in v)
                  and len(set(v)) == len(v)),
    "device": Rule("auto, cpu, cuda, cuda:N or mps",
                   lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) is not None),
    "precision": one_of(*PRECISIONS),
    "image_size": Rule("\"auto\" or an integer in [8, 1024]", lambda v: v == "auto" or (is_int(v) and 8 <= v <= 1024)),
    "stem": one_of(*STEMS),
    "hflip": BOOL,
    "cache_max_gb": NON_NEGATIVE,
    "num_workers": NON_NEGATIVE_INT,
    "logs_dir": _PATH,
    "checkpoints_dir": _PATH,
    "retrain_teacher": BOOL,
    "skip_bad_images": BOOL,
    "share_teacher": BOOL,
    "parallel": Rule("data or runs", lambda v: v in ("data", "runs")),
    "tune": BOOL,
    "cifar_val_images": POSITIVE_INT,
    "preset": Rule("null or cifar100", lambda v: v in (None, "cifar100")),
    "compile": Rule("auto, true or false", lambda v: v in ("auto", True, False)),
}
_LOG_RANGE = Rule("[low, high] with 0 < low < high", lambda v: isinstance(v, list) and len(v) == 2
                  and all(is_number(x) for x in v) and 0 < v[0] < v[1])
_TUNE_RULES: dict[str, Rule] = {
    "trials": POSITIVE_INT,
    "final_seeds": POSITIVE_INT,
    "trial_seed": NON_NEGATIVE_INT,
    "recipe": BOOL,
    "lr_range": _LOG_RANGE,
    "weight_decay_range": _LOG_RANGE,
    "spaces": Rule("a dict of method -> {setting: [low, high] or [low, high, \"log\"]}",
                   lambda v: isinstance(v, dict) and all(isinstance(ranges, dict) for ranges in v.values())),
    "pruner": one_of(*PRUNERS),
    "pruner_min_epochs": POSITIVE_INT,
    "pruner_reduction": int_at_least(2),
    "sampler_seed": NON_NEGATIVE_INT,
    "storage": Rule("null (a journal file in the experiment folder) or a database URL such as "
                    "postgresql://user:password@host/db", lambda v: v is None or NON_EMPTY_TEXT.check(v)),
    "holdout_fraction": Rule("a number in (0, 0.5]", lambda v: is_number(v) and 0 < v <= 0.5),
    "holdout_seed": NON_NEGATIVE_INT,
}
SECTIONS = {"teacher": _TEACHER_RULES, "student": _TRAIN_RULES, "experiment": _EXPERIMENT_RULES,
            "tune": _TUNE_RULES}
STUDENT_KEYS = tuple(_TRAIN_RULES)  # a method's entry may override those it does not use itself (see below)


def _closest(word: str, choices: list[str]) -> str:
    """A suggestion: the key the word abbreviates to (learning_rate -> lr), else the most similar one."""
    initials = "".join(part[:1] for part in word.lower().split("_"))
    match = [c for c in choices if c == initials] or difflib.get_close_matches(word, choices, n=1, cutoff=0.0)
    return f"did you mean '{match[0]}'? " if match else ""


def _check_keys(where: str, given: dict, valid: list[str], optional: tuple[str, ...] = ()) -> None:
    for key in given:
        if key not in valid and key not in optional:
            choices = [*valid, *optional]
            raise UserError(f"unknown config key '{where}.{key}': {_closest(str(key), choices)}"
                            f"valid keys: {', '.join(choices)}")
    missing = [k for k in valid if k not in given]
    if missing:
        raise UserError(f"config '{where}' lacks key(s) {', '.join(missing)}: add them (see final.py)")


def _check_value(where: str, key: str, value: Any, rule: Rule) -> None:
    if not rule.check(value):
        raise UserError(f"bad value {where}.{key}={value!r}: must be {rule.allowed}")


def validate_section(section: str, cfg: dict) -> dict:
    """Return a checked deep copy of one of the teacher/student/experiment dicts."""
    rules = SECTIONS[section]
    _check_keys(section, cfg, list(rules))
    for key, value in cfg.items():
        _check_value(section, key, value, rules[key])
    if section == "teacher" and cfg["checkpoint"] is not None and cfg["weights"] is not None:
        raise UserError("teacher.weights and teacher.checkpoint are both set: the teacher starts from one of them; "
                        "set the other to null")
    if section == "teacher" and cfg["epochs"] == 0 and cfg["checkpoint"] is None:
        raise UserError("teacher.epochs=0 needs teacher.checkpoint (a teacher to use as it is): set "
                        "--teacher-checkpoint PATH or train it for some epochs")
    return copy.deepcopy(cfg)


def validate_methods(methods_cfg: dict, registry: Mapping[str, Method]) -> dict:
    """Return a checked deep copy of METHODS_CONFIG: an entry per registered method, each setting by the rule
    its method declares (a student key by the student's rule)."""
    _check_keys("methods", methods_cfg, list(registry))
    for name, settings in methods_cfg.items():
        rules = registry[name].settings
        _check_keys(f"methods.{name}", settings, list(rules), optional=STUDENT_KEYS)
        for key, value in settings.items():
            _check_value(f"methods.{name}", key, value, rules[key] if key in rules else _TRAIN_RULES[key])
    return copy.deepcopy(methods_cfg)


def split_method_settings(settings: dict, method: Method) -> tuple[dict, dict]:
    """(loss settings, student overrides) of one method's METHODS_CONFIG entry. A key the method declares is
    a loss setting even where a student key has the same name (DKD's `warmup_epochs` warms up its loss, not
    the lr)."""
    return ({k: v for k, v in settings.items() if k in method.settings},
            {k: v for k, v in settings.items() if k not in method.settings})


def _method_key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def resolve_method_names(names: list[str], registry: Mapping[str, Method]) -> list[str]:
    """Map method names to the registry's spelling, keeping the given order: case-insensitive, `-` for `_`
    (dkd-ls -> DKD_LS), and `all` for every registered method."""
    by_key = {_method_key(name): name for name in registry}
    resolved = []
    for name in names:
        canonical = list(registry) if _method_key(name) == "all" else [by_key.get(_method_key(name))]
        if canonical == [None]:
            raise UserError(f"unknown method '{name}': valid methods are {', '.join(registry)} (or all)")
        resolved += [method for method in canonical if method not in resolved]
    return resolved


def parse_value(text: str) -> Any:
    """Parse a `--set` value: Python/JSON literals (numbers, lists, true/false/null), else a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def apply_overrides(config: dict, assignments: list[str]) -> None:
    """Apply `section.key=value` (or `methods.NAME.key=value`) assignments to the config in place."""
    for assignment in assignments:
        if "=" not in assignment:
            raise UserError(f"--set '{assignment}' is not of the form section.key=value "
                            "(e.g. --set student.lr=0.05)")
        path, value = assignment.split("=", 1)
        parts = path.strip().split(".")
        sections = list(config)
        if parts[0] not in config:
            raise UserError(f"unknown config section '{parts[0]}' in --set {assignment}: "
                            f"{_closest(parts[0], sections)}valid sections: {', '.join(sections)}")
        target = config[parts[0]]
        for depth, part in enumerate(parts[1:-1], start=1):
            if part not in target:
                where = ".".join(parts[:depth])
                raise UserError(f"unknown config key '{where}.{part}' in --set {assignment}: "
                                f"{_closest(part, list(target))}valid keys: {', '.join(target)}")
            target = target[part]
        if len(parts) < 2 or not isinstance(target, dict):
            raise UserError(f"--set '{assignment}' must name a key, e.g. --set student.lr=0.05")
        key = parts[-1]
        if key not in target:
            where = ".".join(parts[:-1])
            raise UserError(f"unknown config key '{where}.{key}' in --set {assignment}: "
                            f"{_closest(key, list(target))}valid keys: {', '.join(target)}")
        target[key] = parse_value(value)

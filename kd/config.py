"""Validation of the config dicts in final.py and of `--set section.key=value` overrides.

Every key is checked by name against one table of rules, so a typo anywhere (dict or command line)
fails with the closest valid key instead of being silently ignored.
"""
from __future__ import annotations

import ast
import copy
import difflib
import inspect
import re
from typing import Any, Callable


class UserError(Exception):
    """Bad input or configuration. The command line prints it as one line and exits with code 2."""


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STEMS = ("auto", "cifar", "imagenet")
SCHEDULERS = ("step", "onecycle")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# key -> (allowed range in words, predicate). Keys shared by several sections share one rule.
Rule = tuple[str, Callable[[Any], bool]]
_POSITIVE_INT: Rule = ("an integer >= 1", lambda v: _is_int(v) and v >= 1)
_NON_NEG: Rule = ("a number >= 0", lambda v: _is_num(v) and v >= 0)
_POSITIVE: Rule = ("a number > 0", lambda v: _is_num(v) and v > 0)
_BOOL: Rule = ("true or false", lambda v: isinstance(v, bool))
_PATH: Rule = ("a non-empty path", lambda v: isinstance(v, str) and v.strip() != "")
_TRAIN_RULES: dict[str, Rule] = {
    # the name itself is checked against the libraries by models.resolve_name (closest names on a typo)
    "model": ("a torchvision model name (resnet18, mobilenet_v3_small ...) or timm/<name>",
              lambda v: isinstance(v, str) and v.strip() != ""),
    "weights": ("null (from scratch), a torchvision weights name (DEFAULT ...), true (timm's pretrained tag) "
                "or a file path", lambda v: v is None or v is True or (isinstance(v, str) and v.strip() != "")),
    "epochs": _POSITIVE_INT,
    "lr": _POSITIVE,
    "batch_size": _POSITIVE_INT,
    "momentum": ("a number in [0, 1)", lambda v: _is_num(v) and 0 <= v < 1),
    "weight_decay": _NON_NEG,
    "scheduler": (f"one of {', '.join(SCHEDULERS)}", lambda v: v in SCHEDULERS),
    "step_size": _POSITIVE_INT,
    "gamma": ("a number in (0, 1]", lambda v: _is_num(v) and 0 < v <= 1),
    "warmup_epochs": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "zero_init_residual": _BOOL,
}
_TEACHER_RULES: dict[str, Rule] = {
    **_TRAIN_RULES,
    "epochs": ("an integer >= 1 (0 with teacher.checkpoint: use it as it is)", lambda v: _is_int(v) and v >= 0),
    "checkpoint": ("null or the path of a teacher checkpoint or state_dict",
                   lambda v: v is None or (isinstance(v, str) and v.strip() != "")),
}
_EXPERIMENT_RULES: dict[str, Rule] = {
    "data_dir": _PATH,
    "methods": ("a non-empty list of method names", lambda v: isinstance(v, list) and len(v) > 0),
    "seeds": ("a non-empty list of distinct integers >= 0",
              lambda v: isinstance(v, list) and len(v) > 0 and all(_is_int(s) and s >= 0 for s in v)
              and len(set(v)) == len(v)),
    "device": ("auto, cpu, cuda, cuda:N or mps",
               lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) is not None),
    "precision": (f"one of {', '.join(PRECISIONS)}", lambda v: v in PRECISIONS),
    "image_size": ("\"auto\" or an integer in [8, 1024]",
                   lambda v: v == "auto" or (_is_int(v) and 8 <= v <= 1024)),
    "stem": (f"one of {', '.join(STEMS)}", lambda v: v in STEMS),
    "hflip": _BOOL,
    "cache_max_gb": _NON_NEG,
    "num_workers": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "logs_dir": _PATH,
    "checkpoints_dir": _PATH,
    "retrain_teacher": _BOOL,
    "skip_bad_images": _BOOL,
    "share_teacher": _BOOL,
    "parallel": ("data or runs", lambda v: v in ("data", "runs")),
}
# Method settings are checked by name; which names a method accepts comes from its Distiller.
_METHOD_RULES: dict[str, Rule] = {
    "temperature": _POSITIVE,
    "ce_weight": _NON_NEG,
    "kd_weight": _NON_NEG,
    "kl_weight": _NON_NEG,
    "feat_weight": _NON_NEG,
    "beta": _NON_NEG,
    "alpha": ("a number in [0, 1]", lambda v: _is_num(v) and 0 <= v <= 1),
    "p": _POSITIVE,
    "num_peers": ("an integer >= 2", lambda v: _is_int(v) and v >= 2),
    "two_stage": _BOOL,
    "alternate": _BOOL,
    "hint_epochs": ("null or an integer >= 1", lambda v: v is None or (_is_int(v) and v >= 1)),
    "hint_layer": ("a stage number >= 1 or the module path of a student stage (e.g. layer2)",
                   lambda v: (_is_int(v) and v >= 1) or (isinstance(v, str) and v.strip() != "")),
    "tckd_weight": _NON_NEG,
    "nckd_weight": _NON_NEG,
    "gamma": _NON_NEG,  # DIST's intra-class weight (the student's `gamma` is StepLR's)
    "distance_weight": _NON_NEG,
    "angle_weight": _NON_NEG,
    "warmup_epochs": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),  # a loss warm-up (DKD, ReviewKD)
    "standardize": _BOOL,
    "feat_dim": _POSITIVE_INT,
    "nce_k": _POSITIVE_INT,
    "nce_t": _POSITIVE,
    "nce_m": ("a number in [0, 1)", lambda v: _is_num(v) and 0 <= v < 1),
}
SECTIONS = {"teacher": _TEACHER_RULES, "student": _TRAIN_RULES, "experiment": _EXPERIMENT_RULES}
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
    allowed, ok = rule
    if not ok(value):
        raise UserError(f"bad value {where}.{key}={value!r}: must be {allowed}")


def method_keys(distiller_cls: type) -> list[str]:
    """The settings a method accepts: its Distiller's keyword-only constructor arguments."""
    params = inspect.signature(distiller_cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


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


def validate_methods(methods_cfg: dict, registry: dict[str, type]) -> dict:
    """Return a checked deep copy of METHODS_CONFIG against the registered Distillers."""
    _check_keys("methods", methods_cfg, list(registry))
    for name, settings in methods_cfg.items():
        loss_keys = method_keys(registry[name])
        _check_keys(f"methods.{name}", settings, loss_keys, optional=STUDENT_KEYS)
        for key, value in settings.items():
            _check_value(f"methods.{name}", key, value, _METHOD_RULES[key] if key in loss_keys else _TRAIN_RULES[key])
    return copy.deepcopy(methods_cfg)


def split_method_settings(settings: dict, loss_keys: list[str]) -> tuple[dict, dict]:
    """(loss settings, student overrides) of one method's METHODS_CONFIG entry. A key the method's Distiller
    takes is a loss setting even where a student key has the same name (DKD's `warmup_epochs` warms up its
    loss, not the lr)."""
    return ({k: v for k, v in settings.items() if k in loss_keys},
            {k: v for k, v in settings.items() if k not in loss_keys})


def _method_key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def resolve_method_names(names: list[str], registry: dict[str, type]) -> list[str]:
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

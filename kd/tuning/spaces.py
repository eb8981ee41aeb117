"""What `--tune` searches: the common recipe's ranges (stage 1), each method's ranges (stage 2, declared in its
file, TUNE_CONFIG["spaces"] replacing them), and the seeds of the final runs."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kd.errors import UserError
from kd.methods import REFERENCE, Method
from kd.rules import is_int, is_number
from kd.space import Range

RECIPE = "recipe"  # the name of stage 1's study, and its rows in tuning_trials.csv


def user_recipe(config: dict) -> dict[str, float]:
    """The student's own lr and weight decay: stage 1's first trial, and the recipe when stage 1 is off."""
    return {key: config["student"][key] for key in recipe_space(config["tune"])}


def recipe_space(tune_cfg: dict) -> dict[str, Range]:
    """Stage 1: the student's lr and weight decay, on a log scale."""
    return {"lr": Range(*tune_cfg["lr_range"], log=True),
            "weight_decay": Range(*tune_cfg["weight_decay_range"], log=True)}


def search_space(name: str, method: Method, tune_cfg: dict, default: Mapping[str, Any]) -> dict[str, Range]:
    """The ranges `--tune` searches for one method: its declared search space, with TUNE_CONFIG["spaces"]
    replacing or adding ranges; `default` (its METHODS_CONFIG entry) must lie inside each, since the default is
    the first trial."""
    space = dict(method.search_space)
    for key, value in tune_cfg["spaces"].get(name, {}).items():
        where = f"tune.spaces.{name}.{key}"
        if key not in method.settings or not is_number(default.get(key)):
            numeric = [k for k in method.settings if is_number(default.get(k))]
            raise UserError(f"unknown setting '{where}': {name}'s numeric settings are {', '.join(numeric) or 'none'}")
        try:
            space[key] = Range.parse(value, integer=is_int(default[key]))
        except ValueError as err:
            raise UserError(f"bad range {where}={value!r}: {err}") from None
        if space[key].problem():
            raise UserError(f"bad range {where}={value!r}: {space[key].problem()}; give [low, high] with low < high")
    for key, searched in space.items():
        if not searched.low <= default[key] <= searched.high:
            raise UserError(f"{name}'s {key} {default[key]} lies outside its search range {searched}, but the "
                            f"default is the first trial: widen tune.spaces.{name}.{key}")
    return space


def check_tuning(config: dict, registry: Mapping[str, Method]) -> None:
    """A validated config that tunes: every range of tune.spaces names a method and a numeric setting of it, is
    not empty and holds the method's default (the first trial), and the user's recipe lies in stage 1's ranges."""
    tune_cfg = config["tune"]
    for name in tune_cfg["spaces"]:
        if name not in registry:
            raise UserError(f"unknown method 'tune.spaces.{name}': valid methods are {', '.join(registry)}")
    for name in dict.fromkeys([*config["experiment"]["methods"], *tune_cfg["spaces"]]):
        search_space(name, registry[name], tune_cfg, config["methods"][name])
    if tune_cfg["recipe"]:
        for key, searched in recipe_space(tune_cfg).items():
            if not searched.low <= config["student"][key] <= searched.high:
                raise UserError(f"student.{key} {config['student'][key]} lies outside tune.{key}_range "
                                f"{tune_cfg[key + '_range']}, but your recipe is stage 1's first trial: widen the "
                                "range")
    if REFERENCE not in config["experiment"]["methods"]:
        raise UserError(f"--tune compares every method with the tuned {REFERENCE}: add {REFERENCE} to --methods")


def final_seeds(tune_cfg: dict) -> list[int]:
    """The final runs' seeds: the first `final_seeds` integers from 0 that are not the trials' seed."""
    seeds = [seed for seed in range(tune_cfg["final_seeds"] + 1) if seed != tune_cfg["trial_seed"]]
    return seeds[:tune_cfg["final_seeds"]]

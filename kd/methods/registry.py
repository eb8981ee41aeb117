"""How a method declares itself (`Method`), and the registry of every method (`METHODS`).

Each method's file ends with `register(Method(...))`: its Distiller, the rule of every setting, the sentence
report.md writes about it, its extra record fields, its cost in the time estimate and its tuning search
space. Nothing outside kd/methods/ names a particular method: the rest of the project reads this registry.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

from kd.methods.base import Distiller
from kd.rules import Rule
from kd.space import Range


def one_student(_settings: Mapping[str, Any]) -> float:
    return 1.0


@dataclass(frozen=True)
class EpochShare:
    """A setting counted in epochs whose `null` in METHODS_CONFIG means a share of the run's epochs: a default
    the references set for their run length (240 epochs on CIFAR-100) keeps its fraction in a shorter run."""
    fraction: Fraction  # exact, so that a half rounds as Python rounds it (to even), not by a float's error
    source: str         # where the fraction comes from, for the plan

    def epochs(self, run_epochs: int) -> int:
        """The fraction of `run_epochs`, rounded, at least 1."""
        return max(1, round(self.fraction * run_epochs))


@dataclass(frozen=True)
class Method:
    """Everything the project knows about one method, declared in the method's own file."""
    name: str                             # as METHODS_CONFIG, --methods and the results spell it
    distiller: type[Distiller]
    settings: Mapping[str, Rule]          # every keyword-only argument of the Distiller, with its rule
    idea: str                             # report.md's sentence: what the method does, and its paper
    # extra record fields, as the Distiller's `record_extras` returns them -> their label in report.md
    record_fields: Mapping[str, str] = field(default_factory=dict)
    # student steps per batch against one student (DML trains one per peer), from the method's settings:
    # the --check estimate and the --parallel runs queue count with it
    cost: Callable[[Mapping[str, Any]], float] = one_student
    # settings counted in epochs whose `null` means a share of the run's epochs
    epoch_shares: Mapping[str, EpochShare] = field(default_factory=dict)
    # setting -> the range `--tune` searches (TUNE_CONFIG["spaces"] may replace it); empty: nothing to tune
    search_space: Mapping[str, Range] = field(default_factory=dict)
    # (teacher, student) of the CIFAR zoo -> the settings the published CIFAR-100 tables used for that pair where
    # they differ from the defaults; `--preset cifar100` sets them wherever the user leaves them unset
    table_pairs: Mapping[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)

    def resolve(self, settings: Mapping[str, Any], epochs: int) -> dict[str, Any]:
        """The settings the Distiller gets for a run of `epochs`: an unset epoch share becomes its epochs."""
        return {key: (self.epoch_shares[key].epochs(epochs) if value is None and key in self.epoch_shares else value)
                for key, value in settings.items()}


def constructor_settings(distiller: type[Distiller]) -> list[str]:
    """The settings a Distiller takes: its keyword-only constructor arguments (after the student and teacher,
    which are all it may take otherwise)."""
    parameters = list(inspect.signature(distiller.__init__).parameters.values())[1:]  # after self
    positional = [p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    if positional not in (["student"], ["student", "teacher"]):
        raise TypeError(f"{distiller.__name__}(student, teacher=None, *, settings...): its settings must be "
                        f"keyword-only; it takes {', '.join(positional)} before them")
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]


class Registry(dict[str, Method]):
    """Every registered method by name, in registration order (the order of `--methods all`)."""

    def register(self, method: Method) -> Method:
        """Add `method`; a declaration that does not fit its Distiller is refused here, at import time."""
        if method.name in self:
            raise ValueError(f"a method named {method.name} is registered already")
        arguments = constructor_settings(method.distiller)
        without_rule = [name for name in arguments if name not in method.settings]
        without_argument = [name for name in method.settings if name not in arguments]
        if without_rule or without_argument:
            raise TypeError(f"{method.name}: every setting needs a rule and a keyword-only argument of "
                            f"{method.distiller.__name__}; without a rule: {', '.join(without_rule) or '-'}; "
                            f"not an argument: {', '.join(without_argument) or '-'}")
        paired = [name for settings in method.table_pairs.values() for name in settings]
        undeclared = [name for name in (*method.epoch_shares, *method.search_space, *paired)
                      if name not in method.settings]
        if undeclared:
            raise TypeError(f"{method.name}: its epoch_shares, search_space or table_pairs name settings it does "
                            f"not have: {', '.join(undeclared)}")
        for name, searched in method.search_space.items():
            if searched.problem():
                raise TypeError(f"{method.name}: the search range of {name} cannot be searched: {searched.problem()}")
        self[method.name] = method
        return method


METHODS = Registry()
register = METHODS.register

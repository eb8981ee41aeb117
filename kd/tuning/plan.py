"""What `--tune` checks and says before anything is written: where it may run, and (--check) its stages,
search spaces, trial budget, split roles and cost."""
from __future__ import annotations

import os

from kd.engine import distributed
from kd.errors import UserError
from kd.experiment.estimate import StepTimes, as_minutes, group_seconds, teacher_seconds
from kd.experiment.setup import Setup
from kd.methods import REFERENCE
from kd.tuning.spaces import RECIPE
from kd.tuning.stages import stages
from kd.tuning.study import open_storage


def check_tuning_runtime(setup: Setup) -> None:
    """Tuning runs whole trials per process, and several machines share a study only through a database."""
    if distributed.job_size() > 1 and not distributed.spreads_runs():
        raise UserError("--tune under torchrun needs --parallel runs (each process trains whole trials of the "
                        "same study): add --parallel runs")
    storage = setup.config["tune"]["storage"]
    machines = distributed.job_size() // int(os.environ.get("LOCAL_WORLD_SIZE", distributed.job_size()))
    if storage is None and machines > 1:
        raise UserError("several machines share a study only through a database: set tune.storage to a "
                        "PostgreSQL URL (see README, Tuning)")
    if storage is not None:  # unreachable: one line now, before anything is written
        # rank 0 first: opening a new database creates Optuna's tables, which processes doing it at once fail at
        if distributed.is_main():
            open_storage(storage, setup.logs)
        distributed.barrier()
        if not distributed.is_main():
            open_storage(storage, setup.logs)


def pruned_epochs(epochs: int, min_epochs: int, reduction: int) -> float:
    """A trial's expected epochs when successive halving keeps 1 in `reduction` trials at each rung (epochs
    min_epochs, min_epochs * reduction, ...), as it intends."""
    expected, rung, share = float(min(min_epochs, epochs)), min_epochs, 1.0
    while rung < epochs:
        share /= reduction
        expected += share * (min(rung * reduction, epochs) - rung)
        rung *= reduction
    return expected


def describe_tuning(setup: Setup, times: StepTimes | None) -> str:
    """The plan's lines on tuning: the stages and their search spaces, the budget and, with timed steps
    (--check), the cost (the plan has said which split plays which role)."""
    tune_cfg, exp = setup.config["tune"], setup.config["experiment"]
    todo = stages(setup)
    lines = []
    if tune_cfg["recipe"]:
        lines.append(f"tuning stage 1, the common recipe: {_space(todo[0].space)} on {REFERENCE}; every method "
                     "then trains with the chosen lr and weight decay (the common protocol holds)")
    else:
        lines.append(f"tuning stage 1 is off (tune.recipe false): every method trains with student.lr "
                     f"{setup.config['student']['lr']} and student.weight_decay "
                     f"{setup.config['student']['weight_decay']}")
    lines.append("tuning stage 2, each method's own settings:")
    lines += [f"  {stage.method}: {_space(stage.space)}" for stage in todo if stage.name != RECIPE]
    lines += [f"  {method}: nothing to tune" for method in exp["methods"]
              if method not in {stage.method for stage in todo} and method != REFERENCE]
    pruner = ("none" if tune_cfg["pruner"] == "none" else f"successive halving from epoch "
              f"{tune_cfg['pruner_min_epochs']}, 1 in {tune_cfg['pruner_reduction']} trials going on at each rung")
    lines.append(f"budget: {tune_cfg['trials']} trials per study, the defaults first, {len(todo)} studies "
                 f"({tune_cfg['trials'] * len(todo)} trials) on seed {tune_cfg['trial_seed']}; pruner {pruner}; "
                 f"storage {tune_cfg['storage'] or 'a journal file in the experiment folder'}")
    lines.append(f"final runs: every method at its chosen settings and at its defaults (where they differ), "
                 f"seeds {', '.join(map(str, exp['seeds']))}, never used while tuning")
    if times is not None:
        epochs = setup.config["student"]["epochs"]
        full = sum(group_seconds(setup, times, [stage.method]) for stage in todo) * tune_cfg["trials"]
        kept = pruned_epochs(epochs, tune_cfg["pruner_min_epochs"], tune_cfg["pruner_reduction"]) / epochs \
            if tune_cfg["pruner"] != "none" else 1.0
        # at most: every method twice (tuned and default); the reference once unless the recipe is tuned
        runs = {m: 1 if m == REFERENCE and not tune_cfg["recipe"] else 2 for m in exp["methods"]}
        finals = sum(group_seconds(setup, times, [m]) * n for m, n in runs.items()) * len(exp["seeds"])
        teacher = teacher_seconds(setup, times)
        lines.append(f"estimated time: tuning ~{as_minutes(full)} with every trial run to the end, "
                     f"~{as_minutes(full * kept)} if the pruner stops trials as successive halving intends; final "
                     f"runs ~{as_minutes(finals)} at most; teacher {as_minutes(teacher) if teacher else 'reused'}; "
                     f"from timed training steps on {setup.runtime.device} ({setup.runtime.precision}), a rough guide")
    return "\n".join(lines)


def _space(space: dict) -> str:
    return ", ".join(f"{name} {searched}" for name, searched in space.items())

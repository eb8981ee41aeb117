"""The two stages of `--tune`. Stage 1 tunes the common recipe (the student's lr and weight decay) on the
reference method; stage 2 each method's own settings on that recipe. Every study gets the same number of
trials, its first trial at the defaults; a trial trains one student on the trial seed, scored by the best
val (selection) accuracy of its epochs, on data without the reporting split."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import optuna
from optuna.trial import TrialState

from kd.data.holdout import without_reporting
from kd.engine import distributed
from kd.engine.run import RunFailed, RunSpec
from kd.engine.trainer import fit
from kd.experiment.runs import Teacher, initial_student, make_distiller
from kd.experiment.setup import Setup
from kd.methods import METHODS, REFERENCE
from kd.results.files import ExperimentFolder
from kd.results.record import TUNED
from kd.space import Range, settings_text
from kd.tuning.outcome import Tuned
from kd.tuning.spaces import RECIPE, recipe_space, search_space, user_recipe
from kd.tuning.study import (
    FAILURE,
    Claims,
    all_finished,
    counted_trials,
    make_pruner,
    open_storage,
    reopen,
    reseed,
)

log = logging.getLogger("kd")
SECONDS = "seconds"  # user attribute: a trial's training time


class Stage(NamedTuple):
    """One study: its name, the method its trials train, what it searches and the defaults (its first trial)."""
    name: str
    method: str
    space: dict[str, Range]
    defaults: dict[str, Any]


def stages(setup: Setup) -> list[Stage]:
    """Every study, in the order they run: the recipe's (stage 1), then each method's own (stage 2)."""
    config, tune_cfg = setup.config, setup.config["tune"]
    todo = []
    if tune_cfg["recipe"]:
        todo.append(Stage(RECIPE, REFERENCE, recipe_space(tune_cfg), user_recipe(config)))
    for method in config["experiment"]["methods"]:
        space = search_space(method, METHODS[method], tune_cfg, config["methods"][method])
        if space:
            todo.append(Stage(method, method, space, {key: config["methods"][method][key] for key in space}))
    return todo


def study_name(folder: ExperimentFolder, stage: str) -> str:
    return f"{folder.path.name}/{stage}"


def open_study(setup: Setup, folder: ExperimentFolder, stage: str) -> optuna.Study:
    storage = open_storage(setup.config["tune"]["storage"], folder.path / "tuning.journal")
    return optuna.create_study(study_name=study_name(folder, stage), storage=storage, direction="maximize",
                               pruner=make_pruner(setup.config["tune"]), load_if_exists=True)


def tune(setup: Setup, teacher: Teacher, folder: ExperimentFolder, stage_done: Callable[[], None]) -> Tuned:
    """Run (or, resumed, finish) both stages; return the recipe and the settings they chose. `stage_done` is
    called on rank 0 after each study (the trials file is rewritten there)."""
    recipe: dict[str, float] = {}
    chosen: dict[str, dict[str, Any]] = {}
    for stage in stages(setup):
        trial_setup = (lambda values: setup.with_tuned(Tuned(values, {}))) if stage.name == RECIPE else (
            lambda values, method=stage.method, recipe=recipe: setup.with_tuned(Tuned(recipe, {method: values})))
        best = _run_study(setup, teacher, folder, stage, trial_setup)
        if stage.name == RECIPE:
            recipe = best
        else:
            chosen[stage.method] = best
        log.info("Tuning %s chose %s (defaults %s)", stage.name, _settings_text(best),
                 _settings_text(stage.defaults))
        if distributed.is_main():
            stage_done()
    return Tuned(recipe or user_recipe(setup.config), chosen)


def _run_study(setup: Setup, teacher: Teacher, folder: ExperimentFolder, stage: Stage,
               trial_setup: Callable[[dict], Setup]) -> dict:
    """One study's trials (this process's share of them); the settings it chose."""
    space, defaults = stage.space, stage.defaults
    study = open_study(setup, folder, stage.name) if distributed.is_main() else None
    counted = reopen(study, defaults) if distributed.is_main() else None
    counted = distributed.broadcast_object(counted)
    if study is None:
        study = open_study(setup, folder, stage.name)
    budget = setup.config["tune"]["trials"]
    claims = Claims(f"tune/{stage.name}/taken", budget - counted)
    while claims.take():
        trial = study.ask()
        reseed(study, trial, setup.config["tune"]["sampler_seed"], budget)  # before it draws its settings
        values = {name: searched.suggest(trial, name) for name, searched in space.items()}
        # the defaults always finish (the pruner still records their epochs), so that they can be chosen
        state, value = _train_trial(trial_setup(values), teacher, folder, stage, trial, prunable=values != defaults)
        study.tell(trial, value, state=state)
        log.info("Tuning %s, trial %d of %d: %s -> %s", stage.name, len(counted_trials(study)), budget,
                 _settings_text(values), f"val {value:.4f}" if value is not None else state.name.lower())
    all_finished(f"tune/{stage.name}/finished")
    return chosen_settings(study) or dict(defaults)  # no trial completed (all diverged): the defaults stand


def chosen_settings(study: optuna.Study) -> dict:
    """The settings of the best completed trial; on a tie the earliest (the defaults, when they tie)."""
    complete = [trial for trial in counted_trials(study) if trial.state == TrialState.COMPLETE]
    if not complete:
        return {}
    return max(complete, key=lambda trial: (trial.value, -trial.number)).params


def _train_trial(setup: Setup, teacher: Teacher, folder: ExperimentFolder, stage: Stage, trial: optuna.Trial,
                 prunable: bool) -> tuple[TrialState, float | None]:
    """Train one trial's student, reporting each epoch's val score to the pruner. A run that diverges is a
    failed trial; the study goes on."""
    seed, method = setup.config["tune"]["trial_seed"], stage.method
    settings, cfg, spec = setup.student_settings(method, TUNED)
    trial.set_user_attr("seed", seed)

    def report(entry: dict) -> None:
        trial.report(entry["score"], entry["epoch"])
        # the pruner always hears the epoch (it ranks trials by it); a trial stops only before its last epoch
        # (after it, nothing is left to save) and never at the defaults, which must finish to be chosen
        if trial.should_prune() and prunable and entry["epoch"] < cfg["epochs"]:
            raise optuna.TrialPruned()

    label = f"{stage.name}_trial{trial.number}"
    run_spec = RunSpec(f"{stage.name} trial {trial.number}", cfg, seed,
                       setup.logs / "tuning" / f"{label}_{folder.stamp}", None, {}, after_epoch=report)
    started = time.perf_counter()
    state, value = TrialState.COMPLETE, None
    with distributed.alone():
        distiller = make_distiller(setup, method, settings, spec, initial_student(setup, spec, seed), seed, teacher)
        try:
            result, _, _ = fit(distiller, without_reporting(setup.data), run_spec, setup.runtime)
            value = result.best_accuracy
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except RunFailed as failure:
            state = TrialState.FAIL
            trial.set_user_attr(FAILURE, str(failure))
        finally:
            distiller.close()
    trial.set_user_attr(SECONDS, time.perf_counter() - started)
    return state, value


def _settings_text(values: dict) -> str:
    return "{" + settings_text(values) + "}"

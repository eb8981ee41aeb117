"""What tuning leaves on record: tuning_trials.csv (every counted trial of every study, one row each) and the
"tuning" part of experiment_summary.json (per study: defaults, chosen settings, trials run, pruned and
failed, the epochs the pruner saved, the device time)."""
from __future__ import annotations

import csv
import io
import json
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from kd.engine.checkpoint import write_text
from kd.experiment.setup import Setup
from kd.results.files import ExperimentFolder
from kd.tuning.outcome import Tuned
from kd.tuning.spaces import RECIPE
from kd.tuning.stages import SECONDS, open_study, stages, study_name
from kd.tuning.study import FAILURE, counted_trials

TRIAL_COLUMNS = ["method", "stage", "trial", "settings", "seed", "val_per_epoch", "best_val", "epochs", "state",
                 "seconds", "optuna_number", "failure"]
STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}


def stage_number(stage: str) -> int:
    """1 for the common recipe's study, 2 for a method's own."""
    return 1 if stage == RECIPE else 2


def _row(stage: str, method: str, index: int, trial: FrozenTrial) -> dict[str, Any]:
    scores = [trial.intermediate_values[epoch] for epoch in sorted(trial.intermediate_values)]
    return {"method": method, "stage": stage_number(stage), "trial": index,
            "settings": json.dumps(trial.params, sort_keys=True), "seed": trial.user_attrs.get("seed"),
            "val_per_epoch": json.dumps(scores), "best_val": max(scores) if scores else None, "epochs": len(scores),
            "state": STATES[trial.state], "seconds": trial.user_attrs.get(SECONDS),
            "optuna_number": trial.number, "failure": trial.user_attrs.get(FAILURE, "")}


def trial_rows(setup: Setup, folder: ExperimentFolder) -> list[dict[str, Any]]:
    """Every counted trial of the experiment's studies, study by study in the order they ran."""
    rows = []
    for stage in stages(setup):
        study = open_study(setup, folder, stage.name)
        rows += [_row(stage.name, stage.method, index, trial) for index, trial in enumerate(counted_trials(study))]
    return rows


def write_trials_csv(setup: Setup, folder: ExperimentFolder) -> list[dict[str, Any]]:
    rows = trial_rows(setup, folder)
    text = io.StringIO()
    writer = csv.DictWriter(text, TRIAL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    write_text(folder.path / "tuning_trials.csv", text.getvalue())
    return rows


def tuning_summary(setup: Setup, folder: ExperimentFolder, tuned: Tuned, rows: list[dict[str, Any]]) -> dict:
    """The summary's "tuning" part, from the trials' rows."""
    tune_cfg = setup.config["tune"]
    studies = {}
    for stage in stages(setup):
        mine = [row for row in rows if row["method"] == stage.method and row["stage"] == stage_number(stage.name)]
        epochs = setup.student_settings(stage.method)[1]["epochs"]
        stopped = [row for row in mine if row["state"] != "failed"]  # a diverged trial's epochs are not the pruner's
        studies[stage.name] = {
            "method": stage.method, "study": study_name(folder, stage.name),
            "space": {key: str(r) for key, r in stage.space.items()}, "defaults": stage.defaults,
            "chosen": tuned.recipe if stage.name == RECIPE else tuned.settings[stage.method], "trials": len(mine),
            **{state: sum(row["state"] == state for row in mine) for state in STATES.values()},
            "epochs_run": sum(row["epochs"] for row in stopped), "epochs_full": len(stopped) * epochs,
            "device_hours": sum(row["seconds"] or 0.0 for row in mine) / 3600}
    run, full = sum(s["epochs_run"] for s in studies.values()), sum(s["epochs_full"] for s in studies.values())
    return {"studies": studies, "recipe": tuned.recipe, "recipe_tuned": tune_cfg["recipe"],
            "trials_per_study": tune_cfg["trials"], "trial_seed": tune_cfg["trial_seed"],
            "final_seeds": setup.config["experiment"]["seeds"], "pruner": tune_cfg["pruner"],
            "pruner_saved_epochs": (1 - run / full) if full else 0.0,
            "storage": "tuning.journal" if tune_cfg["storage"] is None else "database (tune.storage)",
            "held_out": setup.data.held_out}


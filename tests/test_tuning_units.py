"""The pieces of --tune checked on their own: search ranges, every method's declared space, the pruner's
expected epochs, which trials count, and a diverging trial recorded as failed while its study goes on."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import final
import run_experiment
from kd.methods import METHODS
from kd.methods.base import Distiller
from kd.methods.registry import Method, Registry
from kd.rules import POSITIVE
from kd.space import Range
from kd.tuning.plan import pruned_epochs
from kd.tuning.study import FAILURE, counted_trials, reopen, reseed


def test_ranges_that_cannot_be_searched_are_named():
    assert Range(1.0, 8.0).problem() is None and Range(0.1, 10.0, log=True).problem() is None
    assert "empty or inverted" in Range(2.0, 1.0).problem() and "empty or inverted" in Range(3.0, 3.0).problem()
    assert "above 0" in Range(0.0, 1.0, log=True).problem()
    assert "whole-number" in Range(1.5, 4, integer=True).problem()
    assert Range.parse([1, 10, "log"]) == Range(1, 10, log=True)
    with pytest.raises(ValueError):
        Range.parse([1, 10, "linear"])


def test_a_method_declaring_a_bad_range_is_refused_at_registration():
    class Toy(Distiller):
        def __init__(self, student, *, beta: float):
            super().__init__(student)

    registry = Registry()
    with pytest.raises(TypeError, match="cannot be searched"):
        registry.register(Method("Toy", Toy, {"beta": POSITIVE}, idea="-", search_space={"beta": Range(5.0, 1.0)}))
    with pytest.raises(TypeError, match="settings it does not have"):
        registry.register(Method("Toy", Toy, {"beta": POSITIVE}, idea="-", search_space={"gamma": Range(1.0, 5.0)}))


def test_every_method_but_the_reference_declares_a_space_holding_its_defaults():
    for name, method in METHODS.items():
        if name == "Baseline":
            assert method.search_space == {}
            continue
        assert method.search_space, f"{name} declares nothing to tune"
        for key, searched in method.search_space.items():
            assert searched.low <= final.METHODS_CONFIG[name][key] <= searched.high, (name, key)


def test_pruned_epochs_by_hand():
    # 9 epochs, rungs at 1 and 3 (reduction 3): every trial runs epoch 1, a third runs epochs 2-3, a ninth 4-9
    assert pruned_epochs(9, 1, 3) == pytest.approx(1 + 2 / 3 + 6 / 9)
    assert pruned_epochs(4, 1, 2) == pytest.approx(1 + 1 / 2 + 2 / 4)
    assert pruned_epochs(1, 1, 3) == 1.0


def test_an_interrupted_trial_is_queued_again_and_not_counted(tmp_path):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    assert reopen(study, {"x": 1.0}) == 0
    first = study.ask()
    assert first.suggest_float("x", 0.0, 2.0) == 1.0  # the defaults are the first trial
    study.tell(first, 0.5)
    diverged = study.ask()
    diverged.suggest_float("x", 0.0, 2.0)
    diverged.set_user_attr(FAILURE, "diverged")
    study.tell(diverged, state=TrialState.FAIL)
    interrupted = study.ask()
    x = interrupted.suggest_float("x", 0.0, 2.0)  # left RUNNING, as kill -9 leaves it
    assert reopen(study, {"x": 1.0}) == 2  # the completed and the diverged trial count; the interrupted does not
    assert [t.number for t in counted_trials(study)] == [first.number, diverged.number]
    retry = study.ask()
    assert retry.suggest_float("x", 0.0, 2.0) == x  # its settings run again


def test_a_diverging_trial_is_recorded_as_failed_and_the_study_goes_on(tmp_path, make_image_folder, capsys):
    data = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 3, "test": 3})
    # a KD weight so large that the first steps overflow: every KD trial diverges, also the default one
    code = run_experiment.cli([
        "--data", str(data), "--tune", "--methods", "Baseline,KD", "--device", "cpu", "--precision", "fp32",
        "--batch-size", "8", "--teacher-epochs", "1", "--student-epochs", "1", "--set", "teacher.model=ResNet18",
        "--set", "experiment.image_size=8", "--set", "tune.trials=2", "--set", "tune.final_seeds=1",
        "--set", "tune.recipe=false", "--set", "methods.KD.kd_weight=1e30",
        "--set", 'tune.spaces={"KD": {"kd_weight": [1e30, 1e38, "log"]}}'])
    capsys.readouterr()
    folder = next((tmp_path / "logs").glob("final_experiment_*"))
    with open(folder / "tuning_trials.csv", encoding="utf-8") as file:
        rows = [row for row in csv.DictReader(file) if row["method"] == "KD"]
    assert [row["trial"] for row in rows] == ["0", "1"]  # both trials ran: the study went on after a failure
    assert {row["state"] for row in rows} == {"failed"} and all("diverged" in row["failure"] for row in rows)
    summary = json.loads((folder / "experiment_summary.json").read_text())
    study = summary["tuning"]["studies"]["KD"]
    assert study["failed"] == 2 and study["chosen"] == study["defaults"]  # nothing completed: the defaults stand
    records = json.loads((folder / "comparison_results.json").read_text())
    assert [(r["method"], r["status"]) for r in records if r["method"] == "KD"] == [("KD", "failed")]
    assert code == 1  # the final KD run diverges too, and is reported as a failed run


def test_seeds_with_tune_is_refused(capsys, tmp_path):
    code = run_experiment.cli(["--demo", "--tune", "--seeds", "0,1", "--check"])
    err = capsys.readouterr().err
    assert code == 2 and "--seeds does not apply with --tune" in err and not Path("logs").exists()


def test_trials_asked_at_once_draw_with_their_own_seeds(tmp_path):
    """Two processes that ask before either finishes must not draw the same settings."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    drawn = []
    for _ in range(3):  # none is told: all RUNNING, as when processes ask at once
        trial = study.ask()
        reseed(study, trial, seed=0, trials=8)
        drawn.append(trial.suggest_float("x", 0.0, 1.0))
    assert len(set(drawn)) == 3

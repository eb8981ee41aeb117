"""--tune: the reporting split is never read while tuning (with test/, and without it: holdout mode), every study
starts at the defaults and chooses its best completed trial, the final runs train on fresh seeds only, a kill -9
mid-study resumes to the trials of an uninterrupted run, bad tuning input stops before anything is written, and
--check --tune describes the roles, spaces, budget and cost without training."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from PIL import Image

import final
import run_experiment
from conftest import in_one_thread
from kd.data.holdout import hold_out, split_roles, without_reporting
from kd.data.load import load_image_data
from kd.methods import METHODS
from kd.tuning.spaces import final_seeds

REPO = Path(__file__).resolve().parents[1]
SEARCHED_KD = ("kd_weight", "temperature")  # KD's declared search space (kd/methods/kd.py)


# ---------------------------------------------------------------- helpers

def _argv(base: Path, data: Path, *extra: str) -> list[str]:
    """The command line of a tiny tuned experiment: Baseline and KD, ResNet18 teacher and students, 8 px, batch 8,
    3 epochs, 3 trials per study on trial seed 1, one final seed. Zero-initialised residual branches keep the
    students' probabilities off 0 and 1 after so few steps, so that other images give other probabilities."""
    return ["--data", str(data), "--methods", "Baseline,KD", "--teacher-epochs", "1", "--student-epochs", "3",
            "--batch-size", "8", "--device", "cpu", "--precision", "fp32", "--set", "teacher.model=ResNet18",
            "--set", "student.zero_init_residual=true", "--set", "experiment.image_size=8",
            "--logs-dir", str(base / "logs"), "--checkpoints-dir", str(base / "checkpoints"),
            "--tune", "--set", "tune.trials=3", "--set", "tune.trial_seed=1", "--set", "tune.final_seeds=1", *extra]


def _config(base: Path, data: Path, methods=("Baseline", "KD"), **tune) -> dict:
    """tests/conftest.py's tiny_config, tuned: ResNet18 teacher and students, 8 px, batch 8, 3 trials (students
    with zero-initialised residual branches, as _argv)."""
    config = final.default_config()
    config["teacher"].update(model="ResNet18", epochs=1, batch_size=8)
    config["student"].update(epochs=3, batch_size=8, zero_init_residual=True)
    config["experiment"].update(
        data_dir=str(data), methods=list(methods), image_size=8, device="cpu", precision="fp32", num_workers=0,
        logs_dir=str(base / "logs"), checkpoints_dir=str(base / "checkpoints"), tune=True)
    config["tune"].update({"trials": 3, "final_seeds": 1, **tune})
    return config


def _main_one_thread(config: dict, cwd: Path) -> list[dict]:
    return in_one_thread(lambda: final.main(config), cwd)


def _cli_one_thread(argv: list[str], cwd: Path) -> int:
    return in_one_thread(lambda: run_experiment.cli(argv), cwd)


def _spied(function, *args) -> tuple[object, list[dict]]:
    """function(*args) with every evaluation of a training run recorded: the split, whether the data had a
    reporting split at all (a tuning trial's has none), the split's size and the predicted probabilities."""
    import kd.engine.run as engine_run

    calls, original = [], engine_run.evaluate

    def spy(distiller, data, split, *args, **kwargs):
        evaluation = original(distiller, data, split, *args, **kwargs)
        calls.append({"split": split, "trial": "test" not in data.splits, "size": len(data.splits[split]),
                      "probs": evaluation.probs.clone()})
        return evaluation

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_run, "evaluate", spy)
        result = function(*args)
    return result, calls


def _assert_same_trials_other_reports(calls_a: list[dict], calls_b: list[dict], rows: list[dict], val_size: int
                                      ) -> None:
    """Every trial evaluation ran on data without the reporting split, on the selection split only, and gave
    bit-identical probabilities in both experiments; the final runs' reports saw other images."""
    trials_a, trials_b = [c for c in calls_a if c["trial"]], [c for c in calls_b if c["trial"]]
    assert len(trials_a) == sum(int(row["epochs"]) for row in rows) == len(trials_b)  # one per trial epoch
    assert {(c["split"], c["size"]) for c in trials_a + trials_b} == {("val", val_size)}
    assert all(torch.equal(a["probs"], b["probs"]) for a, b in zip(trials_a, trials_b))
    reports_a = [c["probs"] for c in calls_a if c["split"] == "test"]
    reports_b = [c["probs"] for c in calls_b if c["split"] == "test"]
    assert reports_a and len(reports_a) == len(reports_b)
    assert any(not torch.equal(a, b) for a, b in zip(reports_a, reports_b))  # the pair can tell a leak


def _exp_dir(base: Path) -> Path:
    folders = list((base / "logs").glob("final_experiment_*"))
    assert len(folders) == 1, folders
    return folders[0]


def _trial_rows(base: Path) -> list[dict]:
    with open(_exp_dir(base) / "tuning_trials.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _summary(base: Path) -> dict:
    return json.loads((_exp_dir(base) / "experiment_summary.json").read_text())


def _records(base: Path) -> list[dict]:
    return json.loads((_exp_dir(base) / "comparison_results.json").read_text())


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def _chosen(summary: dict) -> dict:
    return {stage: study["chosen"] for stage, study in summary["tuning"]["studies"].items()}


def _rewrite_inverted(folder: Path) -> None:
    """Every image under `folder` replaced by its negative: other pixels, same files and counts."""
    for path in sorted(folder.rglob("*.png")):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        Image.fromarray(255 - pixels, mode="RGB").save(path)


def _assert_bad_input(capsys, base: Path, argv: list[str], *needles: str) -> None:
    capsys.readouterr()
    assert _cli_one_thread(argv, base) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (base / "logs").exists() or not any((base / "logs").iterdir())  # no experiment folder
    assert not (base / "checkpoints").exists() or not any((base / "checkpoints").iterdir())


# ---------------------------------------------------------------- 1. the reporting split is never read

@pytest.fixture(scope="module")
def with_test(module_dir, make_image_folder):
    """Two tuned experiments (in this process, one thread, as the subprocesses run) on data with train/, val/
    and test/ that differ only in the pixels of test/; "a" is also the uninterrupted run of the resume test."""
    data_a = make_image_folder(module_dir / "a" / "data", per_class={"train": 8, "val": 4, "test": 2})
    data_b = module_dir / "b" / "data"
    shutil.copytree(data_a, data_b)
    _rewrite_inverted(data_b / "test")
    calls = {}
    for name, data in (("a", data_a), ("b", data_b)):
        code, calls[name] = _spied(_cli_one_thread, _argv(module_dir / name, data), module_dir / name)
        assert code == 0
    return {"a": module_dir / "a", "b": module_dir / "b", "calls": calls}


def test_tuning_never_reads_test(with_test):
    base_a, base_b = with_test["a"], with_test["b"]
    data_a, data_b = base_a / "data" / "test", base_b / "data" / "test"
    files = sorted(p.relative_to(data_a) for p in data_a.rglob("*.png"))
    assert files == sorted(p.relative_to(data_b) for p in data_b.rglob("*.png")) and len(files) == 6
    for name in files:  # the two test/ folders: same files, other pixels
        assert not np.array_equal(np.asarray(Image.open(data_a / name)), np.asarray(Image.open(data_b / name)))
    summary_a, summary_b = _summary(base_a), _summary(base_b)
    assert summary_a["data"]["fingerprint"] != summary_b["data"]["fingerprint"]  # the runs saw other data
    assert summary_a["tuning"]["held_out"] is None  # test/ exists: val/ selects, test/ reports

    rows_a, rows_b = _trial_rows(base_a), _trial_rows(base_b)
    assert [(r["method"], r["stage"]) for r in rows_a] == [("Baseline", "1")] * 3 + [("KD", "2")] * 3
    assert _without_seconds(rows_a) == _without_seconds(rows_b)
    assert _chosen(summary_a) == _chosen(summary_b)
    assert set(_chosen(summary_a)) == {"recipe", "KD"}
    _assert_same_trials_other_reports(with_test["calls"]["a"], with_test["calls"]["b"], rows_a, val_size=12)


@pytest.fixture(scope="module")
def holdout_pair(module_dir, make_image_folder):
    """Holdout mode (no test/): two Baseline-only tuned experiments whose val/ (the reporting split there)
    differs only in its pixels."""
    data_a = make_image_folder(module_dir / "ha" / "data", per_class={"train": 8, "val": 3})
    data_b = module_dir / "hb" / "data"
    shutil.copytree(data_a, data_b)
    _rewrite_inverted(data_b / "val")
    calls = {}
    for name, data in (("ha", data_a), ("hb", data_b)):
        config = _config(module_dir / name, data, methods=("Baseline",), holdout_fraction=0.25)
        _, calls[name] = _spied(_main_one_thread, config, module_dir / name)
    return module_dir / "ha", module_dir / "hb", calls


def test_holdout_mode_never_reads_val(holdout_pair):
    base_a, base_b, calls = holdout_pair
    summary_a, summary_b = _summary(base_a), _summary(base_b)
    assert summary_a["tuning"]["held_out"] == "0.25 of train/ (stratified, seed 0)"
    rows_a, rows_b = _trial_rows(base_a), _trial_rows(base_b)
    assert len(rows_a) == 3 and {r["method"] for r in rows_a} == {"Baseline"}
    assert _without_seconds(rows_a) == _without_seconds(rows_b)
    assert _chosen(summary_a) == _chosen(summary_b)
    # 2 of each class's 8 train images select, the other 6 train, val/ reports
    assert summary_a["data"]["counts"] == {"train": 18, "val": 6, "test": 9}
    assert summary_a["data"]["fingerprint"] != summary_b["data"]["fingerprint"]
    _assert_same_trials_other_reports(calls["ha"], calls["hb"], rows_a, val_size=6)


def test_hold_out_splits_train_by_class(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class={"train": 9, "val": 3})
    # class c gets 3 more train images: a share is drawn per class
    make_image_folder(tmp_path / "extra", classes=("a", "b", "c"), per_class={"train": 3}, seed=5)
    for path in (tmp_path / "extra" / "train" / "c").iterdir():
        shutil.copy(path, root / "train" / "c" / f"x_{path.name}")
    data = load_image_data(root, 8, num_workers=0)
    assert data.counts == {"train": 30, "val": 9}

    def paths(split) -> list[tuple[str, int]]:
        subset = split.files
        samples = subset.dataset.samples if hasattr(subset, "dataset") else subset.samples
        index = subset.indices if hasattr(subset, "indices") else range(len(samples))
        return [(str(samples[i][0]), int(samples[i][1])) for i in index]

    held = hold_out(data, 0.25, seed=3)
    assert set(held.splits) == {"train", "val", "test"}
    train, select = paths(held.splits["train"]), paths(held.splits["val"])
    assert not set(train) & set(select)  # the held-out images never train
    assert sorted(train + select) == sorted(paths(data.splits["train"]))  # train/ less the held out, and it
    assert paths(held.splits["test"]) == paths(data.splits["val"])  # val/ reports
    for split in ("train", "val"):  # labels and decoded images follow the files
        assert [label for _, label in paths(held.splits[split])] == held.splits[split].labels.tolist()
    original = {p: data.splits["train"].images[i] for i, p in enumerate(paths(data.splits["train"]))}
    for split in ("train", "val"):
        for i, p in enumerate(paths(held.splits[split])):
            assert torch.equal(held.splits[split].images[i], original[p])
    held_per_class = torch.bincount(held.splits["val"].labels, minlength=3).tolist()
    train_per_class = torch.bincount(held.splits["train"].labels, minlength=3).tolist()
    assert held_per_class == [round(0.25 * 9), round(0.25 * 9), round(0.25 * 12)] == [2, 2, 3]
    assert train_per_class == [7, 7, 9]
    assert held.counts == {"train": 23, "val": 7, "test": 9}
    assert held.held_out == "0.25 of train/ (stratified, seed 3)"
    assert paths(hold_out(data, 0.25, seed=3).splits["val"]) == select  # the seed fixes the draw
    assert paths(hold_out(data, 0.25, seed=4).splits["val"]) != select
    assert "test" not in without_reporting(held).splits  # what a trial sees
    roles = split_roles(held, tuning=True)
    assert "(23 images)" in roles and "held-out images (7)" in roles and "reporting on val/ (9)" in roles


# ---------------------------------------------------------------- 2. defaults first, the best chosen

def test_first_trial_is_the_defaults_and_the_best_is_chosen(with_test):
    base = with_test["a"]
    rows, studies = _trial_rows(base), _summary(base)["tuning"]["studies"]
    student = final.STUDENT_CONFIG
    assert set(studies["KD"]["space"]) == set(METHODS["KD"].search_space) == set(SEARCHED_KD)
    expected_defaults = {"recipe": {"lr": student["lr"], "weight_decay": student["weight_decay"]},
                         "KD": {key: final.METHODS_CONFIG["KD"][key] for key in SEARCHED_KD}}
    for stage, method in (("recipe", "Baseline"), ("KD", "KD")):
        mine = [row for row in rows if row["method"] == method]
        assert [row["trial"] for row in mine] == ["0", "1", "2"]
        first = mine[0]
        assert json.loads(first["settings"]) == expected_defaults[stage] == studies[stage]["defaults"]
        assert first["state"] == "complete"  # the defaults are never pruned: nothing to compare them with yet
        assert len({row["settings"] for row in mine}) == 3  # the other trials tried other settings
        chosen = studies[stage]["chosen"]
        assert set(chosen) == set(expected_defaults[stage])
        complete = [row for row in mine if row["state"] == "complete"]
        chosen_row = next(row for row in complete if json.loads(row["settings"]) == chosen)
        assert float(chosen_row["best_val"]) >= float(first["best_val"])
        best = max(float(row["best_val"]) for row in complete)
        assert float(chosen_row["best_val"]) == best
        # on a tie the earliest trial wins
        assert chosen_row is next(row for row in complete if float(row["best_val"]) == best)
        for row in mine:
            scores = json.loads(row["val_per_epoch"])
            assert float(row["best_val"]) == max(scores) and int(row["epochs"]) == len(scores)


# ---------------------------------------------------------------- 3. final seeds disjoint from the trial seed

def test_final_seeds_skip_the_trial_seed():
    assert final_seeds({"final_seeds": 3, "trial_seed": 0}) == [1, 2, 3]
    assert final_seeds({"final_seeds": 3, "trial_seed": 1}) == [0, 2, 3]
    assert final_seeds({"final_seeds": 2, "trial_seed": 7}) == [0, 1]
    assert final_seeds({"final_seeds": 1, "trial_seed": 0}) == [1]
    assert final_seeds({"final_seeds": 1, "trial_seed": 1}) == [0]
    config = final.default_config()
    config["experiment"].update(tune=True, seeds=[0, 1])
    config["tune"].update(final_seeds=2, trial_seed=0)
    assert final.validate_config(config)["experiment"]["seeds"] == [1, 2]  # tuning replaces the seeds


def test_final_runs_use_fresh_seeds_only(with_test):
    base = with_test["a"]
    records, summary = _records(base), _summary(base)["tuning"]
    assert summary["trial_seed"] == 1 and summary["final_seeds"] == [0]  # tune.final_seeds=1, trial seed skipped
    assert _summary(base)["config"]["experiment"]["seeds"] == [0]
    assert {row["seed"] for row in _trial_rows(base)} == {"1"}  # every trial on the trial seed, only there
    assert all(record["seed"] == 0 for record in records), [(r["method"], r["seed"]) for r in records]
    students = [record for record in records if record["method"] != "Teacher"]
    assert {record["method"] for record in students} == {"Baseline", "KD"}
    assert all(record["variant"] in ("tuned", "default") for record in students)


# ---------------------------------------------------------------- 4. kill -9 mid-study, then --resume

def _kill_mid_study(argv: list[str], base: Path, stage: str, timeout: float = 120.0) -> int:
    """Start the tuned experiment in a subprocess and kill -9 it once the study of `stage` has a completed trial
    and a running one that has reported an epoch's val score; returns the running trial's number."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    code = "import sys, run_experiment; sys.exit(run_experiment.cli(sys.argv[1:]))"
    with open(base / f"killed_{stage}.stderr", "w") as err:  # a file: a full pipe would stall the child
        process = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=base, env=env,
                                   stdout=subprocess.DEVNULL, stderr=err)
    deadline, storage, seen = time.monotonic() + timeout, None, None
    try:
        while True:
            assert process.poll() is None, f"ended before the kill: {(base / err.name).read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for a trial of {stage} to run"
            journals = list((base / "logs").glob("final_experiment_*/tuning.journal"))
            if journals and storage is None:
                storage = optuna.storages.JournalStorage(
                    optuna.storages.journal.JournalFileBackend(str(journals[0])))
            running = []
            if storage is not None:
                try:
                    trials = optuna.load_study(study_name=f"{journals[0].parent.name}/{stage}",
                                               storage=storage).get_trials(deepcopy=False)
                except KeyError:  # not created yet
                    trials = []
                if any(t.state == TrialState.COMPLETE for t in trials):
                    running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
            seen = (seen or time.monotonic()) if running else None
            # a moment after the epoch's report (the pruner writes to the journal right after it), and never while
            # the child holds the journal's lock: a stale lock would make the resumed run wait out Optuna's 30 s
            if seen is not None and time.monotonic() - seen > 0.05 and not Path(f"{journals[0]}.lock").exists():
                process.send_signal(signal.SIGKILL)
                assert process.wait(timeout=30) == -signal.SIGKILL
                return running[0].number
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _essentials(records: list[dict]) -> list[tuple]:
    return [(r["method"], r.get("variant"), r["seed"], r["best_accuracy"], r.get("test_accuracy"),
             [h["score"] for h in r.get("history", [])]) for r in records]


def test_sigkill_mid_study_then_resume(module_dir, with_test):
    """Killed mid-trial in stage 1, resumed and killed again mid-trial in stage 2, then resumed to the end: the
    trials, the chosen settings and the final runs equal those of the uninterrupted experiment "a"."""
    reference = with_test["a"]
    data, killed = reference / "data", module_dir / "killed"
    killed.mkdir()
    argv = _argv(killed, data)
    numbers = {"recipe": _kill_mid_study(argv, killed, "recipe")}
    exp_dir = _exp_dir(killed)
    assert not (exp_dir / "tuning_trials.csv").exists()  # written once a study is done
    numbers["KD"] = _kill_mid_study([*argv, "--resume"], killed, "KD")
    assert _exp_dir(killed) == exp_dir  # continued, not restarted
    assert [row["method"] for row in _trial_rows(killed)] == ["Baseline"] * 3  # stage 1 done, stage 2 cut off
    assert not _summary(killed).get("finished")

    assert _cli_one_thread([*argv, "--resume"], killed) == 0
    assert _exp_dir(killed) == exp_dir and _summary(killed)["finished"]
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(exp_dir / "tuning.journal")))
    for stage, number in numbers.items():
        trials = optuna.load_study(study_name=f"{exp_dir.name}/{stage}", storage=storage).get_trials(deepcopy=False)
        interrupted = trials[number]
        assert interrupted.state == TrialState.FAIL and "failure" not in interrupted.user_attrs  # not counted
        assert interrupted.intermediate_values  # it had reported an epoch when it was killed
        assert len(trials) == 4  # the 3 counted trials, and the interrupted one

    expected_rows, rows = _trial_rows(reference), _trial_rows(killed)
    keys = ("method", "stage", "trial", "settings", "seed", "val_per_epoch", "best_val", "epochs", "state")
    for method in ("Baseline", "KD"):
        mine = [row for row in rows if row["method"] == method]
        assert [row["trial"] for row in mine] == ["0", "1", "2"]  # tune.trials rows, each index once
        assert [{k: row[k] for k in keys} for row in mine] == \
            [{k: row[k] for k in keys} for row in expected_rows if row["method"] == method]
    assert _chosen(_summary(killed)) == _chosen(_summary(reference))
    assert _essentials(_records(killed)) == _essentials(_records(reference))


# ---------------------------------------------------------------- 5. bad input

def test_bad_tuning_input(tmp_path, make_image_folder, capsys):
    data = make_image_folder(tmp_path / "data", per_class={"train": 6, "val": 3, "test": 2})
    few = make_image_folder(tmp_path / "few", per_class={"train": 2, "val": 2})
    cases = [
        (data, ["--set", 'tune.spaces={"KD": {"nope": [1, 2]}}'], ("tune.spaces.KD.nope", "unknown setting")),
        (data, ["--set", 'tune.spaces={"Nope": {"beta": [1, 2]}}'], ("tune.spaces.Nope", "unknown method")),
        (data, ["--set", 'tune.spaces={"KD": {"temperature": [2, 1]}}'], ("tune.spaces.KD.temperature", "inverted")),
        (data, ["--set", 'tune.spaces={"KD": {"temperature": [3, 3]}}'], ("tune.spaces.KD.temperature", "empty")),
        (data, ["--set", 'tune.lr_range=[0.3, 0.001]'], ("lr_range",)),
        (data, ["--set", 'tune.storage="postgresql://nobody@127.0.0.1:1/none"'],
         ("tune.storage", "postgresql://nobody@127.0.0.1:1/none")),
        (few, [], ("holding out", "class 'a'", "test/")),
        (data, ["--set", 'tune.spaces={"KD": {"temperature": [5, 8]}}'],
         ("temperature 4.0", "outside", "tune.spaces.KD.temperature")),
        (data, ["--set", "student.lr=0.5"], ("student.lr 0.5", "outside", "lr_range")),
        (data, ["--seeds", "0,1"], ("--seeds", "--tune")),
    ]
    for folder, extra, needles in cases:
        _assert_bad_input(capsys, tmp_path, _argv(tmp_path, folder, *extra), *needles)


# ---------------------------------------------------------------- 6. --check --tune

def test_check_tune_prints_the_plan_and_writes_nothing(tmp_path, make_image_folder, capsys):
    data = make_image_folder(tmp_path / "data", per_class={"train": 7, "val": 3})  # no test/: holdout mode
    argv = _argv(tmp_path, data, "--methods", "Baseline,KD,AT", "--check",
                 "--set", 'tune.spaces={"KD": {"temperature": [2, 6]}}')
    capsys.readouterr()
    assert _cli_one_thread(argv, tmp_path) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    roles = [line for line in lines if line.startswith("splits: ")]
    assert roles and roles[-1] == (
        "splits: training on train/ less its held-out 0.15 of train/ (stratified, seed 0) (18 images); selection "
        "(best epoch, every trial) on the held-out images (3); reporting on val/ (9), never read while tuning")
    stage1 = [line for line in lines if line.startswith("tuning stage 1")]
    assert len(stage1) == 1 and "lr 0.001..0.3 (log), weight_decay 1e-05..0.01 (log) on Baseline" in stage1[0]
    start = lines.index("tuning stage 2, each method's own settings:")
    assert lines[start + 1] == "  KD: temperature 2..6, kd_weight 0.1..10 (log)"  # tune.spaces replaced a range
    assert lines[start + 2] == "  AT: beta 10..10000 (log)"
    budget = [line for line in lines if line.startswith("budget: ")]
    assert len(budget) == 1 and budget[0].startswith("budget: 3 trials per study, the defaults first, 3 studies "
                                                     "(9 trials) on seed 1")
    estimate = [line for line in lines if line.startswith("estimated time: tuning ~")]
    assert len(estimate) == 1 and "final runs ~" in estimate[0]
    assert "final runs: every method at its chosen settings and at its defaults" in out and "seeds 0, never used" in out
    assert lines[-1] == "check passed: data and config are valid; nothing was trained"
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").glob("final_experiment_*"))
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").rglob("*.pt"))

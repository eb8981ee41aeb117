"""Metrics worked out by hand, aggregation across seeds, and one real tiny experiment's report files.

The hand-worked examples spell out their arithmetic in comments so a reader can check the expected
numbers without running anything.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re

import numpy as np
import pytest
from PIL import Image
from scipy import stats

import final
import run_experiment
from kd.results.metrics import (
    ECE_BINS,
    agreement,
    expected_calibration_error,
    mean_std,
    nll,
    paired_comparison,
    reliability_bins,
    top_k_accuracy,
)
from kd.results.record import RunRecord
from kd.results.table import CSV_COLUMNS, MEAN_COLUMNS, aggregate, format_table


def _ece(probs, labels) -> float:
    return expected_calibration_error(reliability_bins(np.asarray(probs, dtype=float), np.asarray(labels)))


# ----------------------------------------------------------------------------------------------- ECE

def test_ece_hand_worked_example():
    # 4 images, 4 classes, 15 bins; bin b holds confidences in (b/15, (b+1)/15], index = ceil(15 c) - 1.
    probs = np.array([
        [0.90, 0.05, 0.03, 0.02],  # conf 0.90, predicts 0, label 0: correct.  15*0.90 = 13.5 -> bin 13
        [0.90, 0.05, 0.03, 0.02],  # conf 0.90, predicts 0, label 1: wrong.    bin 13
        [0.10, 0.62, 0.18, 0.10],  # conf 0.62, predicts 1, label 1: correct.  15*0.62 =  9.3 -> bin 9
        [0.30, 0.25, 0.25, 0.20],  # conf 0.30, predicts 0, label 1: wrong.    15*0.30 =  4.5 -> bin 4
    ])
    labels = np.array([0, 1, 1, 1])
    bins = reliability_bins(probs, labels)
    assert len(bins["count"]) == ECE_BINS == 15
    assert bins["count"] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0]
    assert bins["confidence"][13] == pytest.approx(0.90) and bins["accuracy"][13] == 0.5
    assert bins["confidence"][9] == pytest.approx(0.62) and bins["accuracy"][9] == 1.0
    assert bins["confidence"][4] == pytest.approx(0.30) and bins["accuracy"][4] == 0.0
    assert all(bins["confidence"][b] is None and bins["accuracy"][b] is None
               for b in range(15) if b not in (4, 9, 13))
    # ECE = Σ n_b/N |acc_b − conf_b|
    #     = 2/4 |0.5 − 0.90| + 1/4 |1 − 0.62| + 1/4 |0 − 0.30|
    #     = 0.5 * 0.40       + 0.25 * 0.38    + 0.25 * 0.30
    #     = 0.20             + 0.095          + 0.075          = 0.37
    assert expected_calibration_error(bins) == pytest.approx(0.37, abs=1e-12)


def test_ece_perfectly_calibrated_is_zero():
    # Four images at confidence 0.75 (15*0.75 = 11.25 -> bin 11), three right and one wrong: acc 0.75;
    # two images at confidence 1.0 (bin 14), both right: acc 1.0.  Every bin has acc == conf, ECE = 0.
    probs = np.array([[0.75, 0.25]] * 4 + [[0.0, 1.0]] * 2)
    labels = np.array([0, 0, 0, 1, 1, 1])
    bins = reliability_bins(probs, labels)
    assert bins["count"][11] == 4 and bins["count"][14] == 2 and sum(bins["count"]) == 6
    assert bins["accuracy"][11] == 0.75 and bins["accuracy"][14] == 1.0
    assert expected_calibration_error(bins) == pytest.approx(0.0, abs=1e-15)


def test_ece_overconfident_single_bin():
    # Two images both at confidence 0.8 (15*0.8 = 12 exactly -> ceil 12 - 1 = bin 11: (11/15, 12/15]),
    # one right: acc 0.5; ECE = 2/2 * |0.5 - 0.8| = 0.3.
    probs = np.array([[0.8, 0.2], [0.8, 0.2]])
    bins = reliability_bins(probs, np.array([0, 1]))
    assert bins["count"][11] == 2 and sum(bins["count"]) == 2
    assert expected_calibration_error(bins) == pytest.approx(0.3, abs=1e-12)


def test_reliability_bin_edges():
    # Confidence exactly 1/15 (uniform over 15 classes) is the right edge of bin 0: (0, 1/15].
    uniform = np.full((1, 15), 1 / 15)
    assert reliability_bins(uniform, np.array([0]))["count"][0] == 1
    # Confidence 2/15 is the right edge of bin 1, not the left edge of bin 2.
    two = np.array([[2 / 15] + [13 / 15 / 14] * 14])
    assert two.argmax() == 0
    assert reliability_bins(two, np.array([0]))["count"][1] == 1
    # Confidence 1.0 goes to the last bin (14), and the bins list still has exactly 15 entries.
    certain = np.array([[0.0, 1.0, 0.0]])
    bins = reliability_bins(certain, np.array([1]))
    assert len(bins["count"]) == 15 and bins["count"][14] == 1 and sum(bins["count"]) == 1
    assert expected_calibration_error(bins) == 0.0  # conf 1, correct
    # A confidence of exactly 0 (not a probability row, but the function must not go out of range) joins bin 0.
    zero = reliability_bins(np.array([[0.0, 0.0]]), np.array([0]))
    assert zero["count"][0] == 1


# ----------------------------------------------------------------------------------------------- NLL

def test_nll_hand_worked_example():
    # p_true = 0.5 and 0.25: NLL = -(ln 0.5 + ln 0.25)/2 = (ln 2 + ln 4)/2 = 1.5 ln 2 ≈ 1.0397
    probs = np.array([[0.5, 0.5], [0.25, 0.75]])
    labels = np.array([0, 0])
    assert nll(probs, labels) == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-12)
    assert nll(probs, labels) == pytest.approx(1.5 * math.log(2), rel=1e-12)


def test_nll_three_classes_with_an_absent_class():
    # Class 2 never occurs in the labels; p_true = 0.2 (label 1) and 0.5 (label 0):
    # NLL = (ln 5 + ln 2)/2 = ln 10 / 2 ≈ 1.1513
    probs = np.array([[0.6, 0.2, 0.2], [0.5, 0.3, 0.2]])
    assert nll(probs, np.array([1, 0])) == pytest.approx(math.log(10) / 2, rel=1e-12)


# ------------------------------------------------------------------------------------ top-k, agreement

def test_top_k_accuracy_by_hand():
    probs = np.array([
        [0.5, 0.3, 0.2],  # label 1: ranked 2nd -> in top-2, not top-1
        [0.1, 0.2, 0.7],  # label 2: ranked 1st -> in top-1
        [0.6, 0.3, 0.1],  # label 2: ranked 3rd -> only in top-3
    ])
    labels = np.array([1, 2, 2])
    assert top_k_accuracy(probs, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(probs, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(probs, labels, 3) == 1.0
    assert top_k_accuracy(probs, labels, 5) == 1.0  # k > K is capped at K: every label is in the "top 5"


def test_top_1_agrees_with_argmax_on_ties():
    # A tie [0.4, 0.4, 0.2]: argmax picks class 0; top-1 must count the same (stable sort), so label 1 misses.
    probs = np.array([[0.4, 0.4, 0.2]])
    assert top_k_accuracy(probs, np.array([1]), 1) == 0.0
    assert top_k_accuracy(probs, np.array([0]), 1) == 1.0
    assert top_k_accuracy(probs, np.array([1]), 2) == 1.0


def test_agreement_by_hand():
    # positions 0 and 2 agree, 1 and 3 differ: 2/4
    assert agreement(np.array([0, 1, 2, 1]), np.array([0, 2, 2, 0])) == 0.5
    assert agreement(np.array([3, 3, 3]), np.array([3, 3, 3])) == 1.0
    assert agreement(np.array([0, 1]), np.array([1, 0])) == 0.0


# ------------------------------------------------------------------------------------ seed statistics

def test_mean_std_sample_std():
    # 0.70, 0.74, 0.72: mean 0.72; deviations -0.02, 0.02, 0 -> Σ = 0.0008; /(3-1) = 0.0004; sqrt = 0.02
    mean, std = mean_std([0.70, 0.74, 0.72])
    assert mean == pytest.approx(0.72) and std == pytest.approx(0.02)
    assert mean_std([0.5]) == (0.5, None)  # one run has no spread: shown empty, not 0.0000


def test_paired_comparison_by_hand():
    method = {0: 0.80, 1: 0.85, 2: 0.83, 7: 0.99}    # seed 7 only here: ignored
    baseline = {0: 0.78, 1: 0.80, 2: 0.82, 9: 0.10}  # seed 9 only here: ignored
    gain, p_value = paired_comparison(method, baseline)
    # d = 0.02, 0.05, 0.01; mean(d) = 0.08/3 ≈ 0.026667
    assert gain == pytest.approx(0.08 / 3, rel=1e-9)
    # scipy's paired t-test on exactly the same arrays (seeds 0, 1, 2)
    a, b = np.array([0.80, 0.85, 0.83]), np.array([0.78, 0.80, 0.82])
    assert p_value == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
    # By hand: deviations of d from its mean: -1/150, 7/300, -1/60; squares in 1/90000: 4 + 49 + 25 = 78,
    # so Σ = 78/90000 = 13/15000; sample variance = 13/30000; sd(d) = sqrt(13/30000) ≈ 0.020817
    d = a - b
    sd = math.sqrt(13 / 30000)
    assert np.std(d, ddof=1) == pytest.approx(sd, rel=1e-9)
    # t = mean(d) / (sd(d)/sqrt(3)) = (0.08/3) / (sqrt(13)/300) = 8/sqrt(13) ≈ 2.2188
    t = (0.08 / 3) / (sd / math.sqrt(3))
    assert t == pytest.approx(8 / math.sqrt(13), rel=1e-9)
    # two-sided p = 2 * P(T_2 > t); for 2 degrees of freedom P(T_2 > t) = (1 - t/sqrt(t² + 2))/2,
    # so p = 1 - (8/sqrt 13)/sqrt(64/13 + 2) = 1 - 8/sqrt(90) ≈ 0.156726
    p_hand = 2 * stats.t.sf(t, df=2)
    assert p_hand == pytest.approx(1 - 8 / math.sqrt(90), rel=1e-9)
    assert p_value == pytest.approx(p_hand, rel=1e-7)
    assert p_value == pytest.approx(0.156726, abs=1e-6)


def test_paired_comparison_single_seed_and_no_overlap():
    # One shared seed: the gain is that seed's difference, no test
    gain, p_value = paired_comparison({0: 0.75, 3: 0.5}, {0: 0.5, 4: 0.25})
    assert gain == 0.25 and p_value is None
    # No shared seed at all
    assert paired_comparison({1: 0.5}, {2: 0.5}) == (None, None)


def test_paired_comparison_identical_differences_exact():
    # d = 0.25, 0.25, 0.25 exactly (dyadic numbers): no spread, no t statistic
    gain, p_value = paired_comparison({0: 0.75, 1: 0.5, 2: 1.0}, {0: 0.5, 1: 0.25, 2: 0.75})
    assert gain == 0.25 and p_value is None


def test_paired_comparison_identical_differences_from_real_accuracies():
    # Accuracies are correct/total fractions. KD beats Baseline by exactly 3 of 30 val images in every
    # seed: 27/30 vs 24/30, 24/30 vs 21/30, 21/30 vs 18/30. The differences are the same number (1/10),
    # so there is no t statistic: p must be None (report: "no test possible"), not a p-value computed
    # from floating-point rounding noise in the differences.
    method = {0: 27 / 30, 1: 24 / 30, 2: 21 / 30}
    baseline = {0: 24 / 30, 1: 21 / 30, 2: 18 / 30}
    gain, p_value = paired_comparison(method, baseline)
    assert gain == pytest.approx(0.1)
    assert p_value is None, f"identical 3-image gains got p = {p_value!r}, which report.md calls significant"


# ------------------------------------------------------------------------------------------ aggregate

def _record(method, seed, acc, **extra):
    """A stored record (comparison_results.json's form) read back as the results code reads it."""
    return RunRecord.from_json(_stored(method, seed, acc, **extra))


def _stored(method, seed, acc, **extra):
    return {"method": method, "model": "ResNet18", "teacher": "ResNet50" if method == "KD" else "None",
            "seed": seed, "status": "ok", "best_accuracy": acc, "final_accuracy": acc - 0.01,
            "training_time": 10.0 + seed, "epochs": 3, "test_accuracy": acc - 0.02, "top5_accuracy": 1.0,
            "nll": 0.5, "ece": 0.1, "teacher_agreement": None if method == "Teacher" else 0.8,
            "params": 11, "flops": 22, "latency_ms": 1.5, **extra}


def _crafted_records():
    return [
        _record("Teacher", 0, 0.90, model="ResNet50"),
        _record("Baseline", 0, 0.70), _record("KD", 0, 0.75),
        _record("Baseline", 1, 0.74), _record("KD", 1, 0.76),
        _record("Baseline", 2, 0.72), _record("KD", 2, 0.77),
        # a failed run must not count, even if it carries an accuracy
        RunRecord.from_json({"method": "KD", "model": "ResNet18", "teacher": "ResNet50", "seed": 3, "status": "failed",
                             "reason": "loss became NaN", "best_accuracy": 0.10, "epochs": 3, "training_time": 1.0}),
        RunRecord.from_json({"method": "Baseline", "model": "ResNet18", "teacher": "None", "seed": 3,
                             "status": "failed", "reason": "out of memory"}),
    ]


def test_aggregate_across_seeds_by_hand():
    rows = aggregate(_crafted_records())
    assert [r["method"] for r in rows] == ["Teacher", "Baseline", "KD"]
    teacher, baseline, kd = rows

    assert teacher["best_accuracy"] == 0.90 and teacher["best_accuracy_std"] is None and teacher["n_seeds"] == 1
    assert teacher["model"] == "ResNet50"
    assert teacher["gain_vs_baseline"] is None and teacher["p_value_vs_baseline"] is None
    assert teacher["teacher_agreement"] is None

    # Baseline 0.70, 0.74, 0.72: mean 0.72; sample std sqrt((0.02² + 0.02² + 0²)/2) = sqrt(0.0004) = 0.02
    assert baseline["n_seeds"] == 3
    assert baseline["best_accuracy"] == pytest.approx(0.72)
    assert baseline["best_accuracy_std"] == pytest.approx(0.02)
    assert baseline["gain_vs_baseline"] == 0.0 and baseline["p_value_vs_baseline"] is None

    # KD 0.75, 0.76, 0.77 (the failed seed 3 with 0.10 excluded): mean 0.76; std sqrt((0.01² + 0 + 0.01²)/2) = 0.01
    assert kd["n_seeds"] == 3
    assert kd["best_accuracy"] == pytest.approx(0.76)
    assert kd["best_accuracy_std"] == pytest.approx(0.01)
    # paired d = 0.05, 0.02, 0.05: mean 0.04; deviations 0.01, -0.02, 0.01 -> Σ 0.0006, /2 = 0.0003,
    # sd = 0.017321, se = sd/sqrt 3 = 0.01, t = 0.04/0.01 = 4; p = 1 - 4/sqrt(4² + 2) = 1 - 4/sqrt 18 ≈ 0.057191
    assert kd["gain_vs_baseline"] == pytest.approx(0.04)
    assert kd["p_value_vs_baseline"] == pytest.approx(1 - 4 / math.sqrt(18), rel=1e-6)
    assert kd["p_value_vs_baseline"] == pytest.approx(
        stats.ttest_rel([0.75, 0.76, 0.77], [0.70, 0.74, 0.72]).pvalue, rel=1e-9)

    # other means over the successful seeds only: training_time 10, 11, 12 -> 11
    assert kd["training_time"] == pytest.approx(11.0) and baseline["training_time"] == pytest.approx(11.0)
    assert kd["final_accuracy"] == pytest.approx(0.75) and kd["test_accuracy"] == pytest.approx(0.74)
    assert kd["teacher_agreement"] == pytest.approx(0.8)
    assert set(CSV_COLUMNS) <= set(kd)


def test_aggregate_single_seed_has_no_std_and_no_p():
    rows = aggregate([_record("Teacher", 0, 0.9), _record("Baseline", 0, 0.6), _record("KD", 0, 0.65)])
    kd = rows[2]
    assert kd["n_seeds"] == 1 and kd["best_accuracy_std"] is None
    assert kd["gain_vs_baseline"] == pytest.approx(0.05) and kd["p_value_vs_baseline"] is None


def test_format_table_mean_pm_std():
    table = format_table(aggregate(_crafted_records()))
    lines = table.splitlines()
    teacher_line = next(line for line in lines if line.strip().startswith("Teacher"))
    baseline_line = next(line for line in lines if line.strip().startswith("Baseline"))
    kd_line = next(line for line in lines if line.strip().startswith("KD"))
    assert "0.9000" in teacher_line and "±" not in teacher_line  # one seed: no std shown
    assert "0.7200 ± 0.0200" in baseline_line
    assert "0.7600 ± 0.0100" in kd_line
    assert "11.00" in kd_line  # training time, 2 decimals
    assert "loss became NaN" not in table


# ----------------------------------------------------------------------------- a real tiny experiment

PNGS = ["accuracy_comparison.png", "learning_curves.png", "accuracy_vs_time.png", "reliability.png",
        "confusion_Teacher.png"]


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def _num(text):
    return None if text == "" else float(text)


def _check_csv_against_records(exp, records):
    rows = _read_csv(exp / "comparison_results.csv")
    assert rows[0] == CSV_COLUMNS
    table = [dict(zip(CSV_COLUMNS, row)) for row in rows[1:]]
    assert [row["method"] for row in table] == ["Teacher", "Baseline", "KD"]
    ok = [r for r in records if r["status"] == "ok"]
    base = {r["seed"]: r["best_accuracy"] for r in ok if r["method"] == "Baseline"}
    for row in table:
        runs = [r for r in ok if r["method"] == row["method"]]
        acc = np.array([r["best_accuracy"] for r in runs], dtype=float)
        assert int(row["n_seeds"]) == len(runs)
        assert float(row["best_accuracy"]) == pytest.approx(np.mean(acc), rel=1e-12, abs=1e-15)
        if len(acc) > 1:
            assert float(row["best_accuracy_std"]) == pytest.approx(np.std(acc, ddof=1), rel=1e-9, abs=1e-15)
        else:
            assert row["best_accuracy_std"] == ""  # one seed: empty, not 0.0
        assert float(row["training_time"]) == pytest.approx(np.mean([r["training_time"] for r in runs]), rel=1e-12)
        for key in MEAN_COLUMNS:
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                assert _num(row[key]) == pytest.approx(np.mean(values), rel=1e-12, abs=1e-15), (row["method"], key)
            else:
                assert row[key] == "", (row["method"], key)
        for key in ("params", "flops"):
            assert int(row[key]) == runs[0][key]
        if row["method"] == "Teacher":
            assert row["gain_vs_baseline"] == "" and row["p_value_vs_baseline"] == ""
        elif row["method"] == "Baseline":
            assert float(row["gain_vs_baseline"]) == 0.0 and row["p_value_vs_baseline"] == ""
        else:
            seeds = sorted(set(base) & {r["seed"] for r in runs})
            a = np.array([next(r["best_accuracy"] for r in runs if r["seed"] == s) for s in seeds])
            b = np.array([base[s] for s in seeds])
            assert float(row["gain_vs_baseline"]) == pytest.approx(np.mean(a - b), abs=1e-12)
            if row["p_value_vs_baseline"] == "":
                assert np.ptp(a - b) == 0  # only identical paired differences leave no p-value
            else:
                assert float(row["p_value_vs_baseline"]) == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
    return table


def _check_records(records, val_count, num_classes):
    assert [(r["method"], r["seed"]) for r in records] == [
        ("Teacher", 0), ("Baseline", 0), ("KD", 0), ("Baseline", 1), ("KD", 1)]
    for r in records:
        where = f"{r['method']} seed {r['seed']}"
        assert r["status"] == "ok", where
        matrix = np.array(r["confusion_matrix"])
        assert matrix.shape == (num_classes, num_classes), where
        assert matrix.sum() == val_count and (matrix >= 0).all(), where
        assert matrix.sum(axis=1).tolist() == [val_count // num_classes] * num_classes, where  # true-class rows
        # val accuracy at the best epoch is the confusion matrix's trace over the val count
        assert np.trace(matrix) / val_count == pytest.approx(r["best_accuracy"]), where
        per_class = matrix.diagonal() / matrix.sum(axis=1)
        assert r["per_class_accuracy"] == pytest.approx(per_class.tolist()), where
        assert 0.0 <= r["ece"] <= 1.0 and r["nll"] > 0.0, where
        assert r["ece"] == pytest.approx(expected_calibration_error(r["reliability"])), where
        assert sum(r["reliability"]["count"]) == val_count, where
        assert r["top5_accuracy"] == 1.0, where  # 3 classes: top-5 is capped at top-3, always right
        if r["method"] == "Teacher":
            assert r["teacher_agreement"] is None
        else:
            assert 0.0 <= r["teacher_agreement"] <= 1.0, where
        assert isinstance(r["params"], int) and r["params"] > 1_000_000, where  # a ResNet18
        assert isinstance(r["flops"], int) and r["flops"] > 0, where
        assert r["latency_ms"] > 0.0, where
    assert len({(r["params"], r["flops"]) for r in records}) == 1  # teacher and students are all ResNet18 here


def _check_summary(summary, records, table):
    env = summary["environment"]
    for key in ("python", "torch", "torchvision", "device_name", "threads", "precision"):
        assert key in env, key
    assert env["precision"] == "fp32" and isinstance(env["threads"], int) and env["threads"] >= 1
    assert summary["data"]["counts"] == {"train": 18, "val": 9, "test": 6}
    assert summary["data"]["classes"] == ["a", "b", "c"]
    teacher = summary["teacher"]
    path = teacher["path"]
    assert path == records[0]["checkpoint"]
    with open(path, "rb") as handle:
        assert teacher["sha256"] == hashlib.sha256(handle.read()).hexdigest()
    assert teacher["accuracy"] == records[0]["best_accuracy"] and teacher["reused"] is False
    methods = summary["methods"]
    assert list(methods) == ["Teacher", "Baseline", "KD"]
    for row in table:
        entry = methods[row["method"]]
        assert set(entry) >= {"mean", "std", "n", "gain_vs_baseline", "p_value_vs_baseline"}
        assert entry["mean"] == float(row["best_accuracy"]) and entry["std"] == _num(row["best_accuracy_std"])
        assert entry["n"] == int(row["n_seeds"])
        assert entry["gain_vs_baseline"] == _num(row["gain_vs_baseline"])
        assert entry["p_value_vs_baseline"] == _num(row["p_value_vs_baseline"])
    students = {m: e["mean"] for m, e in methods.items() if m != "Teacher"}
    assert summary["best_method"] == max(students, key=students.get)
    assert summary["failed_runs"] == []


def test_tiny_experiment_report_files_and_rebuild(tmp_path, tiny_config, make_image_folder, capsys):
    make_image_folder(tmp_path / "data", per_class={"train": 6, "val": 3, "test": 2})
    tiny_config["experiment"].update(methods=["Baseline", "KD"], seeds=[0, 1])
    tiny_config["teacher"].update(model="ResNet18", epochs=1)
    records = final.main(tiny_config)

    dirs = list((tmp_path / "logs").glob("final_experiment_*"))
    assert len(dirs) == 1, dirs
    exp = dirs[0]
    stored = json.loads((exp / "comparison_results.json").read_text(encoding="utf-8"))
    assert stored == json.loads(json.dumps(records))  # what main returned is what it stored
    summary = json.loads((exp / "experiment_summary.json").read_text(encoding="utf-8"))
    best = summary["best_method"]
    assert best in ("Baseline", "KD")

    for name in ("comparison_results.json", "comparison_results.csv", "experiment_summary.json", "report.md"):
        assert (exp / name).is_file(), name
    pngs = PNGS + [f"confusion_{best}.png"]
    for name in pngs:
        path = exp / name
        assert path.is_file(), name
        assert path.stat().st_size > 2000, name
        with Image.open(path) as image:
            assert image.format == "PNG", name
            assert image.size[0] >= 200 and image.size[1] >= 200, (name, image.size)
            image.verify()

    _check_records(stored, val_count=9, num_classes=3)
    table = _check_csv_against_records(exp, stored)
    _check_summary(summary, stored, table)

    report = (exp / "report.md").read_text(encoding="utf-8")
    for name in pngs:
        assert re.search(r"!\[[^\]]*\]\(" + re.escape(name) + r"\)", report), name
    assert "not significant" in report  # 2 seeds on 9 val images: never a significant win
    assert "significantly better" not in report and "significantly worse" not in report
    assert "| KD | ResNet18 | ResNet18 | common |" in report
    teacher_row = next(line for line in report.splitlines() if line.startswith("| Teacher |")).split(" | ")
    assert teacher_row[5:7] == ["", "1"]  # one seed: the std cell is empty, not 0.0000

    # --report rebuilds the same CSV and report.md byte for byte from the stored records
    csv_before = (exp / "comparison_results.csv").read_bytes()
    md_before = (exp / "report.md").read_bytes()
    capsys.readouterr()
    assert run_experiment.cli(["--report", str(exp)]) == 0
    assert "KNOWLEDGE DISTILLATION COMPARISON RESULTS" in capsys.readouterr().out
    assert (exp / "comparison_results.csv").read_bytes() == csv_before
    assert (exp / "report.md").read_bytes() == md_before
    assert json.loads((exp / "experiment_summary.json").read_text(encoding="utf-8")) == summary
    for name in pngs:
        with Image.open(exp / name) as image:
            image.verify()


def test_report_on_folder_without_results_exits_2(tmp_path, capsys):
    empty = tmp_path / "not_an_experiment"
    empty.mkdir()
    assert run_experiment.cli(["--report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "comparison_results.json" in err
    assert list(empty.iterdir()) == []  # nothing written into the wrong folder
    assert run_experiment.cli(["--report", str(tmp_path / "missing")]) == 2
    # a folder whose results file is unreadable also exits 2
    (empty / "comparison_results.json").write_text("{not json", encoding="utf-8")
    (empty / "experiment_summary.json").write_text("{}", encoding="utf-8")
    assert run_experiment.cli(["--report", str(empty)]) == 2


def test_each_method_has_one_colour_in_every_plot(tmp_path, monkeypatch):
    from matplotlib.colors import to_hex

    from kd.results import plots
    drawn = {}

    def keep_axes(fig, path, ax=None, *args, **kwargs) -> str:  # instead of writing the PNG
        drawn[path.stem] = ax
        return path.name

    monkeypatch.setattr(plots, "_save", keep_axes)
    bins = {"count": [0] * 14 + [3], "confidence": [None] * 14 + [0.99], "accuracy": [None] * 14 + [1.0]}
    records = [_record(method, seed, acc, history=[{"score": acc - 0.1}, {"score": acc}], reliability=bins,
                       confusion_matrix=[[3, 0], [0, 3]])
               for method, acc in (("Teacher", 0.9), ("Baseline", 0.7), ("KD", 0.75), ("AT", 0.72))
               for seed in ((0,) if method == "Teacher" else (0, 1))]
    rows = aggregate(records)
    plots.write_plots(tmp_path, records, rows, ["a", "b"], "KD")

    students = [row["method"] for row in rows if row["method"] != "Teacher"]
    bars = {method: to_hex(bar.get_facecolor()) for method, bar in zip(students, drawn["accuracy_comparison"].patches)}
    assert len(set(bars.values())) == len(students)  # distinct methods, distinct colours
    for figure in ("learning_curves", "reliability"):
        lines = {line.get_label(): to_hex(line.get_color()) for line in drawn[figure].get_lines()}
        assert {method: lines[method] for method in students} == bars, figure
    points = {c.get_label(): to_hex(c.get_facecolor()[0]) for c in drawn["accuracy_vs_time"].collections}
    assert {method: points[method] for method in students} == bars


def test_a_record_reads_back_into_its_typed_parts_and_writes_the_same_json():
    stored = _stored("DML", 0, 0.7, best_epoch=2, final_test_accuracy=0.66, images_per_s=50.0,
                     student_init_sha256="ab", first_batch_sha256="cd", history=[{"score": 0.7}],
                     per_class_accuracy=[0.5, 0.9], confusion_matrix=[[1, 1], [0, 2]],
                     reliability={"count": [4]}, protocol="common", peer_accuracies=[0.7, 0.72])
    record = RunRecord.from_json(stored)
    assert record.result.best_epoch == 2 and record.metrics.nll == 0.5 and record.cost.flops == 22
    assert record.teacher_file is None and record.reason is None and record.ok
    assert record.extras == {"peer_accuracies": [0.7, 0.72]}  # the method's own field, beside the common ones
    assert record.to_json() == stored

    # a teacher used as it is: no training log in this experiment, so none of its keys
    reused = _stored("Teacher", 0, 0.9, best_epoch=7, checkpoint="t.pth", sha256="ab", reused=True,
                     per_class_accuracy=[0.9], confusion_matrix=[[9]], reliability={"count": [9]}, protocol="common")
    record = RunRecord.from_json(reused)
    assert record.training is None and record.teacher_file.reused is True and record.to_json() == reused

    failed = {"method": "KD", "model": "ResNet18", "teacher": "ResNet50", "seed": 1, "status": "failed",
              "protocol": "common", "reason": "diverged"}
    assert RunRecord.from_json(failed).result is None and RunRecord.from_json(failed).to_json() == failed

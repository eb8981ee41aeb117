"""The comparison table: one row per method, means over seeds with their spread, and the paired gain against
the reference method; printed on the console and written as the CSV."""
from __future__ import annotations

import json
from collections.abc import Iterable

import pandas as pd

from kd.methods import REFERENCE
from kd.results.metrics import mean_std, paired_comparison
from kd.results.record import TEACHER, TUNED, RunRecord

TABLE_COLUMNS = ["method", "model", "teacher", "best_accuracy", "training_time", "epochs", "protocol"]
MEAN_COLUMNS = ["final_accuracy", "test_accuracy", "top5_accuracy", "nll", "ece", "teacher_agreement"]
TUNING_COLUMNS = ["settings", "trials", "trials_pruned", "trials_failed", "tuning_device_hours"]
CSV_COLUMNS = TABLE_COLUMNS + ["best_accuracy_std", "n_seeds", *MEAN_COLUMNS, "gain_vs_baseline",
                               "p_value_vs_baseline", "params", "flops", "latency_ms", "images_per_s", "variant",
                               "test_accuracy_std", "final_test_accuracy", *TUNING_COLUMNS]


def _mean(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def compared_on(records: list[RunRecord]) -> str:
    """The accuracy gains and tests use: val's (where the best epoch is chosen) as ever, but the reporting
    split's in a tuned experiment, whose val also chose the settings (see kd/data/holdout.py)."""
    return "test_accuracy" if any(r.variant for r in records) else "best_accuracy"


def aggregate(records: list[RunRecord]) -> list[dict]:
    """One row per method (the teacher first, then in run order), and per variant in a tuned experiment:
    means over seeds, std, the paired comparison with the reference method (Baseline) on `compared_on`."""
    finished = [r for r in records if r.ok]
    key = compared_on(records)
    runs_of = sorted(dict.fromkeys((r.method, r.variant) for r in finished), key=lambda m: m[0] != TEACHER)
    references = [r for r in finished if r.method == REFERENCE and r.variant in ("", TUNED)]
    reference = {r.seed: getattr(r.result, key) for r in references}
    common_reference = all(r.protocol == "common" for r in references)
    rows = []
    for method, variant in runs_of:
        runs = [r for r in finished if (r.method, r.variant) == (method, variant)]
        results, metrics, cost = [r.result for r in runs], [r.metrics for r in runs], runs[0].cost
        logs = [r.training for r in runs if r.training]  # a teacher used as it is trained nothing here
        mean, std = mean_std([result.best_accuracy for result in results])
        is_reference = method == REFERENCE and variant in ("", TUNED)
        gain, p_value = (None, None) if method == TEACHER or is_reference else paired_comparison(
            {r.seed: getattr(r.result, key) for r in runs}, reference)
        protocol = runs[0].protocol
        if protocol != "common" or not common_reference:
            p_value = None  # other student settings: a difference to the reference is not the method's effect alone
        rows.append({"method": method, "model": runs[0].model, "teacher": runs[0].teacher, "protocol": protocol,
                     "comparable": protocol == "common" and common_reference,
                     "best_accuracy": mean, "training_time": _mean(result.training_time for result in results),
                     "epochs": results[0].epochs, "best_accuracy_std": std, "n_seeds": len(runs),
                     "final_accuracy": _mean(result.final_accuracy for result in results),
                     "test_accuracy": _mean(result.test_accuracy for result in results),
                     # the last epoch's, as the tables that report the last test epoch do
                     "final_test_accuracy": _mean(log.final_test_accuracy for log in logs),
                     "top5_accuracy": _mean(m.top5_accuracy for m in metrics),
                     "nll": _mean(m.nll for m in metrics), "ece": _mean(m.ece for m in metrics),
                     "teacher_agreement": _mean(m.teacher_agreement for m in metrics),
                     "test_accuracy_std": mean_std([r.test_accuracy for r in results])[1]
                     if all(r.test_accuracy is not None for r in results) else None,
                     "variant": variant, **dict.fromkeys(TUNING_COLUMNS),  # add_tuning_columns fills them
                     "gain_vs_baseline": 0.0 if is_reference and reference else gain,
                     "p_value_vs_baseline": p_value,
                     "params": cost.params, "flops": cost.flops, "latency_ms": cost.latency_ms,
                     "images_per_s": _mean(log.images_per_s for log in logs)})
    return rows


def add_tuning_columns(rows: list[dict], tuning: dict) -> None:
    """A tuned experiment's rows gain the settings they trained with and, for the tuned ones, their study:
    trials run, pruned and failed, and its device time (a method's own study; the reference's is the recipe's)."""
    studies = tuning["studies"]
    by_method = {study["method"]: study for stage, study in studies.items() if stage == study["method"]}
    recipe = next((study for stage, study in studies.items() if stage != study["method"]), None)  # stage 1's
    for row in rows:
        if not row.get("variant"):
            continue
        study = by_method.get(row["method"]) or (recipe if row["method"] == REFERENCE else None)
        chosen = "chosen" if row["variant"] == TUNED else "defaults"
        # the reference at its defaults trained with your recipe; every other run with the tuned one
        settings = {**(recipe[chosen] if recipe and row["method"] == REFERENCE else tuning["recipe"])}
        if row["method"] in by_method:
            settings.update(by_method[row["method"]][chosen])
        row["settings"] = json.dumps(settings, sort_keys=True)
        if row["variant"] == TUNED and study is not None:
            row.update(trials=study["trials"], trials_pruned=study["pruned"], trials_failed=study["failed"],
                       tuning_device_hours=study["device_hours"])


def row_label(row: dict) -> str:
    """A row's method, with its variant in a tuned experiment: "KD (tuned)", "KD (default)"."""
    return f"{row['method']} ({row['variant']})" if row.get("variant") else row["method"]


def format_table(rows: list[dict]) -> str:
    """The console table; `mean ± std` when a method ran with several seeds."""
    shown = pd.DataFrame(rows, columns=CSV_COLUMNS)
    shown["best_accuracy"] = [f"{r['best_accuracy']:.4f}" + (f" ± {r['best_accuracy_std']:.4f}"
                                                              if r["n_seeds"] > 1 else "") for r in rows]
    shown["training_time"] = shown["training_time"].map("{:.2f}".format)
    shown["method"] = [row_label(r) for r in rows]
    columns = TABLE_COLUMNS
    if any(r.get("variant") for r in rows):  # tuned: the reporting split's accuracy is the one to read
        shown["test_accuracy"] = [_with_std(r["test_accuracy"], r["test_accuracy_std"], r["n_seeds"]) for r in rows]
        columns = [*TABLE_COLUMNS[:4], "test_accuracy", *TABLE_COLUMNS[4:]]
    rule = "=" * 80
    return "\n".join(["KNOWLEDGE DISTILLATION COMPARISON RESULTS", rule,
                      shown[columns].to_string(index=False), rule])


def _with_std(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return ""
    return f"{mean:.4f}" + (f" ± {std:.4f}" if n > 1 and std is not None else "")

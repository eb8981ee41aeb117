"""The comparison table: one row per method, means over seeds with their spread, and the paired gain against
the reference method; printed on the console and written as the CSV."""
from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from kd.methods import REFERENCE
from kd.results.metrics import mean_std, paired_comparison
from kd.results.record import TEACHER, RunRecord

TABLE_COLUMNS = ["method", "model", "teacher", "best_accuracy", "training_time", "epochs", "protocol"]
MEAN_COLUMNS = ["final_accuracy", "test_accuracy", "top5_accuracy", "nll", "ece", "teacher_agreement"]
CSV_COLUMNS = TABLE_COLUMNS + ["best_accuracy_std", "n_seeds", *MEAN_COLUMNS, "gain_vs_baseline",
                               "p_value_vs_baseline", "params", "flops", "latency_ms", "images_per_s"]


def _mean(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def aggregate(records: list[RunRecord]) -> list[dict]:
    """One row per method (the teacher first, then in run order): means over seeds, std, the paired
    comparison with the reference method (Baseline)."""
    finished = [r for r in records if r.ok]
    methods = sorted(dict.fromkeys(r.method for r in finished), key=lambda m: m != TEACHER)
    reference = {r.seed: r.result.best_accuracy for r in finished if r.method == REFERENCE}
    common_reference = all(r.protocol == "common" for r in finished if r.method == REFERENCE)
    rows = []
    for method in methods:
        runs = [r for r in finished if r.method == method]
        results, metrics, cost = [r.result for r in runs], [r.metrics for r in runs], runs[0].cost
        logs = [r.training for r in runs if r.training]  # a teacher used as it is trained nothing here
        mean, std = mean_std([result.best_accuracy for result in results])
        gain, p_value = (None, None) if method in (TEACHER, REFERENCE) else paired_comparison(
            {r.seed: r.result.best_accuracy for r in runs}, reference)
        protocol = runs[0].protocol
        if protocol != "common" or not common_reference:
            p_value = None  # other student settings: a difference to the reference is not the method's effect alone
        rows.append({"method": method, "model": runs[0].model, "teacher": runs[0].teacher, "protocol": protocol,
                     "comparable": protocol == "common" and common_reference,
                     "best_accuracy": mean, "training_time": _mean(result.training_time for result in results),
                     "epochs": results[0].epochs, "best_accuracy_std": std, "n_seeds": len(runs),
                     "final_accuracy": _mean(result.final_accuracy for result in results),
                     "test_accuracy": _mean(result.test_accuracy for result in results),
                     "top5_accuracy": _mean(m.top5_accuracy for m in metrics),
                     "nll": _mean(m.nll for m in metrics), "ece": _mean(m.ece for m in metrics),
                     "teacher_agreement": _mean(m.teacher_agreement for m in metrics),
                     "gain_vs_baseline": 0.0 if method == REFERENCE and reference else gain,
                     "p_value_vs_baseline": p_value,
                     "params": cost.params, "flops": cost.flops, "latency_ms": cost.latency_ms,
                     "images_per_s": _mean(log.images_per_s for log in logs)})
    return rows


def format_table(rows: list[dict]) -> str:
    """The console table; `mean ± std` when a method ran with several seeds."""
    shown = pd.DataFrame(rows, columns=CSV_COLUMNS)
    shown["best_accuracy"] = [f"{r['best_accuracy']:.4f}" + (f" ± {r['best_accuracy_std']:.4f}"
                                                              if r["n_seeds"] > 1 else "") for r in rows]
    shown["training_time"] = shown["training_time"].map("{:.2f}".format)
    rule = "=" * 80
    return "\n".join(["KNOWLEDGE DISTILLATION COMPARISON RESULTS", rule,
                      shown[TABLE_COLUMNS].to_string(index=False), rule])

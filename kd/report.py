"""Results on disk and on screen: the experiment folder, its log, the JSON/CSV/summary files, the table."""
from __future__ import annotations

import logging
import platform
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch
import torchvision
from tqdm import tqdm

from kd.checkpoint import write_json, write_text

log = logging.getLogger("kd")

TABLE_COLUMNS = ["method", "model", "teacher", "best_accuracy", "training_time", "epochs"]
CSV_COLUMNS = TABLE_COLUMNS + ["best_accuracy_std", "n_seeds", "final_accuracy", "test_accuracy"]


class _TqdmHandler(logging.Handler):
    """Console log lines that do not tear through the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(log_file: Path | None = None) -> None:
    """Console (INFO) and, once the experiment folder exists, `final_experiment.log` (DEBUG)."""
    log.setLevel(logging.DEBUG)
    log.propagate = False
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        console = _TqdmHandler(logging.INFO)
        console.setFormatter(formatter)
        log.addHandler(console)
    if log_file is not None:
        for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            log.removeHandler(handler)
            handler.close()
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(formatter)
        log.addHandler(file_handler)


def create_experiment_dir(logs_dir: Path) -> tuple[Path, str]:
    """A new `final_experiment_YYYYMMDD_HHMMSS` folder; a suffix keeps same-second starts apart."""
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    logs_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        name = f"final_experiment_{stamp}" + (f"_{attempt + 1}" if attempt else "")
        try:
            (logs_dir / name).mkdir()
            return logs_dir / name, name.removeprefix("final_experiment_")
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new experiment folder in {logs_dir}")


def aggregate(records: list[dict]) -> pd.DataFrame:
    """One row per method (in first-seen order, Teacher first): means over seeds, std, count."""
    frame = pd.DataFrame([r for r in records if r.get("status", "ok") == "ok"])
    order = list(dict.fromkeys(frame["method"]))
    grouped = frame.groupby("method", sort=False)
    table = grouped.agg(model=("model", "first"), teacher=("teacher", "first"),
                        best_accuracy=("best_accuracy", "mean"), training_time=("training_time", "mean"),
                        epochs=("epochs", "first"), best_accuracy_std=("best_accuracy", "std"),
                        n_seeds=("seed", "count"), final_accuracy=("final_accuracy", "mean"),
                        test_accuracy=("test_accuracy", "mean"))
    table["best_accuracy_std"] = table["best_accuracy_std"].fillna(0.0)
    return table.loc[order].reset_index()[CSV_COLUMNS]


def format_table(table: pd.DataFrame) -> str:
    shown = table[TABLE_COLUMNS].copy()
    if (table["n_seeds"] > 1).any():
        shown["best_accuracy"] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(table["best_accuracy"],
                                                                        table["best_accuracy_std"])]
    else:
        shown["best_accuracy"] = shown["best_accuracy"].map("{:.4f}".format)
    shown["training_time"] = shown["training_time"].map("{:.2f}".format)
    rule = "=" * 80
    return "\n".join(["KNOWLEDGE DISTILLATION COMPARISON RESULTS", rule,
                      shown.to_string(index=False), rule])


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "platform": platform.platform(),
            "threads": torch.get_num_threads()}


def write_results(exp_dir: Path, records: list[dict], summary: dict) -> pd.DataFrame:
    """Rewrite comparison_results.json/.csv and experiment_summary.json (each atomically)."""
    write_json(exp_dir / "comparison_results.json", records)
    table = aggregate(records)
    write_text(exp_dir / "comparison_results.csv", table.to_csv(index=False))
    baseline = table.loc[table["method"] == "Baseline", "best_accuracy"]
    students = table[table["method"] != "Teacher"]
    per_method = {
        row.method: {"mean": row.best_accuracy, "std": row.best_accuracy_std, "n": int(row.n_seeds),
                     "gain_vs_baseline": (row.best_accuracy - baseline.iloc[0]) if len(baseline) else None}
        for row in table.itertuples()}
    best = students.loc[students["best_accuracy"].idxmax(), "method"] if len(students) else None
    failed = [{"method": r["method"], "seed": r["seed"], "reason": r["reason"]}
              for r in records if r.get("status") == "failed"]
    write_json(exp_dir / "experiment_summary.json",
               {**summary, "environment": {**environment(), **summary.get("environment", {})},
                "methods": per_method, "best_method": best, "failed_runs": failed})
    return table

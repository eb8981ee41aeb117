"""Results on disk and on screen: the experiment folder, its log, the JSON/CSV/summary files, the table,
the plots and report.md. Everything after training is rebuilt from the stored records alone, so
`--report DIR` reproduces the same files."""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch
import torchvision
from tqdm import tqdm

from kd import distributed
from kd.checkpoint import write_json, write_text
from kd.config import UserError
from kd.metrics import mean_std, paired_comparison

log = logging.getLogger("kd")

TABLE_COLUMNS = ["method", "model", "teacher", "best_accuracy", "training_time", "epochs", "protocol"]
MEAN_COLUMNS = ["final_accuracy", "test_accuracy", "top5_accuracy", "nll", "ece", "teacher_agreement"]
CSV_COLUMNS = TABLE_COLUMNS + ["best_accuracy_std", "n_seeds", *MEAN_COLUMNS, "gain_vs_baseline",
                               "p_value_vs_baseline", "params", "flops", "latency_ms", "images_per_s"]

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
        console = _TqdmHandler(logging.INFO if distributed.is_main() else logging.WARNING)
        console.setFormatter(formatter)
        log.addHandler(console)
    if log_file is not None and distributed.is_main():
        for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            log.removeHandler(handler)
            handler.close()
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(formatter)
        log.addHandler(file_handler)


def create_experiment_dir(logs_dir: Path) -> tuple[Path, str]:
    """A new `final_experiment_YYYYMMDD_HHMMSS` folder; a suffix keeps same-second starts apart.
    In a torchrun job rank 0 creates it and every process gets its name."""
    return distributed.broadcast_object(_new_experiment_dir(logs_dir) if distributed.is_main() else None)


def _new_experiment_dir(logs_dir: Path) -> tuple[Path, str]:
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    try:
        logs_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1000):
            name = f"final_experiment_{stamp}" + (f"_{attempt + 1}" if attempt else "")
            try:
                (logs_dir / name).mkdir()
                return logs_dir / name, name.removeprefix("final_experiment_")
            except FileExistsError:
                continue
    except OSError as err:
        raise UserError(f"cannot create an experiment folder in '{logs_dir}' ({err.strerror}): choose a "
                        "writable --logs-dir") from None
    raise UserError(f"could not find a free experiment folder name in '{logs_dir}'")


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def aggregate(records: list[dict]) -> list[dict]:
    """One row per method (Teacher first, then in run order): means over seeds, std, paired statistics."""
    finished = [r for r in records if r.get("status", "ok") == "ok"]
    methods = sorted(dict.fromkeys(r["method"] for r in finished), key=lambda m: m != "Teacher")
    baseline = {r["seed"]: r["best_accuracy"] for r in finished if r["method"] == "Baseline"}
    common_baseline = all(r.get("protocol", "common") == "common" for r in finished if r["method"] == "Baseline")
    rows = []
    for method in methods:
        runs = [r for r in finished if r["method"] == method]
        mean, std = mean_std([r["best_accuracy"] for r in runs])
        gain, p_value = (None, None) if method in ("Teacher", "Baseline") else paired_comparison(
            {r["seed"]: r["best_accuracy"] for r in runs}, baseline)
        protocol = runs[0].get("protocol", "common")
        if protocol != "common" or not common_baseline:
            p_value = None  # other student settings: a difference to Baseline is not the method's effect alone
        rows.append({"method": method, "model": runs[0]["model"], "teacher": runs[0]["teacher"], "protocol": protocol,
                     "comparable": protocol == "common" and common_baseline,
                     "best_accuracy": mean, "training_time": _mean(runs, "training_time"),
                     "epochs": runs[0]["epochs"], "best_accuracy_std": std, "n_seeds": len(runs),
                     **{key: _mean(runs, key) for key in MEAN_COLUMNS},
                     "gain_vs_baseline": 0.0 if method == "Baseline" and baseline else gain,
                     "p_value_vs_baseline": p_value,
                     **{key: runs[0].get(key) for key in ("params", "flops", "latency_ms")},
                     "images_per_s": _mean(runs, "images_per_s")})
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{device.type}: {cpu}, {os.cpu_count()} cores"


def experiment_summary(setup, exp_dir: Path) -> dict:
    """The parts of experiment_summary.json known before training (config, environment, data)."""
    data = setup.data
    return {"experiment_dir": str(exp_dir), "stamp": setup.stamp, "config": setup.config,
            "environment": {"python": platform.python_version(), "torch": str(torch.__version__),
                            "torchvision": str(torchvision.__version__), "platform": platform.platform(),
                            "device": str(setup.runtime.device), "device_name": device_name(setup.runtime.device),
                            "threads": torch.get_num_threads(), "precision": setup.runtime.precision,
                            "processes": distributed.world_size(), "backend": distributed.backend()},
            "data": {"root": str(data.root), "fingerprint": data.fingerprint, "classes": data.class_names,
                     "counts": data.counts,
                     "image_size": data.image_size, "stem": setup.stem, "ignored_files": data.ignored_files,
                     "skipped_images": data.bad_images, "normalization": setup.normalization},
            "models": {role: {"name": spec.name, "source": spec.source, "builder": spec.builder,
                              "weights": spec.weights, "stem": spec.stem}
                       for role, spec in (("teacher", setup.teacher_spec), ("student", setup.student_spec))}}


def _csv_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def write_results(exp_dir: Path, records: list[dict], summary: dict, final: bool = False) -> list[dict]:
    """Rewrite comparison_results.json/.csv and experiment_summary.json (each atomically); at the end
    of the experiment (`final`) also the plots and report.md. Only rank 0 of a torchrun job writes."""
    rows = aggregate(records)
    if not distributed.is_main():
        return rows
    write_json(exp_dir / "comparison_results.json", records)
    lines = [",".join(CSV_COLUMNS)] + [",".join(_csv_value(row[c]) for c in CSV_COLUMNS) for row in rows]
    write_text(exp_dir / "comparison_results.csv", "\n".join(lines) + "\n")
    students = [row for row in rows if row["method"] != "Teacher" and row["protocol"] == "common"]
    best = max(students, key=lambda row: row["best_accuracy"])["method"] if students else None
    failed = [{"method": r["method"], "seed": r["seed"], "reason": r["reason"]}
              for r in records if r.get("status") == "failed"]
    summary.update(methods={row["method"]: {"mean": row["best_accuracy"], "std": row["best_accuracy_std"],
                                            "n": row["n_seeds"], "gain_vs_baseline": row["gain_vs_baseline"],
                                            "p_value_vs_baseline": row["p_value_vs_baseline"]} for row in rows},
                   best_method=best, failed_runs=failed)
    write_json(exp_dir / "experiment_summary.json", summary)
    if final:
        from kd.plots import write_plots  # matplotlib is imported only when plots are drawn
        from kd.report_md import write_report_md
        plots = write_plots(exp_dir, records, rows, summary["data"]["classes"], best)
        write_report_md(exp_dir, rows, records, summary, plots)
    return rows


def read_experiment(exp_dir: Path) -> tuple[list[dict], dict]:
    """The stored records and summary of an experiment folder."""
    try:
        records = json.loads((exp_dir / "comparison_results.json").read_text(encoding="utf-8"))
        summary = json.loads((exp_dir / "experiment_summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"'{exp_dir}' holds no readable comparison_results.json/experiment_summary.json "
                        f"({err.__class__.__name__}): pass an experiment folder logs/final_experiment_*") from None
    return records, summary


def rebuild(exp_dir: str | Path) -> list[dict]:
    """`--report DIR`: rebuild CSV, summary, plots and report.md from the stored records."""
    records, summary = read_experiment(Path(exp_dir))
    return write_results(Path(exp_dir), records, summary, final=True)

"""Results on disk: the experiment folder, its JSON/CSV/summary files, and (at the end) the plots and
report.md. Everything after training is rebuilt from the stored records alone, so `--report DIR` reproduces
the same files."""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torchvision

from kd.engine import distributed
from kd.engine.checkpoint import write_json, write_text
from kd.errors import UserError
from kd.results.record import DEFAULT, TEACHER, RunRecord, run_name
from kd.results.table import CSV_COLUMNS, add_tuning_columns, aggregate, compared_on, row_label


@dataclass(frozen=True)
class ExperimentFolder:
    """`logs/final_experiment_<stamp>/`: an experiment's results, log and its runs' resume state."""
    path: Path
    stamp: str  # its timestamp, also in the TensorBoard run names

    def resume_path(self, name: str, seed: int) -> Path:
        """Where a run keeps its state between epochs (removed once its record is written)."""
        return self.path / "resume" / f"{name}_seed{seed}.pt"


def create_experiment_dir(logs_dir: Path) -> ExperimentFolder:
    """A new `final_experiment_YYYYMMDD_HHMMSS` folder; a suffix keeps same-second starts apart.
    In a torchrun job rank 0 creates it and every process gets its name."""
    return distributed.broadcast_object(_new_experiment_dir(logs_dir) if distributed.is_main() else None)


def _new_experiment_dir(logs_dir: Path) -> ExperimentFolder:
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    try:
        logs_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1000):
            name = f"final_experiment_{stamp}" + (f"_{attempt + 1}" if attempt else "")
            try:
                (logs_dir / name).mkdir()
                return ExperimentFolder(logs_dir / name, name.removeprefix("final_experiment_"))
            except FileExistsError:
                continue
    except OSError as err:
        raise UserError(f"cannot create an experiment folder in '{logs_dir}' ({err.strerror}): choose a "
                        "writable --logs-dir") from None
    raise UserError(f"could not find a free experiment folder name in '{logs_dir}'")


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


def experiment_summary(setup, folder: ExperimentFolder) -> dict:
    """The parts of experiment_summary.json known before training (config, environment, data) of an
    experiment's setup (kd/experiment/setup.py)."""
    data = setup.data
    return {"experiment_dir": str(folder.path), "stamp": folder.stamp, "config": setup.config,
            "environment": {"python": platform.python_version(), "torch": str(torch.__version__),
                            "torchvision": str(torchvision.__version__), "platform": platform.platform(),
                            "device": str(setup.runtime.device), "device_name": device_name(setup.runtime.device),
                            "threads": torch.get_num_threads(), "precision": setup.runtime.precision,
                            "compiled": setup.runtime.compile, "processes": distributed.world_size(),
                            "backend": distributed.backend()},
            "data": {"root": str(data.root), "fingerprint": data.fingerprint, "classes": data.class_names,
                     "counts": data.counts,
                     "image_size": data.image_size, "stem": setup.stem, "ignored_files": data.ignored_files,
                     "skipped_images": data.bad_images, "normalization": setup.normalization,
                     **({"official_files": data.official} if data.official is not None else {})},
            "models": {role: {"name": spec.name, "source": spec.source, "builder": spec.builder,
                              "weights": spec.weights, "stem": spec.stem}
                       for role, spec in (("teacher", setup.teacher_spec), ("student", setup.student_spec))}}


def _csv_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def write_records(exp_dir: Path, records: list[RunRecord]) -> None:
    """Rewrite comparison_results.json, atomically (rank 0 of a torchrun job writes)."""
    write_json(exp_dir / "comparison_results.json", [record.to_json() for record in records])


def write_results(exp_dir: Path, records: list[RunRecord], summary: dict, final: bool = False) -> list[dict]:
    """Rewrite what follows from the records, comparison_results.csv and experiment_summary.json (each
    atomically), and return the table's rows; at the end of the experiment (`final`) also the plots and
    report.md. Only rank 0 of a torchrun job writes."""
    rows = aggregate(records)
    if "tuning" in summary:
        add_tuning_columns(rows, summary["tuning"])
    if not distributed.is_main():
        return rows
    lines = [",".join(CSV_COLUMNS)] + [",".join(_csv_value(row[c]) for c in CSV_COLUMNS) for row in rows]
    write_text(exp_dir / "comparison_results.csv", "\n".join(lines) + "\n")
    # a tuned experiment ranks its methods at their chosen settings, on the reporting split
    students = [row for row in rows if row["method"] != TEACHER and row["protocol"] == "common"
                and row["variant"] != DEFAULT]
    key = compared_on(records)
    best = max(students, key=lambda row: row[key])["method"] if students else None
    failed = [{"method": run_name(r.method, r.variant), "seed": r.seed, "reason": r.reason} for r in records
              if not r.ok]
    summary.update(methods={row_label(row): {"mean": row["best_accuracy"], "std": row["best_accuracy_std"],
                                             "n": row["n_seeds"], "gain_vs_baseline": row["gain_vs_baseline"],
                                             "p_value_vs_baseline": row["p_value_vs_baseline"],
                                             **({"test_mean": row["test_accuracy"], "settings": row["settings"],
                                                 "test_std": row["test_accuracy_std"]} if row["variant"] else {})}
                            for row in rows},
                   best_method=best, failed_runs=failed)
    write_json(exp_dir / "experiment_summary.json", summary)
    if final:
        from kd.results.plots import write_plots  # matplotlib is imported only when plots are drawn
        from kd.results.report_md import write_report_md
        shown = [r for r in records if r.variant != DEFAULT]  # the figures show each method once, tuned
        plots = write_plots(exp_dir, shown, [row for row in rows if row.get("variant") != DEFAULT],
                            summary["data"]["classes"], best)
        if "tuning" in summary:
            from kd.tuning.figures import write_tuning_figures
            plots.update(write_tuning_figures(exp_dir, summary))
        write_report_md(exp_dir, rows, records, summary, plots)
    return rows


def read_experiment(exp_dir: Path) -> tuple[list[RunRecord], dict]:
    """The stored records and summary of an experiment folder."""
    try:
        records = json.loads((exp_dir / "comparison_results.json").read_text(encoding="utf-8"))
        summary = json.loads((exp_dir / "experiment_summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"'{exp_dir}' holds no readable comparison_results.json/experiment_summary.json "
                        f"({err.__class__.__name__}): pass an experiment folder logs/final_experiment_*") from None
    return [RunRecord.from_json(record) for record in records], summary


def rebuild(exp_dir: str | Path) -> list[dict]:
    """`--report DIR`: rebuild CSV, summary, plots and report.md from the stored records (which it leaves as
    they are)."""
    records, summary = read_experiment(Path(exp_dir))
    return write_results(Path(exp_dir), records, summary, final=True)

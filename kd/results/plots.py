"""The experiment's figures, drawn from the stored records only (so `--report` redraws them)."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from kd.engine.checkpoint import atomic_write  # noqa: E402
from kd.methods import REFERENCE  # noqa: E402
from kd.results.record import TEACHER, RunRecord  # noqa: E402


def _save(fig: plt.Figure, path: Path, ax: plt.Axes | None = None, title: str = "", xlabel: str = "",
          ylabel: str = "", legend: str = "lower right") -> str:
    """Label the axes, then write the figure as PNG atomically; returns the file name."""
    if ax is not None:
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.legend(loc=legend, fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path.name


def _runs_by_method(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Finished runs grouped by method, in run order."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        if record.ok:
            groups.setdefault(record.method, []).append(record)
    return groups


def method_colors(methods: list[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per method (in the table's order), the same in every figure."""
    return dict(zip(methods, sns.color_palette("deep" if len(methods) <= 10 else "husl", len(methods))))


def accuracy_comparison(rows: list[dict], colors: dict, path: Path) -> str:
    students = [r for r in rows if r["method"] != TEACHER]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(students) + 2), 4.5))
    names = [r["method"] for r in students]
    spread = {r["method"]: r["best_accuracy_std"] or 0.0 for r in rows}  # no bar for a single seed
    ax.bar(names, [r["best_accuracy"] for r in students], yerr=[spread[name] for name in names],
           capsize=4, color=[colors[name] for name in names])
    for row in rows:
        if row["method"] in (TEACHER, REFERENCE):
            ax.axhline(row["best_accuracy"], linestyle="--" if row["method"] == TEACHER else ":",
                       color="black", label=f"{row['method']} {row['best_accuracy']:.4f}")
    low = min(r["best_accuracy"] - spread[r["method"]] for r in rows)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    return _save(fig, path, ax, "Val accuracy by method", "", "best val accuracy (mean ± std over seeds)")


def learning_curves(records: list[RunRecord], colors: dict, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, runs in _runs_by_method(records).items():
        curves = [[h["score"] for h in r.training.history] for r in runs if r.training]
        if not curves:
            continue  # a reused teacher has no curve in this experiment
        length = min(len(c) for c in curves)
        values = np.array([c[:length] for c in curves])
        epochs = np.arange(1, length + 1)
        ax.plot(epochs, values.mean(axis=0), marker="o", markersize=3, label=method, color=colors[method])
        if len(curves) > 1:
            ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), alpha=0.2, color=colors[method])
    return _save(fig, path, ax, "Learning curves", "epoch", "val accuracy (mean; band: min–max over seeds)")


def accuracy_vs_time(records: list[RunRecord], colors: dict, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, runs in _runs_by_method(records).items():
        ax.scatter([r.result.training_time for r in runs], [r.result.best_accuracy for r in runs], label=method, s=40,
                   color=colors[method])
    return _save(fig, path, ax, "Accuracy against training time (one point per run)", "training time (s)",
                 "best val accuracy")


def reliability(records: list[RunRecord], colors: dict, path: Path) -> str:
    """Reliability diagram: accuracy against confidence per bin, pooled over seeds."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
    for method, runs in _runs_by_method(records).items():
        bins = [r.metrics.reliability for r in runs]
        counts = np.array([b["count"] for b in bins], dtype=float).sum(axis=0)
        keep = counts > 0
        conf = sum(np.nan_to_num(np.array(b["confidence"], dtype=float)) * b["count"] for b in bins)
        acc = sum(np.nan_to_num(np.array(b["accuracy"], dtype=float)) * b["count"] for b in bins)
        ax.plot(conf[keep] / counts[keep], acc[keep] / counts[keep], marker="o", markersize=3, label=method,
                color=colors[method])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    return _save(fig, path, ax, "Reliability (val, 15 bins)", "confidence", "accuracy", legend="upper left")


def confusion(records: list[RunRecord], method: str, class_names: list[str], path: Path) -> str:
    matrix = np.sum([r.metrics.confusion_matrix for r in _runs_by_method(records)[method]], axis=0)
    size = max(4.5, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    sns.heatmap(matrix, annot=len(class_names) <= 20, fmt="d", cmap="Blues", cbar=False, ax=ax,
                xticklabels=class_names, yticklabels=class_names)
    ax.set(title=f"Confusion matrix: {method} (val, summed over seeds)", xlabel="predicted", ylabel="true")
    return _save(fig, path)


def write_plots(exp_dir: Path, records: list[RunRecord], rows: list[dict], class_names: list[str],
                best_method: str | None) -> dict[str, str]:
    """Draw every figure into the experiment folder; returns {figure: file name}."""
    colors = method_colors([row["method"] for row in rows])
    plots = {"accuracy_comparison": accuracy_comparison(rows, colors, exp_dir / "accuracy_comparison.png"),
             "learning_curves": learning_curves(records, colors, exp_dir / "learning_curves.png"),
             "accuracy_vs_time": accuracy_vs_time(records, colors, exp_dir / "accuracy_vs_time.png"),
             "reliability": reliability(records, colors, exp_dir / "reliability.png")}
    finished = _runs_by_method(records)
    for method in dict.fromkeys([TEACHER, best_method]):
        if method in finished:
            plots[f"confusion_{method}"] = confusion(records, method, class_names, exp_dir / f"confusion_{method}.png")
    return plots

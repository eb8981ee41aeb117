"""The tuning figures of report.md, drawn by Optuna's own matplotlib functions from the stored studies: per
study, the optimization history, the settings' importances (Optuna's default evaluator) and the val accuracy
against its two most important settings."""
from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402

from kd.engine.checkpoint import atomic_write  # noqa: E402
from kd.tuning.study import open_storage  # noqa: E402

log = logging.getLogger("kd")
MIN_COMPLETE = 3  # completed (not pruned) trials a study needs for its importance and settings figures


def _save(axes, path: Path) -> str:
    figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path.name


def write_tuning_figures(exp_dir: Path, summary: dict) -> dict[str, str]:
    """Draw every study's figures into the experiment folder; returns {figure: file name}."""
    storage = open_storage(summary["config"]["tune"]["storage"], exp_dir / "tuning.journal")
    plots: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # e.g. "importances will be equal" on a flat study
        for stage, info in summary["tuning"]["studies"].items():
            study = optuna.load_study(study_name=info["study"], storage=storage)
            history = optuna.visualization.matplotlib.plot_optimization_history(study)
            plots[f"tuning_history_{stage}"] = _save(history, exp_dir / f"tuning_history_{stage}.png")
            complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
            if complete < MIN_COMPLETE:  # importances of fewer are all equal, and a contour is empty
                log.info("No importance figure for %s: %d completed trial(s), %d needed", stage, complete,
                         MIN_COMPLETE)
                continue
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # the figure and the top two agree
            try:
                importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
            except RuntimeError as err:  # every completed trial scored the same: nothing to weigh
                log.info("No importance figure for %s: %s", stage, err)
                continue
            plots[f"tuning_importance_{stage}"] = _save(
                optuna.visualization.matplotlib.plot_param_importances(study, evaluator=evaluator),
                exp_dir / f"tuning_importance_{stage}.png")
            top = list(importances)[:2]
            draw = optuna.visualization.matplotlib.plot_contour if len(top) == 2 else \
                optuna.visualization.matplotlib.plot_slice
            plots[f"tuning_settings_{stage}"] = _save(draw(study, params=top), exp_dir / f"tuning_settings_{stage}.png")
    return plots

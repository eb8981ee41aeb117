"""report.md: the comparison in words a reader can trust, with the table and the figures."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kd.engine.checkpoint import write_text
from kd.methods import METHODS, REFERENCE
from kd.results.record import DEFAULT, TEACHER, RunRecord
from kd.results.table import row_label
from kd.space import settings_text

SIGNIFICANCE = 0.05

TEACHER_IDEA = "the network the teacher-based methods learn from, trained with cross-entropy."


def _fmt(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def verdict(row: dict) -> str:
    """Plain-language comparison with the reference method that never calls noise a win."""
    gain, p_value, n = row["gain_vs_baseline"], row["p_value_vs_baseline"], row["n_seeds"]
    if row["method"] in (TEACHER, REFERENCE) or gain is None:
        return ""
    points = f"{gain * 100:+.2f} points vs {REFERENCE}"
    if not row["comparable"]:
        return (f"{points}, but {'it' if row['protocol'] != 'common' else REFERENCE} trained its own student "
                "settings, not under the common protocol: the difference is not the method's alone, so no p-value "
                "is given.")
    if n < 2:
        return (f"{points} from a single seed: not significant, a single run cannot be told apart from "
                "run-to-run noise (run with `--seeds 0,1,2`).")
    if p_value is None:
        return f"{points} over {n} seeds, identical in every seed: no test possible, treat as not significant."
    if p_value >= SIGNIFICANCE:
        return f"{points} over {n} seeds (paired t-test p = {p_value:.3f}): not significant, within noise."
    direction = "better" if gain > 0 else "worse"
    return f"{points} over {n} seeds (paired t-test p = {p_value:.3f}): significantly {direction} than {REFERENCE}."


def _models_line(summary: dict) -> list[str]:
    """Which models (library, starting weights, stem) the comparison used; older summaries have none."""
    models = summary.get("models")
    if not models:
        return []
    described = [f"{role} {m['name']} ({m['source']} {m['builder']}, "
                 f"{'from scratch' if m['weights'] is None else 'weights ' + str(m['weights'])}, {m['stem']} stem)"
                 for role, m in models.items()]
    return [f"Models: {'; '.join(described)}. Every method's student starts from the same weights and the same "
            "new classifier per seed, unless the table marks its protocol as its own.", ""]


def _idea(method: str) -> str:
    """What report.md says a method does (nothing for one no longer registered, on --report)."""
    return TEACHER_IDEA if method == TEACHER else METHODS[method].idea if method in METHODS else ""


def _extras(method: str, runs: list[RunRecord]) -> str:
    """The method's own record fields, labelled as it declares them, seed by seed ("; " between seeds)."""
    labels = METHODS[method].record_fields if method in METHODS else {}
    shown = []
    for key in dict.fromkeys(key for run in runs for key in run.extras):
        values = [run.extras[key] for run in runs if key in run.extras]
        shown.append(f" {labels.get(key, key)}: " + "; ".join(_values(value) for value in values) + ".")
    return "".join(shown)


def _values(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_values(item) for item in value)
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _test(row: dict) -> str:
    """The test accuracy, with its std over seeds where it is the reported number (a tuned experiment)."""
    std = row.get("test_accuracy_std") if row.get("variant") and row["n_seeds"] > 1 else None
    return _fmt(row["test_accuracy"]) + (f" ± {std:.4f}" if std is not None else "")


def tuning_section(rows: list[dict], summary: dict, plots: dict[str, str]) -> list[str]:
    """report.md's account of a tuned experiment: the protocol, default against tuned on the reporting split,
    the chosen settings, the trials and their cost, and the figures of each study."""
    tuning = summary["tuning"]
    studies = tuning["studies"]
    seeds = ", ".join(map(str, tuning["final_seeds"]))
    selection = (f"a held-out {tuning['held_out']}" if tuning.get("held_out") else "val/")
    reporting = "val/" if tuning.get("held_out") else "test/"
    recipe = ("Stage 1 tuned the common recipe (the student's lr and weight decay) on "
              f"{REFERENCE}; every method then trained with it ({settings_text(tuning['recipe'])}), so the common "
              "protocol holds." if tuning["recipe_tuned"] else
              f"Stage 1 was off: every method kept your recipe ({settings_text(tuning['recipe'])}).")
    lines = ["## Tuning", "",
             f"{recipe} Stage 2 tuned each method's own settings with Optuna: every method got the same "
             f"{tuning['trials_per_study']} trials, the first at its paper defaults, each trial one student on seed "
             f"{tuning['trial_seed']} scored by its best accuracy on the selection split ({selection}); a "
             f"successive-halving pruner stopped poor trials on their per-epoch accuracy"
             f"{'' if tuning['pruner'] != 'none' else ' (here off)'}. Then every method trained at its chosen and "
             f"at its default settings with fresh seeds ({seeds}): \"default\" is a method's paper settings on the "
             f"common recipe, so its column against \"tuned\" shows what stage 2 changed ({REFERENCE}'s defaults "
             "are your recipe: its row shows what stage 1 changed). The accuracies below are on the reporting "
             f"split ({reporting}), which tuning never read: a setting chosen on the same split it is reported on "
             "would look better than it is.", "",
             f"| method | default ({reporting}) | tuned ({reporting}) | change | chosen settings | defaults | trials "
             "| pruned | failed | device-hours |", "|---" * 10 + "|"]
    by_key = {(row["method"], row.get("variant")): row for row in rows}
    for stage, study in studies.items():
        method = study["method"]
        tuned = by_key.get((method, "tuned"))
        default = by_key.get((method, "default")) or (tuned if study["chosen"] == study["defaults"] else None)
        change = (f"{(tuned['test_accuracy'] - default['test_accuracy']) * 100:+.2f} pts"
                  if tuned and default and tuned["test_accuracy"] is not None else "")
        label = f"{method} (recipe)" if stage == "recipe" else method
        lines.append(f"| {label} | {_fmt(default['test_accuracy']) if default else ''} | "
                     f"{_fmt(tuned['test_accuracy']) if tuned else ''} | {change} | {settings_text(study['chosen'])} | "
                     f"{settings_text(study['defaults'])} | {study['trials']} | {study['pruned']} | "
                     f"{study['failed']} | "
                     f"{study['device_hours']:.4f} |")
    lines += ["", f"The pruner ran {tuning['pruner_saved_epochs'] * 100:.0f}% fewer training epochs than the same "
              "trials run to the end would have (tuning_trials.csv lists every trial). A method whose defaults won "
              "its study trained once; its default column repeats its tuned one.", ""]
    lines += ["Per study: Optuna's optimization history, then, where at least three trials completed (pruned ones "
              "have no final score), the settings' importances and the val accuracy against the two most "
              "important settings.", ""]
    for stage in studies:
        lines += [f"![{name}]({file})" for name, file in plots.items() if name.endswith(f"_{stage}")]
    return [*lines, ""]


def write_report_md(exp_dir: Path, rows: list[dict], records: list[RunRecord], summary: dict,
                    plots: dict[str, str]) -> None:
    env, data = summary["environment"], summary["data"]
    table = ["| method | model | teacher | protocol | best val accuracy | std | seeds | test | top-5 | NLL | ECE | "
             f"agreement with teacher | gain vs {REFERENCE} | p-value | time (s) |",
             "|---" * 15 + "|"]
    for r in rows:
        gain = "" if r["gain_vs_baseline"] is None else f"{r['gain_vs_baseline'] * 100:+.2f} pts"
        table.append(f"| {row_label(r)} | {r['model']} | {r['teacher']} | {r['protocol']} | "
                     f"{_fmt(r['best_accuracy'])} | "
                     f"{_fmt(r['best_accuracy_std'])} | {r['n_seeds']} | {_test(r)} | "
                     f"{_fmt(r['top5_accuracy'])} | {_fmt(r['nll'])} | {_fmt(r['ece'])} | "
                     f"{_fmt(r['teacher_agreement'])} | {gain} | {_fmt(r['p_value_vs_baseline'], 3)} | "
                     f"{_fmt(r['training_time'], 1)} |")
    paragraphs = []
    for r in rows:
        if r.get("variant") == DEFAULT:  # the tuning section sets it beside the tuned one
            continue
        runs = [x for x in records if (x.method, x.variant) == (r["method"], r.get("variant", "")) and x.ok]
        accuracy = (f"Test (reporting) accuracy {_test(r)} at its chosen settings, best val accuracy "
                    f"{r['best_accuracy']:.4f}" if r.get("variant") else f"Best val accuracy {r['best_accuracy']:.4f}"
                    + (f" ± {r['best_accuracy_std']:.4f}" if r["n_seeds"] > 1 else ""))
        paragraphs.append(f"**{r['method']}** — {_idea(r['method'])} {accuracy} over {r['n_seeds']} seed(s)."
                          f"{_extras(r['method'], runs)} {verdict(r)}".rstrip())
    failed = summary.get("failed_runs") or []
    teacher = summary.get("teacher", {})
    lines = [
        "# Knowledge-distillation comparison", "",
        f"Data: `{data['root']}`, {len(data['classes'])} classes, images per split "
        f"{', '.join(f'{k} {v}' for k, v in data['counts'].items())}, {data['image_size']} px. "
        f"Device: {env.get('device_name', env.get('device'))}, precision {env['precision']}; "
        f"torch {env['torch']}, torchvision {env['torchvision']}.",
        "", *_models_line(summary),
        "",
        f"Teacher: `{teacher.get('path', '')}` (val accuracy {_fmt(teacher.get('accuracy'))}, "
        f"{'reused' if teacher.get('reused') else 'trained in this experiment'}). A weak teacher makes "
        "distillation look bad: read every distilled result beside it.",
        "",
        "Accuracies are fractions of the val split at each run's best val epoch; test accuracy (if a test "
        f"split exists) is taken at that same epoch. Gains are paired per seed against {REFERENCE}; a difference "
        f"counts as significant only when a paired t-test over at least two seeds gives p < {SIGNIFICANCE}."
        + (" This experiment was tuned: \"val\" is the selection split and \"test\" the reporting split (see "
           "Tuning), and gains and p-values are on the reporting split." if "tuning" in summary else ""),
        "", *table, "",
        *(f"![{name}]({file})" for name, file in plots.items() if not name.startswith("tuning_")), "",
        *(tuning_section(rows, summary, plots) if "tuning" in summary else []),
        "## Methods", "", *[p + "\n" for p in paragraphs],
    ]
    if failed:
        lines += ["## Failed runs", "", *(f"- {f['method']} seed {f['seed']}: {f['reason']}" for f in failed), ""]
    best = summary.get("best_method")
    measure = "test (reporting) accuracy" if "tuning" in summary else "val accuracy"
    if best == REFERENCE:
        lines += ["## Verdict", "", f"No method beat **{REFERENCE}** on mean {measure}.", ""]
    elif best:
        lines += ["## Verdict", "", f"Highest mean {measure} among the students: **{best}**; whether that "
                  f"beats {REFERENCE} beyond noise is said in its paragraph above.", ""]
    write_text(exp_dir / "report.md", "\n".join(lines))

"""report.md: the comparison in words a reader can trust, with the table and the figures."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kd.engine.checkpoint import write_text
from kd.methods import METHODS, REFERENCE
from kd.results.record import TEACHER, RunRecord

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


def write_report_md(exp_dir: Path, rows: list[dict], records: list[RunRecord], summary: dict,
                    plots: dict[str, str]) -> None:
    env, data = summary["environment"], summary["data"]
    table = ["| method | model | teacher | protocol | best val accuracy | std | seeds | test | top-5 | NLL | ECE | "
             f"agreement with teacher | gain vs {REFERENCE} | p-value | time (s) |",
             "|---" * 15 + "|"]
    for r in rows:
        gain = "" if r["gain_vs_baseline"] is None else f"{r['gain_vs_baseline'] * 100:+.2f} pts"
        table.append(f"| {r['method']} | {r['model']} | {r['teacher']} | {r['protocol']} | "
                     f"{_fmt(r['best_accuracy'])} | "
                     f"{_fmt(r['best_accuracy_std'])} | {r['n_seeds']} | {_fmt(r['test_accuracy'])} | "
                     f"{_fmt(r['top5_accuracy'])} | {_fmt(r['nll'])} | {_fmt(r['ece'])} | "
                     f"{_fmt(r['teacher_agreement'])} | {gain} | {_fmt(r['p_value_vs_baseline'], 3)} | "
                     f"{_fmt(r['training_time'], 1)} |")
    paragraphs = []
    for r in rows:
        runs = [x for x in records if x.method == r["method"] and x.ok]
        paragraphs.append(f"**{r['method']}** — {_idea(r['method'])} Best val accuracy "
                          f"{r['best_accuracy']:.4f}" + (f" ± {r['best_accuracy_std']:.4f}" if r["n_seeds"] > 1 else "")
                          + f" over {r['n_seeds']} seed(s).{_extras(r['method'], runs)} {verdict(r)}".rstrip())
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
        f"counts as significant only when a paired t-test over at least two seeds gives p < {SIGNIFICANCE}.",
        "", *table, "",
        *(f"![{name}]({file})" for name, file in plots.items()), "",
        "## Methods", "", *[p + "\n" for p in paragraphs],
    ]
    if failed:
        lines += ["## Failed runs", "", *(f"- {f['method']} seed {f['seed']}: {f['reason']}" for f in failed), ""]
    best = summary.get("best_method")
    if best == REFERENCE:
        lines += ["## Verdict", "", f"No method beat **{REFERENCE}** on mean val accuracy.", ""]
    elif best:
        lines += ["## Verdict", "", f"Highest mean val accuracy among the students: **{best}**; whether that "
                  f"beats {REFERENCE} beyond noise is said in its paragraph above.", ""]
    write_text(exp_dir / "report.md", "\n".join(lines))

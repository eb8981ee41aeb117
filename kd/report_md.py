"""report.md: the comparison in words a reader can trust, with the table and the figures."""
from __future__ import annotations

from pathlib import Path

from kd.checkpoint import write_text

SIGNIFICANCE = 0.05

IDEAS = {
    "Teacher": "the network the teacher-based methods learn from, trained with cross-entropy.",
    "Baseline": "the student trained alone with cross-entropy: the reference every gain is measured against.",
    "KD": "Hinton et al. (2015): the student matches the teacher's temperature-softened class probabilities.",
    "AT": "Zagoruyko & Komodakis (ICLR 2017): the student matches the teacher's spatial attention maps "
          "after each stage.",
    "FitNets": "Romero et al. (ICLR 2015): a regressor maps the student's features at one stage (the hint) "
               "onto the teacher's.",
    "DML": "Zhang et al. (CVPR 2018): two students learn from the labels and from each other, no teacher; "
           "the accuracy is the mean over peers.",
    "BYOT": "Zhang et al. (ICCV 2019): the network's deepest exit teaches three auxiliary exits (self-distillation); "
            "the accuracy is the deepest exit's.",
    "DKD": "Zhao et al. (CVPR 2022): KD split into a target-class and a non-target-class term, weighted "
           "separately, with a warm-up of the distillation weight.",
    "DIST": "Huang et al. (NeurIPS 2022): the student matches the correlation of its softened predictions with the "
            "teacher's, per sample across classes and per class across the batch.",
    "CRD": "Tian et al. (ICLR 2020): contrastive: the student's pooled feature is pulled towards the teacher's for "
           "the same image and away from the teacher's for images of other classes.",
    "ReviewKD": "Chen et al. (CVPR 2021): attention-based fusion modules combine each student stage with the deeper "
                "ones and match the result to the teacher's same stage.",
    "RKD": "Park et al. (CVPR 2019): the student matches the teacher's distances and angles between the pooled "
           "features of the samples in a batch.",
    "SP": "Tung & Mori (ICCV 2019): the student matches the teacher's sample-to-sample similarities of the last "
          "stage's features within a batch.",
    "PKT": "Passalis & Tefas (ECCV 2018): the student matches the teacher's distribution of cosine similarities "
           "between the pooled features of a batch.",
    "KD_LS": "Sun et al. (CVPR 2024): KD on logits standardized per sample (zero mean, unit std), so the student "
             "matches the shape of the teacher's logits rather than their scale.",
    "DKD_LS": "Sun et al. (CVPR 2024): DKD on logits standardized per sample (zero mean, unit std).",
}


def _fmt(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def verdict(row: dict) -> str:
    """Plain-language comparison with Baseline that never calls noise a win."""
    gain, p_value, n = row["gain_vs_baseline"], row["p_value_vs_baseline"], row["n_seeds"]
    if row["method"] in ("Teacher", "Baseline") or gain is None:
        return ""
    points = f"{gain * 100:+.2f} points vs Baseline"
    if not row.get("comparable", True):
        return (f"{points}, but {'it' if row['protocol'] != 'common' else 'Baseline'} trained its own student "
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
    return f"{points} over {n} seeds (paired t-test p = {p_value:.3f}): significantly {direction} than Baseline."


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


def write_report_md(exp_dir: Path, rows: list[dict], records: list[dict], summary: dict,
                    plots: dict[str, str]) -> None:
    env, data = summary["environment"], summary["data"]
    table = ["| method | model | teacher | protocol | best val accuracy | std | seeds | test | top-5 | NLL | ECE | "
             "agreement with teacher | gain vs Baseline | p-value | time (s) |",
             "|---" * 15 + "|"]
    for r in rows:
        gain = "" if r["gain_vs_baseline"] is None else f"{r['gain_vs_baseline'] * 100:+.2f} pts"
        table.append(f"| {r['method']} | {r['model']} | {r['teacher']} | {r.get('protocol', 'common')} | "
                     f"{_fmt(r['best_accuracy'])} | "
                     f"{_fmt(r['best_accuracy_std'])} | {r['n_seeds']} | {_fmt(r['test_accuracy'])} | "
                     f"{_fmt(r['top5_accuracy'])} | {_fmt(r['nll'])} | {_fmt(r['ece'])} | "
                     f"{_fmt(r['teacher_agreement'])} | {gain} | {_fmt(r['p_value_vs_baseline'], 3)} | "
                     f"{_fmt(r['training_time'], 1)} |")
    paragraphs = []
    for r in rows:
        extra = ""
        runs = [x for x in records if x["method"] == r["method"] and x.get("status", "ok") == "ok"]
        if r["method"] == "DML":
            extra = " Peer accuracies (best per peer): " + "; ".join(
                ", ".join(f"{a:.4f}" for a in x["peer_accuracies"]) for x in runs) + "."
        elif r["method"] == "BYOT":
            extra = " Exit accuracies (shallow → deepest): " + "; ".join(
                ", ".join(f"{a:.4f}" for a in x["exit_accuracies"]) for x in runs) + \
                "; ensemble " + ", ".join(f"{x['ensemble_accuracy']:.4f}" for x in runs) + "."
        paragraphs.append(f"**{r['method']}** — {IDEAS.get(r['method'], '')} Best val accuracy "
                          f"{r['best_accuracy']:.4f}" + (f" ± {r['best_accuracy_std']:.4f}" if r["n_seeds"] > 1 else "")
                          + f" over {r['n_seeds']} seed(s).{extra} {verdict(r)}".rstrip())
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
        "split exists) is taken at that same epoch. Gains are paired per seed against Baseline; a difference "
        f"counts as significant only when a paired t-test over at least two seeds gives p < {SIGNIFICANCE}.",
        "", *table, "",
        *(f"![{name}]({file})" for name, file in plots.items()), "",
        "## Methods", "", *[p + "\n" for p in paragraphs],
    ]
    if failed:
        lines += ["## Failed runs", "", *(f"- {f['method']} seed {f['seed']}: {f['reason']}" for f in failed), ""]
    best = summary.get("best_method")
    if best == "Baseline":
        lines += ["## Verdict", "", "No method beat **Baseline** on mean val accuracy.", ""]
    elif best:
        lines += ["## Verdict", "", f"Highest mean val accuracy among the students: **{best}**; whether that "
                  "beats Baseline beyond noise is said in its paragraph above.", ""]
    write_text(exp_dir / "report.md", "\n".join(lines))

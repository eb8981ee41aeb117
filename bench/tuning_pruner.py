"""What the pruner saves: one tuned experiment with successive halving, then the very same trials (the same
settings, in the same order) run to the end without a pruner, in the same process; their trial seconds and
epochs side by side, as a ratio.

    python bench/tuning_pruner.py                       # the digits demo, Baseline and KD, 4 trials each
    python bench/tuning_pruner.py --methods Baseline,KD,AT,DIST --trials 6

The second experiment reuses the first one's teacher and replays its settings study by study (Optuna's
enqueue_trial), so the only difference is whether poor trials stop early.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import final  # noqa: E402
from kd.tuning import stages  # noqa: E402
from kd.data.digits import export_digits_demo  # noqa: E402


def run(config: dict) -> tuple[Path, float]:
    started = time.perf_counter()
    final.main(config)
    folder = max(Path(config["experiment"]["logs_dir"]).glob("final_experiment_*"), key=lambda p: p.stat().st_mtime)
    return folder, time.perf_counter() - started


def trials(folder: Path) -> list[dict]:
    with open(folder / "tuning_trials.csv", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def replaying(rows: list[dict]) -> None:
    """Make the next experiment's studies run `rows`' settings, study by study, in their order: each new study
    gets them all queued up front (Optuna's enqueue_trial), instead of its defaults alone."""
    by_study: dict[str, list[dict]] = {}
    for row in rows:
        stage = "recipe" if row["stage"] == "1" else row["method"]
        by_study.setdefault(stage, []).append(json.loads(row["settings"]))
    original_reopen = stages.reopen

    def reopen(study, first):
        counted = original_reopen(study, None)
        for settings in by_study[study.study_name.rsplit("/", 1)[1]]:
            study.enqueue_trial(settings)
        return counted
    stages.reopen = reopen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="Baseline,KD")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--logs", default="bench_logs/tuning_pruner")
    args = parser.parse_args()
    config = final.default_config("demo")
    export_digits_demo(Path(config["experiment"]["data_dir"]))
    config["experiment"].update(methods=args.methods.split(","), tune=True, logs_dir=args.logs,
                                checkpoints_dir=f"{args.logs}/checkpoints")
    config["tune"].update(trials=args.trials, final_seeds=1)
    pruned_folder, pruned_wall = run(config)
    pruned = trials(pruned_folder)
    replaying(pruned)
    config["tune"]["pruner"] = "none"
    full_folder, full_wall = run(config)
    full = trials(full_folder)
    assert [r["settings"] for r in full] == [r["settings"] for r in pruned], "the replay asked for other settings"
    seconds = [sum(float(r["seconds"]) for r in rows) for rows in (pruned, full)]
    epochs = [sum(int(r["epochs"]) for r in rows) for rows in (pruned, full)]
    print(f"trials: {len(pruned)} ({sum(r['state'] == 'pruned' for r in pruned)} pruned) in {pruned_folder.name} "
          f"and {full_folder.name}")
    print(f"with the pruner: {seconds[0]:.1f} s of trials, {epochs[0]} epochs; the same trials to the end: "
          f"{seconds[1]:.1f} s, {epochs[1]} epochs")
    print(f"ratio (to the end / pruned): {seconds[1] / seconds[0]:.2f}x in trial seconds, "
          f"{epochs[1] / epochs[0]:.2f}x in epochs; whole experiments {pruned_wall:.0f} s and {full_wall:.0f} s")


if __name__ == "__main__":
    main()

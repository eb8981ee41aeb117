"""Two experiments' records compared run by run, clocks and file paths aside: whether they trained the same.

    python bench/compare_records.py logs/final_experiment_A logs/final_experiment_B
    python bench/compare_records.py A B --expect-changed DKD,DKD_LS,ReviewKD

Prints one line per run (method and seed): `equal`, or how many values differ and the first few of them
with both values. Runs named by --expect-changed are shown but not counted. Exit code 0 when every other run
is equal and both experiments hold the same runs, else 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# What differs between two runs of the same training: clocks, and where the files are (a checkpoint's
# sha256 covers its training time too).
UNTIMED = frozenset({"training_time", "images_per_s", "train_seconds", "latency_ms", "sha256", "checkpoint"})


def untimed(value: Any) -> Any:
    """A record (or part of one) without the keys that clocks and paths decide."""
    if isinstance(value, dict):
        return {key: untimed(item) for key, item in value.items() if key not in UNTIMED}
    if isinstance(value, list):
        return [untimed(item) for item in value]
    return value


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two values differ, as `path: a != b` (a key only one side has: `path: missing`)."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in dict.fromkeys([*a, *b]):
            path = f"{where}.{key}" if where else str(key)
            found += differences(a[key], b[key], path) if key in a and key in b else [f"{path}: missing on one side"]
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [line for i, (x, y) in enumerate(zip(a, b)) for line in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def records(exp_dir: Path) -> dict[tuple[str, int], dict]:
    stored = json.loads((exp_dir / "comparison_results.json").read_text(encoding="utf-8"))
    return {(record["method"], record["seed"]): untimed(record) for record in stored}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--expect-changed", default="", metavar="A,B", help="methods expected to differ")
    args = parser.parse_args(argv)
    expected = set(filter(None, args.expect_changed.split(",")))
    first, second = records(args.first), records(args.second)
    unexpected = 0
    for run in dict.fromkeys([*first, *second]):
        method, seed = run
        found = differences(first[run], second[run]) if run in first and run in second else ["run missing on one side"]
        note = " (expected to change)" if method in expected else ""
        if found and not note:
            unexpected += 1
        shown = "equal" if not found else f"{len(found)} value(s) differ{note}: " + "; ".join(found[:3])
        print(f"{method} seed {seed}: {shown}")
    compared = [run for run in dict.fromkeys([*first, *second]) if run[0] not in expected]
    print(f"{len(compared) - unexpected} of {len(compared)} runs equal (clocks and paths aside)"
          + (f"; {', '.join(sorted(expected))} not counted" if expected else ""))
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())

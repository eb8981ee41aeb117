"""One sweep of whole runs, trained one after another by one process against spread over several processes
with `--parallel runs` (torchrun), each layout a fresh experiment on the same data, side by side.

    python bench/parallel.py --quick                      # CPU: 1 process x 2 threads against 2 x 1 thread
    python bench/parallel.py --device cuda --layouts 1,2,4  # one GPU: 1, 2 and 4 runs sharing it at a time

The sweep is the digits demo's data (exported on first use, no download) at 12 px: Baseline and KD with
two seeds each (4 runs; `--quick`: 1 student epoch, else 3), with a ResNet18 teacher trained once before
the timed layouts and reused by all of them. A layout of P processes gives each cores / P threads
(OMP_NUM_THREADS); on a GPU every process uses the one GPU (cuda:0).

Printed: one row per layout with its wall time (the whole command: start-up, teacher reuse, runs and
writing), the images trained per second of wall time, the mean of the runs' own images/s (each run's
training steps, as its record says), and the speed-up against the first layout. The last line is a JSON
object: `runs_speedup` (first layout's wall time / the last's), and every layout's figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from run_worker import launcher  # noqa: E402


def sweep_args(work: Path, device: str, epochs: int) -> list[str]:
    return ["--data", str(work / "digits"), "--methods", "Baseline,KD", "--seeds", "0,1", "--device", device,
            "--student-epochs", str(epochs), "--set", "teacher.model=ResNet18", "--set", "experiment.image_size=12",
            "--set", "experiment.hflip=false", "--checkpoints-dir", str(work / "checkpoints")]


def run(command: list[str], env: dict[str, str], cwd: Path) -> float:
    """Wall seconds of `command`; exits with its error output if it fails."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def layout(processes: int, work: Path, args: argparse.Namespace, threads: int) -> dict:
    logs = work / f"logs_{processes}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    script = [str(REPO / "run_experiment.py"), *sweep_args(work, args.device, args.epochs), "--logs-dir", str(logs)]
    extra = [] if processes == 1 else ["--parallel", "runs"]
    seconds = run([*launcher(processes), *script, *extra], env, work)
    (folder,) = logs.glob("final_experiment_*")
    runs = [r for r in json.loads((folder / "comparison_results.json").read_text()) if r["method"] != "Teacher"]
    images = sum(entry["images"] for r in runs for entry in r["history"])
    return {"processes": processes, "threads": threads, "wall_s": round(seconds, 1),
            "img_s_wall": round(images / seconds, 1),
            "run_img_s": round(sum(r["images_per_s"] for r in runs) / len(runs), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 student epoch (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--layouts", default="1,2", help="processes of each layout, e.g. 1,2,4 (default 1,2)")
    args = parser.parse_args()
    args.epochs = 1 if args.quick else 3
    counts = [int(n) for n in args.layouts.split(",")]
    cores = os.cpu_count() or 1

    sys.path.insert(0, str(REPO))
    from kd.data.digits import export_digits_demo

    with tempfile.TemporaryDirectory(prefix="kd_parallel_") as scratch:
        work = Path(scratch)
        export_digits_demo(work / "digits")
        # the teacher, once: every layout reuses it, so the layouts differ only in how the runs are spread
        run([sys.executable, str(REPO / "run_experiment.py"), *sweep_args(work, args.device, 1), "--methods",
             "Baseline", "--seeds", "0", "--teacher-epochs", "1", "--logs-dir", str(work / "logs_teacher")],
            {**os.environ, "PYTHONPATH": str(REPO)}, work)
        rows = [layout(n, work, args, threads=max(1, cores // n)) for n in counts]

    first = rows[0]["wall_s"]
    print(f"{'processes':>9} {'threads':>7} {'wall s':>8} {'img/s (wall)':>13} {'run img/s':>10} {'speed-up':>9}")
    for row in rows:
        row["speedup"] = round(first / row["wall_s"], 2)
        print(f"{row['processes']:>9} {row['threads']:>7} {row['wall_s']:>8} {row['img_s_wall']:>13} "
              f"{row['run_img_s']:>10} {row['speedup']:>9}")
    print(json.dumps({"runs_speedup": rows[-1]["speedup"], "device": args.device, "layouts": rows}))


if __name__ == "__main__":
    main()

"""The GPU check (run through bench/gpu_check.sh): the paths a CPU never runs, on one CUDA GPU, in minutes.

Steps, each in its own process with a time limit, in a scratch folder (nothing is downloaded):
  cifar      python bench/cifar.py --device cuda --budget 150: KD resnet32x4 -> resnet8x4 under --preset
             cifar100 on a synthetic CIFAR-100 file, the project's img/s (1, 2 and 4 runs sharing the GPU;
             compiled) against the plain loop at batch 64 and 128, and the projected time of a 240-epoch run
             and of the table; first, as the CIFAR issue asks (the later steps are cut when the budget ends:
             `--steps` runs them)
  demo       python run_experiment.py --demo --device cuda (teacher and all six methods)
  throughput python bench/throughput.py --quick --device cuda (plain loop against the project)
  torchrun   a 1-process torchrun job (DDP over nccl) on the demo data, Baseline and KD, streaming the
             images from disk (cache_max_gb=0: DataLoader workers, pinned memory)
  resume     Baseline and KD killed (SIGKILL) after KD's first epoch, then --resume, against the same
             experiment uninterrupted
  parallel   python bench/parallel.py --quick --device cuda --layouts 1,2,4: 4 demo runs one at a time
             against 2 and 4 sharing the GPU (--parallel runs)
It prints one summary table, appends it to bench/RESULTS.md with the GPU's name, writes it to
`--out` (default bench/gpu_check_logs/) with every step's log, and exits 1 if any step failed.
`--steps demo,resume` runs only the steps named.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 540  # every step's time limit is cut to what is left of this: the whole check ends within 9 minutes,
# so that a second try fits in a lent GPU's 15 minutes
DEMO = [sys.executable, str(REPO / "run_experiment.py"), "--demo", "--device", "cuda"]


class Check:
    """Runs the steps, keeps their logs and the summary rows."""

    def __init__(self, work: Path, out: Path):
        self.work, self.out, self.rows, self.failed = work, out, [], False
        self.deadline = time.monotonic() + BUDGET_S

    def left(self) -> int:
        return int(self.deadline - time.monotonic())

    def run(self, name: str, command: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess | None:
        timeout = max(1, min(timeout, self.left()))
        started = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        try:
            done = subprocess.run(command, cwd=self.work, env=env, capture_output=True, text=True, timeout=timeout,
                                  **kwargs)
        except subprocess.TimeoutExpired as err:
            output = [text.decode(errors="replace") if isinstance(text, bytes) else text or ""
                      for text in (err.stdout, err.stderr)]
            self.log(name, f"TIMEOUT after {timeout} s\n" + "\n".join(output))
            self.row(name, False, f"timed out after {timeout} s")
            return None
        self.log(name, f"$ {' '.join(command)}\nrc {done.returncode}, {time.perf_counter() - started:.0f} s\n"
                       f"{done.stdout}\n{done.stderr}")
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            self.row(name, False, f"exit {done.returncode}: {last[:150]}")
            return None
        return done

    def log(self, name: str, text: str) -> None:
        with open(self.out / f"{name}.log", "a", encoding="utf-8") as handle:
            handle.write(text + "\n")

    def row(self, name: str, ok: bool, detail: str) -> None:
        self.rows.append((name, "ok" if ok else "FAILED", detail))
        self.failed |= not ok
        print(f"{name:<11} {'ok' if ok else 'FAILED':<6} {detail}", flush=True)


def experiment(logs: Path) -> tuple[list[dict], dict]:
    (folder,) = sorted(logs.glob("final_experiment_*"))[-1:]
    return (json.loads((folder / "comparison_results.json").read_text()),
            json.loads((folder / "experiment_summary.json").read_text()))


def check_cifar(check: Check) -> None:
    done = check.run("cifar", [sys.executable, str(REPO / "bench" / "cifar.py"), "--device", "cuda",
                               "--budget", "150"], timeout=200)
    if done is None:
        return
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    rows = "; ".join(f"batch {batch}: " + ", ".join(f"{key} {value}" for key, value in row.items())
                     for batch, row in figures["batches"].items())
    measured = "projected_run_minutes" in figures
    failed = any(str(value).startswith("failed") for row in figures["batches"].values() for value in row.values())
    check.row("cifar", measured and not failed, f"img/s {rows}; " + (
        f"{figures.get('vs_plain_1_run')}x the plain loop at batch 64; projected at batch 64: one 240-epoch run "
        f"{figures['projected_run_minutes']} min, the table {figures['projected_table_hours']} h (training steps)"
        if measured else "no one-run figure"))


def check_demo(check: Check) -> None:
    started = time.perf_counter()
    done = check.run("demo", [*DEMO, "--logs-dir", "logs", "--checkpoints-dir", "checkpoints"], timeout=200)
    if done is None:
        return
    records, summary = experiment(check.work / "logs")
    methods = ["Teacher", "Baseline", "KD", "AT", "FitNets", "DML", "BYOT"]
    ok = [r["method"] for r in records if r["status"] == "ok"] == methods
    detail = ", ".join(f"{r['method']} {r['best_accuracy']:.4f} ({r['training_time']:.0f} s, "
                       f"{r['images_per_s']:.0f} img/s)" for r in records if r["status"] == "ok")
    check.row("demo", ok, f"{summary['environment']['precision']}, {time.perf_counter() - started:.0f} s wall: "
                          f"{detail}")


def check_throughput(check: Check) -> None:
    done = check.run("throughput", [sys.executable, str(REPO / "bench" / "throughput.py"), "--quick", "--device",
                                    "cuda"], timeout=150)
    if done is None:
        return
    ratios = json.loads(done.stdout.strip().splitlines()[-1])
    check.row("throughput", True, ", ".join(f"{key} {value}" for key, value in ratios.items()))


def check_torchrun(check: Check) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *DEMO[1:],
               "--methods", "Baseline,KD", "--set", "experiment.cache_max_gb=0", "--logs-dir", "logs_torchrun",
               "--checkpoints-dir", "checkpoints"]
    if check.run("torchrun", command, timeout=90) is None:
        return
    records, summary = experiment(check.work / "logs_torchrun")
    env = summary["environment"]
    ok = env["backend"] == "nccl" and all(r["status"] == "ok" for r in records)
    check.row("torchrun", ok, f"backend {env['backend']}, {env['processes']} process(es): " +
              ", ".join(f"{r['method']} {r['best_accuracy']:.4f}" for r in records))


def check_resume(check: Check) -> None:
    argv = [*DEMO, "--methods", "Baseline,KD", "--checkpoints-dir", "checkpoints"]
    if check.run("resume", [*argv, "--logs-dir", "logs_whole"], timeout=90) is None:
        return
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(check.out / "resume.log", "a", encoding="utf-8") as log:
        process = subprocess.Popen([*argv, "--logs-dir", "logs_killed"], cwd=check.work, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        deadline = time.monotonic() + min(90, check.left())
        while not list((check.work / "logs_killed").glob("final_experiment_*/resume/KD_seed0.pt")):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                check.row("resume", False, "the run ended or stalled before KD saved its first epoch")
                return
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    if check.run("resume", [*argv, "--logs-dir", "logs_killed", "--resume"], timeout=90) is None:
        return
    whole, whole_summary = experiment(check.work / "logs_whole")
    resumed, resumed_summary = experiment(check.work / "logs_killed")
    same = ("method", "status", "epochs", "student_init_sha256", "first_batch_sha256")
    ok = ([{k: r.get(k) for k in same} for r in whole] == [{k: r.get(k) for k in same} for r in resumed]
          and whole_summary["environment"]["precision"] == resumed_summary["environment"]["precision"]
          and all(len(r.get("history", [])) == r["epochs"] for r in resumed if r["method"] != "Teacher"))
    check.row("resume", ok, "killed after KD's epoch 1, resumed: " + ", ".join(
        f"{a['method']} {a['best_accuracy']:.4f} vs {b['best_accuracy']:.4f} uninterrupted"
        for a, b in zip(resumed, whole)))


def check_parallel(check: Check) -> None:
    done = check.run("parallel", [sys.executable, str(REPO / "bench" / "parallel.py"), "--quick", "--device", "cuda",
                                  "--layouts", "1,2,4"], timeout=180)
    if done is None:
        return
    layouts = json.loads(done.stdout.strip().splitlines()[-1])["layouts"]
    check.row("parallel", True, "4 runs on one GPU, " + ", ".join(
        f"{row['processes']} at a time {row['wall_s']} s ({row['speedup']}x)" for row in layouts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "gpu_check_logs")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"some of {', '.join(STEPS)}")
    args = parser.parse_args()
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        parser.error(f"unknown step(s) {', '.join(sorted(unknown))}: choose from {', '.join(STEPS)}")
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0)
    capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
    print(f"GPU: {name} (compute capability {capability}), torch {torch.__version__}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="kd_gpu_check_"))
    check = Check(work, args.out)
    started = time.perf_counter()
    for step in args.steps.split(","):
        if check.left() < 10:  # the check promises minutes: report what it left out
            check.row(step, False, f"skipped: past the {BUDGET_S} s budget")
            continue
        STEPS[step](check)
    table = "\n".join(["| step | result | details |", "|---|---|---|",
                       *(f"| {step} | {result} | {detail} |" for step, result, detail in check.rows)])
    section = (f"\n## GPU check: {name} (compute capability {capability}), torch {torch.__version__} — "
               f"{date.today()}\n\n`bash bench/gpu_check.sh{'' if args.steps == ','.join(STEPS) else ' --steps ' + args.steps}` "
               f"({time.perf_counter() - started:.0f} s)\n\n{table}\n")
    print(section)
    (args.out / "gpu_check_table.md").write_text(section, encoding="utf-8")
    with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as results:
        results.write(section)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if check.failed else 0


STEPS = {"cifar": check_cifar, "demo": check_demo, "throughput": check_throughput, "torchrun": check_torchrun, "resume": check_resume,
         "parallel": check_parallel}

if __name__ == "__main__":
    sys.exit(main())

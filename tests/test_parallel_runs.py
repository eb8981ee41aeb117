"""--parallel runs under torchrun (CPU, gloo, one thread per process): each process trains whole runs from a
queue, and every record equals the one a single process writes with the same seeds; a killed process ends
the job, and --resume (with any number of processes) trains only the runs that did not finish."""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from conftest import experiment_argv, experiment_records, launch_experiment
from kd.experiment.sweep import Unit, spread_seconds

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from compare_records import untimed  # noqa: E402  (clocks and paths aside)

# Process 1 dies as kill -9 would when it takes its second unit, once rank 0 has written the teacher's and
# the first unit's records.
KILL_RANK_1 = """
import glob, json, os, signal, time
from kd.experiment import sweep
original, taken = sweep.run_methods, []
def written():
    return sum(len(json.load(open(f))) for f in glob.glob("logs/final_experiment_*/comparison_results.json"))
def run_methods(*args):
    taken.append(1)
    if os.environ["RANK"] == "1" and len(taken) == 2:
        while written() < 2:
            time.sleep(0.1)
        open("killed_at", "w").write(str(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args)
sweep.run_methods = run_methods
"""


def test_two_processes_train_whole_runs_with_the_records_of_one(tmp_path, one_process):
    data, expected = one_process
    done = launch_experiment(tmp_path, [*experiment_argv(tmp_path, data), "--parallel", "runs"], processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    records = experiment_records(tmp_path)
    assert [(r["method"], r["seed"]) for r in records] == [(r["method"], r["seed"]) for r in expected]
    assert untimed(records) == untimed(expected)
    assert {r["method"] for r in expected} == {"Teacher", "Baseline", "KD", "DML"} and len(expected) == 7
    # both processes trained: the teacher and some units on rank 0, the rest on rank 1
    log = next((tmp_path / "logs").glob("final_experiment_*/final_experiment.log")).read_text()
    assert log.count("finished on process ") == 6
    assert "finished on process 0" in log and "finished on process 1" in log
    assert done.stdout.count("KNOWLEDGE DISTILLATION COMPARISON RESULTS") == 1  # rank 0 alone writes
    students = {p.name for p in (tmp_path / "checkpoints" / "students").glob("*_best.pth")}
    assert {"Baseline_ResNet18_seed1_best.pth", "KD_ResNet18_seed0_best.pth",
            "DML_ResNet18_seed1_peer1_best.pth"} <= students


def test_a_killed_process_ends_the_job_and_resume_trains_only_the_rest(tmp_path, one_process):
    data, expected = one_process
    argv = [*experiment_argv(tmp_path, data), "--parallel", "runs"]
    killed = launch_experiment(tmp_path, argv, processes=2, patch=KILL_RANK_1)
    assert killed.returncode != 0
    assert time.time() - float((tmp_path / "killed_at").read_text()) < 60 + 1  # not a 30-minute timeout
    assert "Stopped by torchrun: another process of this job ended" in killed.stderr
    assert "continue with: python run_experiment.py --resume" in killed.stderr
    finished = [(r["method"], r["seed"]) for r in experiment_records(tmp_path)]
    assert finished[0] == ("Teacher", 0) and 1 < len(finished) < 7

    resumed = launch_experiment(tmp_path, [*argv, "--resume"], processes=None)  # any number of processes: here one
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trained = [(m, int(seed)) for m, seed in re.findall(r"student (\w+) with .* \(seed (\d+)\)", resumed.stderr)]
    assert sorted(trained) == sorted({(r["method"], r["seed"]) for r in expected} - set(finished))
    assert untimed(experiment_records(tmp_path)) == untimed(expected)


def test_more_processes_than_units_leave_one_idle_without_a_hang(tmp_path, make_image_folder):
    data = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 3})
    # the two-view method and the one with projectors: they share the teacher, one unit per seed, two units
    argv = [*experiment_argv(tmp_path, data, methods="MLKD,OFA"), "--parallel", "runs"]
    started = time.monotonic()
    done = launch_experiment(tmp_path, argv, processes=3)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 300
    # the plan (as --check prints it) says how the runs are spread
    assert "parallel runs: 3 processes on cpu, 1 thread(s) (x3)" in done.stdout
    assert "queue, first taken first: MLKD+OFA seed 0" in done.stdout and "estimated wall time" in done.stdout
    assert [(r["method"], r["seed"], r["status"]) for r in experiment_records(tmp_path)] == [
        ("Teacher", 0, "ok"), ("MLKD", 0, "ok"), ("OFA", 0, "ok"), ("MLKD", 1, "ok"), ("OFA", 1, "ok")]


def test_the_queue_wall_time_goes_to_the_process_free_first():
    units = [Unit(0, ("KD", "AT"), 30.0), Unit(1, ("KD", "AT"), 30.0), Unit(0, ("Baseline",), 10.0),
             Unit(1, ("Baseline",), 10.0)]
    assert spread_seconds(units, 1, 5.0) == 5.0 + 80.0
    assert spread_seconds(units, 2, 5.0) == 5.0 + 40.0  # 30 + 10 on each
    assert spread_seconds(units, 3, 0.0) == 30.0  # the third process takes both Baselines
    assert spread_seconds(units, 8, 0.0) == 30.0  # idle processes cost nothing


def test_large_messages_travel_through_the_store_in_pieces(monkeypatch):
    import torch.distributed as dist

    from kd.experiment import sweep

    monkeypatch.setattr(sweep, "STORE_PIECE", 1000)
    store = dist.HashStore()
    data = os.urandom(2500)
    sweep._put(store, "teacher", data)
    assert store.get("teacher") == b"3" and sweep._get(store, "teacher") == data
    sweep._put(store, "empty", b"")
    assert sweep._get(store, "empty") == b""

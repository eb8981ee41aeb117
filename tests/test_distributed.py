"""A 2-process torchrun job on the CPU (gloo): each process trains its shard, evaluation covers the whole
val set once, and only rank 0 writes logs, checkpoints and results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from kd.baseline import Baseline
from kd.checkpoint import load_checkpoint
from kd.data import load_image_data
from kd.runtime import Runtime
from kd.trainer import evaluate
from models import build_resnet

REPO = Path(__file__).resolve().parents[1]


def test_torchrun_two_processes(tmp_path, make_image_folder):
    data = make_image_folder(tmp_path / "data", per_class={"train": 10, "val": 5})  # 15 val: odd, not 2 x 7
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "run_experiment.py"), "--data", str(data), "--methods", "Baseline,KD,AT",
               "--teacher-epochs", "1", "--student-epochs", "1", "--batch-size", "4", "--device", "cpu",
               "--precision", "fp32", "--set", "teacher.model=ResNet18", "--set", "experiment.image_size=8"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    (exp_dir,) = (tmp_path / "logs").glob("final_experiment_*")  # one folder, not one per process
    assert {"final_experiment.log", "comparison_results.json", "comparison_results.csv",
            "experiment_summary.json"} <= {p.name for p in exp_dir.iterdir()}
    assert done.stdout.count("KNOWLEDGE DISTILLATION COMPARISON RESULTS") == 1  # rank 0 prints the table
    records = json.loads((exp_dir / "comparison_results.json").read_text())
    assert [r["method"] for r in records] == ["Teacher", "Baseline", "KD", "AT"]
    assert all(r["status"] == "ok" for r in records)
    summary = json.loads((exp_dir / "experiment_summary.json").read_text())
    assert summary["environment"]["processes"] == 2
    # both shards together: every one of the 30 training images once per epoch
    assert [r["history"][0]["images"] for r in records[1:]] == [30, 30, 30]

    # The recorded val accuracy is the saved model's accuracy on all 15 val images, evaluated alone here.
    loaded = load_image_data(data, 8, hflip=True, num_workers=0)
    runtime = Runtime(torch.device("cpu"), "fp32", channels_last=True)
    for record in records[1:]:
        checkpoint = load_checkpoint(tmp_path / "checkpoints" / "students" / f"{record['method']}_ResNet18_best.pth")
        model = build_resnet("ResNet18", 3, "cifar")
        model.load_state_dict(checkpoint["model"])
        alone = evaluate(Baseline(model), loaded, "val", 4, runtime).accuracies["student"]
        assert record["best_accuracy"] == alone
        assert abs(alone * 15 - round(alone * 15)) < 1e-9  # a count out of 15, not of one process's share

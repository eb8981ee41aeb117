"""torchrun jobs on the CPU (gloo): each process trains its shard, evaluation covers the whole val set once
and scores exactly the saved model, a split smaller than the job works, a failure on one process ends
the job, and only rank 0 writes logs, checkpoints and results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kd.baseline import Baseline
from kd.checkpoint import load_checkpoint
from kd.data import load_image_data
from kd.metrics import prediction_metrics
from kd.runtime import Runtime
from kd.trainer import evaluate
from models import build_resnet

REPO = Path(__file__).resolve().parents[1]

# Each process saves its buffers just before they are synchronised for evaluation, so the test can see
# that the ranks' BatchNorm statistics really differed.
SPY_BUFFERS = """
import os, torch
from kd import distributed
original = distributed.sync_buffers
calls = []
def spy(module):
    calls.append(1)
    torch.save({k: v.clone() for k, v in module.named_buffers()}, f"buffers_rank{os.environ['RANK']}_{len(calls)}.pt")
    original(module)
distributed.sync_buffers = spy
"""

# Rank 1 alone fails at the end of Baseline's first epoch, as a write or a data error on one shard would,
# and notes when.
FAIL_ON_RANK_1 = """
import os, time
from kd import trainer
from kd.config import UserError
original = trainer._Run.end_epoch
def end_epoch(self, *args):
    if os.environ["RANK"] == "1" and self.spec.name == "Baseline":
        open("failed_at", "w").write(str(time.time()))
        raise UserError("cannot read image 'shard1.png' (simulated): replace or remove it")
    return original(self, *args)
trainer._Run.end_epoch = end_epoch
"""


def _torchrun(tmp_path: Path, data: Path, patch: str, *extra: str, methods: str = "Baseline"
              ) -> subprocess.CompletedProcess:
    """A 2-process CPU job of run_experiment.py's command line, with `patch` run first in each process."""
    (tmp_path / "driver.py").write_text(patch + "\nimport sys, run_experiment\nsys.exit(run_experiment.cli(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(tmp_path / "driver.py"), "--data", str(data), "--methods", methods, "--teacher-epochs", "1",
               "--student-epochs", "1", "--batch-size", "4", "--device", "cpu", "--precision", "fp32",
               "--set", "teacher.model=ResNet18", "--set", "experiment.image_size=8", *extra]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_score_the_saved_model(tmp_path, make_image_folder):
    data = make_image_folder(tmp_path / "data", per_class={"train": 10, "val": 5})  # 15 val: odd, not 2 x 7
    done = _torchrun(tmp_path, data, SPY_BUFFERS, methods="Baseline,KD,AT")
    assert done.returncode == 0, done.stderr[-3000:]

    (exp_dir,) = (tmp_path / "logs").glob("final_experiment_*")  # one folder, not one per process
    assert {"final_experiment.log", "comparison_results.json", "comparison_results.csv",
            "experiment_summary.json"} <= {p.name for p in exp_dir.iterdir()}
    assert done.stdout.count("KNOWLEDGE DISTILLATION COMPARISON RESULTS") == 1  # rank 0 prints the table
    records = json.loads((exp_dir / "comparison_results.json").read_text())
    assert [r["method"] for r in records] == ["Teacher", "Baseline", "KD", "AT"]
    assert all(r["status"] == "ok" for r in records)
    summary = json.loads((exp_dir / "experiment_summary.json").read_text())
    assert summary["environment"]["processes"] == 2 and summary["environment"]["backend"] == "gloo"
    # both shards together: every one of the 30 training images once per epoch
    assert [r["history"][0]["images"] for r in records[1:]] == [30, 30, 30]

    # Each rank trained on its own shard, so its BatchNorm statistics differed from rank 0's...
    first = [torch.load(tmp_path / f"buffers_rank{rank}_1.pt") for rank in (0, 1)]
    means = [k for k in first[0] if k.endswith("running_mean") and not k.startswith("teacher.")]
    assert means and any(not torch.equal(first[0][k], first[1][k]) for k in means)

    # ...yet the recorded val figures are the saved model's on all 15 val images, evaluated alone here.
    loaded = load_image_data(data, 8, hflip=True, num_workers=0)
    runtime = Runtime(torch.device("cpu"), "fp32", channels_last=True)
    for record in records[1:]:
        checkpoint = load_checkpoint(tmp_path / "checkpoints" / "students" / f"{record['method']}_ResNet18_best.pth")
        model = build_resnet("ResNet18", 3, "cifar")
        model.load_state_dict(checkpoint["model"])
        alone = evaluate(Baseline(model), loaded, "val", 4, runtime)
        assert record["best_accuracy"] == alone.accuracies["student"]
        assert abs(alone.accuracies["student"] * 15 - round(alone.accuracies["student"] * 15)) < 1e-9
        # NLL moves with any change of BatchNorm statistics, where accuracy on 15 images may not
        assert record["nll"] == pytest.approx(prediction_metrics(alone.probs, alone.labels, None)["nll"], abs=1e-6)


def test_a_val_split_smaller_than_the_job(tmp_path, make_image_folder):
    # 2 val images, one unreadable and skipped: one image for 2 processes, so rank 1's share is empty
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class={"train": 8, "val": 1, "test": 1})
    (data / "val" / "b" / "img_000.png").write_bytes(b"not an image")
    done = _torchrun(tmp_path, data, "", "--skip-bad-images")
    assert done.returncode == 0, done.stderr[-3000:]
    (exp_dir,) = (tmp_path / "logs").glob("final_experiment_*")
    records = json.loads((exp_dir / "comparison_results.json").read_text())
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert all(r["best_accuracy"] in (0.0, 1.0) for r in records)  # a count out of the 1 val image
    assert all(sum(map(sum, r["confusion_matrix"])) == 1 for r in records)


def test_a_failure_on_one_process_ends_the_job(tmp_path, make_image_folder):
    data = make_image_folder(tmp_path / "data", per_class={"train": 10, "val": 5})
    done = _torchrun(tmp_path, data, FAIL_ON_RANK_1)
    assert time.time() - float((tmp_path / "failed_at").read_text()) < 60  # not the 30-minute collective timeout
    assert done.returncode != 0
    assert done.stderr.count("cannot read image 'shard1.png' (simulated)") == 1  # the real error, once
    assert "[rank0]: Traceback" not in done.stderr  # the other process stops without a traceback of its own

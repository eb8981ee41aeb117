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

from kd.data.load import load_image_data
from kd.engine.checkpoint import load_checkpoint
from kd.engine.evaluation import evaluate
from kd.engine.runtime import Runtime
from kd.methods.baseline import Baseline
from kd.results.metrics import prediction_metrics
from models import build_resnet

REPO = Path(__file__).resolve().parents[1]

# Each process saves its buffers just before they are synchronised for evaluation, so the test can see
# that the ranks' BatchNorm statistics really differed.
SPY_BUFFERS = """
import os, torch
from kd.engine import distributed
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
from kd.engine import run
from kd.errors import UserError
original = run.TrainingRun.end_epoch
def end_epoch(self, *args):
    if os.environ["RANK"] == "1" and self.spec.name == "Baseline":
        open("failed_at", "w").write(str(time.time()))
        raise UserError("cannot read image 'shard1.png' (simulated): replace or remove it")
    return original(self, *args)
run.TrainingRun.end_epoch = end_epoch
"""


# Each process saves CRD's memory banks (and Z constants, step counter) when they are created and at the end
# of each epoch, just before rank 0's buffers are broadcast for evaluation (which would make them equal anyway),
# with the training positions whose rows it updated itself (its own shard, before the all-gather).
SPY_CRD = """
import os, torch
from kd.engine import distributed
from kd.methods.crd import CRD
BUFFERS = ("memory_s", "memory_t", "z_s", "z_t", "steps")
rank, own_rows, epochs = os.environ["RANK"], [], []
def save(distiller, tag):
    torch.save({**{k: getattr(distiller, k).clone() for k in BUFFERS}, "own_rows": list(own_rows),
                "embed_s": distiller.embed_s.weight.detach().clone()}, f"crd_rank{rank}_{tag}.pt")
original_attach, original_update, original_sync = CRD.attach_data, CRD._update_memory, distributed.sync_buffers
def attach_data(self, labels, seed):
    original_attach(self, labels, seed)
    save(self, "init")
def update_memory(self, v_s, v_t, indices):
    own_rows.extend(indices.tolist())
    return original_update(self, v_s, v_t, indices)
def sync_buffers(module):
    if isinstance(module, CRD):
        epochs.append(1)
        save(module, f"epoch{len(epochs)}")
    original_sync(module)
CRD.attach_data, CRD._update_memory, distributed.sync_buffers = attach_data, update_memory, sync_buffers
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
        assert record["nll"] == pytest.approx(prediction_metrics(alone.probs, alone.labels, None).nll, abs=1e-6)


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


def test_torchrun_crd_memory_is_the_same_on_every_process(tmp_path, make_image_folder):
    """Each process updates CRD's memory rows of the whole batch (its own shard and the other's, all-gathered),
    so the banks, Z constants and step counters stay identical; the negatives differ, drawn per rank."""
    data = make_image_folder(tmp_path / "data", per_class={"train": 10, "val": 3})  # 15 images per shard
    done = _torchrun(tmp_path, data, SPY_CRD, "--set", "methods.CRD.nce_k=16", methods="CRD")
    assert done.returncode == 0, done.stderr[-3000:]
    (exp_dir,) = (tmp_path / "logs").glob("final_experiment_*")
    records = json.loads((exp_dir / "comparison_results.json").read_text())
    assert [(r["method"], r["status"]) for r in records] == [("Teacher", "ok"), ("CRD", "ok")]
    assert records[1]["history"][0]["images"] == 30

    init, after = ([torch.load(tmp_path / f"crd_rank{rank}_{tag}.pt") for rank in (0, 1)] for tag in ("init", "epoch1"))
    for name in ("memory_s", "memory_t", "z_s", "z_t", "steps"):
        assert torch.equal(init[0][name], init[1][name]), name  # drawn alike from the run's seed
        assert torch.equal(after[0][name], after[1][name]), name  # and updated alike, before any broadcast
    assert torch.equal(after[0]["embed_s"], after[1]["embed_s"])  # DDP: the embeddings train alike too
    assert int(after[0]["steps"]) == 4  # 15 images a shard in batches of 4: 4, 4, 4, 3
    assert float(after[0]["z_s"]) > 0 and float(after[0]["z_t"]) > 0
    shards = [after[rank]["own_rows"] for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 15 and sorted(shards[0] + shards[1]) == list(range(30))
    for rank in (0, 1):
        for name in ("memory_s", "memory_t"):
            moved = (after[rank][name] != init[rank][name]).any(dim=1)
            for shard in shards:  # this process's rows and the other process's rows
                assert moved[shard].all(), (rank, name)
            assert torch.allclose(after[rank][name].norm(dim=1), torch.ones(30), atol=1e-5)  # unit rows now

"""The methods of 2023-2024 (WTTM, CTKD, CTKD_DKD, NormKD, MLKD) in a run: trained together from one start on one
teacher, finite losses, CTKD's learned temperature per epoch in the history, the record and TensorBoard, MLKD's
two views in the plan and report, and plain ResNet18 students. Their pure losses are checked in
test_losses_wttm_normkd.py, test_losses_ctkd.py and test_losses_mlkd.py (OFA: test_ofa.py).
Tiny models and images: seconds on a 2-core CPU."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import run_experiment
from conftest import in_one_thread
from models import build_resnet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors

NEWEST = ("WTTM", "CTKD", "CTKD_DKD", "NormKD", "MLKD")
LOSS_KEYS = {"WTTM": {"loss_ce", "loss_wttm"}, "CTKD": {"loss_ce", "loss_kd"}, "CTKD_DKD": {"loss_ce", "loss_dkd"},
             "NormKD": {"loss_ce", "loss_normkd"}, "MLKD": {"loss_ce", "loss_kd", "loss_cc", "loss_bc"}}


@pytest.fixture(scope="module")
def newest_run(module_dir, make_image_folder):
    """A ResNet18 teacher, then the five methods trained together for two epochs of two steps each."""
    data = make_image_folder(module_dir / "data", per_class={"train": 3, "val": 1})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # in one thread, as the one_thread fixture (function-scoped) would
        code = in_one_thread(lambda: run_experiment.cli([
            "--data", str(data), "--methods", ",".join(NEWEST), "--teacher-epochs", "1", "--student-epochs", "2",
            "--batch-size", "4", "--device", "cpu", "--precision", "fp32", "--set", "teacher.model=resnet18",
            "--set", "teacher.lr=0.01", "--set", "experiment.image_size=8", "--set", "experiment.num_workers=0",
            "--logs-dir", str(module_dir / "logs"), "--checkpoints-dir", str(module_dir / "ckpt")]), module_dir)
    (experiment,) = (module_dir / "logs").glob("final_experiment_*")
    records = {r["method"]: r for r in json.loads((experiment / "comparison_results.json").read_text())}
    return {"code": code, "base": module_dir, "records": records, "printed": printed.getvalue(),
            "report": (experiment / "report.md").read_text()}


def test_the_newest_methods_train_together_with_finite_losses(newest_run):
    assert newest_run["code"] == 0
    records = newest_run["records"]
    assert set(records) == {"Teacher", *NEWEST}
    for method in NEWEST:
        record = records[method]
        assert record["status"] == "ok" and record["protocol"] == "common", (method, record.get("reason"))
        assert [set(entry["train_loss"]) for entry in record["history"]] == [LOSS_KEYS[method]] * 2
        assert all(math.isfinite(v) for entry in record["history"] for v in entry["train_loss"].values())
    assert len({records[m]["student_init_sha256"] for m in NEWEST}) == 1  # one start, one data order
    assert len({records[m]["first_batch_sha256"] for m in NEWEST}) == 1


def test_ctkd_records_its_learned_temperature(newest_run):
    """CTKD's temperature starts at 1 + 20 sigmoid(1) and moves as it is trained; the curriculum's strength is
    the authors' cosine at the first epoch of a 2-epoch run (its share of 10/240 rounds to 1 epoch: full)."""
    for method in ("CTKD", "CTKD_DKD"):
        record = newest_run["records"][method]
        weights = [entry["loss_weights"] for entry in record["history"]]
        assert weights[0]["temperature"] == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)
        assert [w["reversal"] for w in weights] == [1.0, 1.0]
        assert weights[1]["temperature"] != weights[0]["temperature"]
        assert record["reversal_epochs"] == 1 and math.isfinite(record["final_temperature"])
        runs = list((newest_run["base"] / "logs" / method).glob(f"{method}_ResNet18_Final_*"))
        events = EventAccumulator(str(runs[0]))
        events.Reload()
        logged = [e.value for e in events.Scalars("train/weight_temperature")]
        assert logged == pytest.approx([w["temperature"] for w in weights])


def test_the_newest_methods_save_plain_resnet18_students(newest_run):
    model = build_resnet("ResNet18", 3, "cifar")
    for method in NEWEST:
        path = newest_run["base"] / "ckpt" / "students" / f"{method}_ResNet18_best.pth"
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        assert not any("temperature" in key for key in state)
        model.load_state_dict(state, strict=True)


def test_the_plan_and_the_report_say_that_mlkd_sees_two_views(newest_run):
    assert "MLKD trains on two views of each image" in newest_run["printed"]
    assert "two views of each image" in newest_run["report"]

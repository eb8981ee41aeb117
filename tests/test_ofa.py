"""OFA-KD (Hao et al., NeurIPS 2023) in a run, across architectures: a ViT teacher with a CNN student and a CNN
teacher with a ViT student, each trained for two epochs: finite losses, a report row, and a saved student that
is the plain library model (the projectors never go with it). A student OFA cannot serve is refused before
anything trains, in one line. Its pure loss and projectors are checked in test_losses_ofa.py.
Tiny models and 32 px images: seconds on a 2-core CPU."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch

import run_experiment
from conftest import in_one_thread
from models import build_resnet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors

VIT, SIZE = "timm/test_vit", 32  # a tiny timm ViT: 2x2 patches of 16 px at 32 px
LOSS_KEYS = {"loss_ce", "loss_kd", "loss_ofa"}


def _argv(data, base, *extra: str) -> list[str]:
    return ["--data", str(data), "--methods", "OFA", "--teacher-epochs", "1", "--student-epochs", "2",
            "--batch-size", "4", "--device", "cpu", "--precision", "fp32", "--set", "teacher.lr=0.01",
            "--set", f"experiment.image_size={SIZE}", "--set", "experiment.num_workers=0",
            "--logs-dir", str(base / "logs"), "--checkpoints-dir", str(base / "ckpt"), *extra]


def _run(base, make_image_folder, *extra: str) -> dict:
    data = make_image_folder(base / "data", size=16, per_class={"train": 3, "val": 1})
    # one thread here too: a module fixture starts before the `one_thread` fixture (5x faster on 2 busy cores)
    code = in_one_thread(lambda: run_experiment.cli(_argv(data, base, *extra)), base)
    (experiment,) = (base / "logs").glob("final_experiment_*")
    records = {r["method"]: r for r in json.loads((experiment / "comparison_results.json").read_text())}
    (student,) = (base / "ckpt" / "students").glob("OFA_*_best.pth")
    return {"code": code, "records": records, "report": (experiment / "report.md").read_text(), "student": student}


@pytest.fixture(scope="module")
def vit_teacher_run(module_dir, make_image_folder):
    """A timm ViT teacher and a ResNet18 student (the default)."""
    return _run(module_dir / "vit_teacher", make_image_folder, "--set", f"teacher.model={VIT}")


@pytest.fixture(scope="module")
def vit_student_run(module_dir, make_image_folder):
    """A ResNet18 teacher and a timm ViT student."""
    return _run(module_dir / "vit_student", make_image_folder, "--set", "teacher.model=resnet18",
                "--set", f"student.model={VIT}")


def _assert_trained(run: dict) -> None:
    assert run["code"] == 0
    record = run["records"]["OFA"]
    assert record["status"] == "ok", record.get("reason")
    assert [set(entry["train_loss"]) for entry in record["history"]] == [LOSS_KEYS] * 2
    assert all(math.isfinite(v) for entry in record["history"] for v in entry["train_loss"].values())
    assert any(line.startswith("| OFA ") for line in run["report"].splitlines()), run["report"]


def _saved_state(run: dict) -> dict:
    state = torch.load(run["student"], map_location="cpu", weights_only=True)["model"]
    assert not any(key.startswith("projectors") for key in state)
    return state


def test_vit_teacher_trains_a_cnn_student(vit_teacher_run):
    _assert_trained(vit_teacher_run)
    build_resnet("ResNet18", 3, "cifar").load_state_dict(_saved_state(vit_teacher_run), strict=True)


def test_cnn_teacher_trains_a_vit_student(vit_student_run):
    _assert_trained(vit_student_run)
    plain = timm.create_model(VIT.removeprefix("timm/"), num_classes=3, img_size=SIZE)
    plain.load_state_dict(_saved_state(vit_student_run), strict=True)


def test_a_student_without_stages_or_vit_blocks_is_refused_in_one_line(tmp_path, make_image_folder, capsys):
    # timm's tiny MambaOut keeps its maps channels-last: no stages the probe finds, and no ViT blocks
    data = make_image_folder(tmp_path / "data", size=16, per_class={"train": 2, "val": 1})
    code = run_experiment.cli(_argv(data, tmp_path, "--check", "--set", "student.model=timm/test_mambaout"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
    assert "OFA cannot serve the student MambaOut" in lines[0] and "ViT" in lines[0]
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpt").exists()

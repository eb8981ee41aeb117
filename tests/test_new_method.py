"""Adding a method is one file, one registry line and its METHODS_CONFIG entry.

A toy method defined in this file alone (a loss, a setting with a rule, a report sentence, an extra record
field) is registered and runs through --check, a one-epoch run, report.md and --resume; a bad value of its
setting is one line and exit 2. And no code outside kd/methods/ names a particular method.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import final
import run_experiment
from kd.engine import run
from kd.engine.result import RunResult, TrainingLog
from kd.methods import METHODS, Distiller, Method, register
from kd.results.record import ModelCost, PredictionMetrics, RunRecord, TeacherFile
from kd.rules import NON_NEGATIVE, POSITIVE

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def toy_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Mean squared difference of the sharpened class probabilities."""
    p_student = F.softmax(sharpness * student_logits.float(), dim=1)
    p_teacher = F.softmax(sharpness * teacher_logits.detach().float(), dim=1)
    return (p_student - p_teacher).pow(2).sum(dim=1).mean()


class Toy(Distiller):
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, ce_weight: float, sharpness: float):
        super().__init__(student, teacher)
        self.ce_weight, self.sharpness = ce_weight, sharpness

    def forward_train(self, images, targets):
        logits = self.student(images)
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
                        "loss_toy": toy_loss(logits, self.teacher_forward(images), self.sharpness)}

    def record_extras(self, history, best_epoch):
        return {"toy_loss_at_best": history[best_epoch - 1]["train_loss"]["loss_toy"]}


TOY = Method("Toy", Toy, {"ce_weight": NON_NEGATIVE, "sharpness": POSITIVE},
             idea="a toy of this test: the student matches the teacher's sharpened probabilities.",
             record_fields={"toy_loss_at_best": "Toy loss at the best epoch"})


@pytest.fixture
def toy(monkeypatch):
    """Toy registered, with its METHODS_CONFIG entry, for one test."""
    register(TOY)
    monkeypatch.setitem(final.METHODS_CONFIG, "Toy", {"ce_weight": 1.0, "sharpness": 2.0})
    yield TOY
    del METHODS["Toy"]


def _argv(tmp_path: Path, *more: str) -> list[str]:
    return ["--data", str(tmp_path / "data"), "--methods", "Baseline,Toy", "--teacher-epochs", "1",
            "--student-epochs", "1", "--batch-size", "8", "--device", "cpu", "--precision", "fp32",
            "--set", "teacher.model=ResNet18", "--set", "experiment.image_size=8",
            "--logs-dir", str(tmp_path / "logs"), "--checkpoints-dir", str(tmp_path / "checkpoints"), *more]


def _experiment(tmp_path: Path) -> Path:
    (exp_dir,) = (tmp_path / "logs").glob("final_experiment_*")
    return exp_dir


def test_a_setting_without_a_rule_cannot_be_registered():
    with pytest.raises(TypeError, match="without a rule: sharpness"):
        register(Method("Toy", Toy, {"ce_weight": NON_NEGATIVE}, idea=""))
    with pytest.raises(TypeError, match="not an argument: temperature"):
        register(Method("Toy", Toy, {"ce_weight": NON_NEGATIVE, "sharpness": POSITIVE, "temperature": POSITIVE},
                        idea=""))
    assert "Toy" not in METHODS


class PositionalToy(Toy):
    def __init__(self, student: nn.Module, teacher: nn.Module, sharpness: float, *, ce_weight: float):
        super().__init__(student, teacher, ce_weight=ce_weight, sharpness=sharpness)


def test_a_setting_must_be_keyword_only():
    with pytest.raises(TypeError, match="its settings must be keyword-only; it takes student, teacher, sharpness"):
        register(Method("Toy", PositionalToy, {"ce_weight": NON_NEGATIVE, "sharpness": POSITIVE}, idea=""))
    assert "Toy" not in METHODS


def test_no_method_declares_a_record_field_the_record_has_already():
    common = RunRecord.from_json(_full_record()).to_json().keys()
    for method in METHODS.values():
        assert not set(method.record_fields) & set(common), method.name


def _full_record() -> dict:
    """A stored record with every part (values do not matter here)."""
    parts = [TeacherFile, RunResult, TrainingLog, PredictionMetrics, ModelCost]
    return {"method": "KD", "model": "m", "teacher": "t", "seed": 0, "status": "failed", "protocol": "common",
            "reason": "r", **{f.name: 0 for part in parts for f in dataclasses.fields(part)}}


def test_the_toy_gets_a_config_helper_checked_by_its_rule(toy):
    assert final.create_toy_config(sharpness=3.0) == {"ce_weight": 1.0, "sharpness": 3.0}
    with pytest.raises(final.UserError, match=r"methods.Toy.sharpness=0: must be a number > 0"):
        final.create_toy_config(sharpness=0)


def test_a_bad_value_of_its_setting_is_one_line_and_exit_2(toy, tmp_path, make_image_folder, capsys):
    make_image_folder(tmp_path / "data")
    assert run_experiment.cli(_argv(tmp_path, "--set", "methods.Toy.sharpness=-1", "--check")) == 2
    err = capsys.readouterr().err
    assert err == "error: bad value methods.Toy.sharpness=-1: must be a number > 0\n"


def test_check_plans_the_toy(toy, tmp_path, make_image_folder, capsys):
    make_image_folder(tmp_path / "data")
    assert run_experiment.cli(_argv(tmp_path, "--check")) == 0
    out = capsys.readouterr().out
    assert "methods Baseline, Toy" in out and "check passed" in out
    assert not (tmp_path / "logs").exists()


def _interrupt_after_first_epoch(monkeypatch, method: str) -> None:
    original = run.TrainingRun.end_epoch

    def end_epoch(self, epoch, *args):
        original(self, epoch, *args)  # the epoch's state is saved: --resume continues after it
        if self.spec.name == method:
            raise KeyboardInterrupt

    monkeypatch.setattr(run.TrainingRun, "end_epoch", end_epoch)


def test_one_epoch_run_report_and_resume(toy, tmp_path, make_image_folder, monkeypatch):
    make_image_folder(tmp_path / "data")
    with monkeypatch.context() as patch:
        _interrupt_after_first_epoch(patch, "Toy")
        assert run_experiment.cli(_argv(tmp_path)) == 130
    exp_dir = _experiment(tmp_path)
    assert (exp_dir / "resume" / "Toy_seed0.pt").exists()
    assert [r["method"] for r in json.loads((exp_dir / "comparison_results.json").read_text())] == \
        ["Teacher", "Baseline"]

    assert run_experiment.cli(_argv(tmp_path, "--resume")) == 0
    records = json.loads((exp_dir / "comparison_results.json").read_text())
    assert [(r["method"], r["status"]) for r in records] == [("Teacher", "ok"), ("Baseline", "ok"), ("Toy", "ok")]
    toy_record = records[2]
    assert toy_record["teacher"] == "ResNet18" and toy_record["epochs"] == 1
    assert toy_record["toy_loss_at_best"] == toy_record["history"][0]["train_loss"]["loss_toy"] > 0
    assert set(toy_record["history"][0]["train_loss"]) == {"loss_ce", "loss_toy"}
    report = (exp_dir / "report.md").read_text()
    assert "**Toy** — a toy of this test: the student matches the teacher's sharpened probabilities." in report
    assert f"Toy loss at the best epoch: {toy_record['toy_loss_at_best']:.4f}." in report
    csv = (exp_dir / "comparison_results.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in csv[1:]] == ["Teacher", "Baseline", "Toy"]
    saved = torch.load(tmp_path / "checkpoints" / "students" / "Toy_ResNet18_best.pth", weights_only=True)
    assert saved["meta"]["config"]["sharpness"] == 2.0


def test_no_code_outside_the_methods_package_names_a_method():
    """final.py's METHODS_CONFIG and default list aside, the project reads the registry: a method's name in
    quotes anywhere else in kd/ or run_experiment.py means code that knows about that one method."""
    files = [path for path in (REPO / "kd").rglob("*.py") if "methods" not in path.relative_to(REPO).parts]
    names = "|".join(re.escape(name) for name in METHODS)
    quoted = re.compile(rf"""["']({names})["']""")
    found = [f"{path.relative_to(REPO)}: {match.group(0)}" for path in [*files, REPO / "run_experiment.py"]
             for match in quoted.finditer(path.read_text(encoding="utf-8"))]
    assert found == []

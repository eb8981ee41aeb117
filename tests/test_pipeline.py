"""End to end through run_experiment.cli on a tiny generated folder, teacher reuse, and the trainer."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torchvision

import final
import run_experiment
from kd.data.load import load_image_data
from kd.engine.run import RunSpec, lr_factor
from kd.engine.runtime import Runtime, resolve_device, resolve_precision
from kd.engine.trainer import fit
from kd.errors import UserError
from kd.methods.baseline import Baseline
from models import apply_stem, build_resnet

RECORD_KEYS = {"method", "model", "teacher", "seed", "best_accuracy", "final_accuracy", "best_epoch",
               "training_time", "epochs"}
CSV_FIRST = ["method", "model", "teacher", "best_accuracy", "training_time", "epochs"]
META_KEYS = {"arch", "num_classes", "class_names", "image_size", "stem", "epoch", "best_accuracy", "config",
             "data_fingerprint", "torch_version"}


def _argv(world: dict, *extra: str) -> list[str]:
    return ["--data", str(world["data"]), "--methods", "Baseline", "--teacher-epochs", "1",
            "--student-epochs", "1", "--batch-size", "8", "--device", "cpu", "--precision", "fp32",
            "--set", "teacher.model=ResNet18", "--set", "experiment.image_size=8",
            "--logs-dir", str(world["logs"]), "--checkpoints-dir", str(world["ckpt"]), *extra]


def _experiment_dirs(logs: Path) -> set[Path]:
    return set(logs.glob("final_experiment_*"))


def _assert_plain_types(value, where="meta"):
    """Checkpoint metadata must be plain primitives (weights_only=True refuses e.g. TorchVersion)."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str, where
            _assert_plain_types(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _assert_plain_types(item, f"{where}[{i}]")
    else:
        assert value is None or type(value) in (str, int, float, bool), f"{where} is {type(value).__name__}"


@pytest.fixture(scope="module")
def world(module_dir, make_image_folder):
    """One first run (teacher + Baseline, 1 epoch each) shared by the tests of this module."""
    base = module_dir
    world = {"base": base, "logs": base / "logs", "ckpt": base / "checkpoints",
             "data": make_image_folder(base / "data", per_class={"train": 8, "val": 3, "test": 2})}
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
        mp.chdir(base)
        world["code"] = run_experiment.cli(_argv(world))
    world["stderr"] = stderr.getvalue()
    dirs = _experiment_dirs(world["logs"])
    world["exp"] = next(iter(dirs)) if len(dirs) == 1 else None
    return world


def _first_run_ok(world) -> None:
    assert world["code"] == 0, f"the first run failed:\n{world['stderr'][-3000:]}"


def test_first_run_writes_the_fixed_outputs(world):
    _first_run_ok(world)
    exp = world["exp"]
    assert exp is not None, list(world["logs"].iterdir())
    for name in ("final_experiment.log", "comparison_results.json", "comparison_results.csv",
                 "experiment_summary.json"):
        assert (exp / name).is_file(), name

    records = json.loads((exp / "comparison_results.json").read_text())
    assert isinstance(records, list)
    assert [r["method"] for r in records] == ["Teacher", "Baseline"]
    for record in records:
        assert RECORD_KEYS <= set(record)
        assert record["model"] == "ResNet18" and record["teacher"] == "None"
        assert record["seed"] == 0 and record["epochs"] == 1 and record["best_epoch"] == 1
        assert 0.0 <= record["best_accuracy"] <= 1.0 and 0.0 <= record["final_accuracy"] <= 1.0
        assert record["training_time"] > 0
    assert records[0]["reused"] is False

    with open(exp / "comparison_results.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:6] == CSV_FIRST
    assert [row[0] for row in rows[1:]] == ["Teacher", "Baseline"]

    summary = json.loads((exp / "experiment_summary.json").read_text())
    assert {"config", "environment", "teacher", "methods"} <= set(summary)
    assert summary["best_method"] == "Baseline"
    assert summary["teacher"]["reused"] is False
    assert summary["data"]["classes"] == ["a", "b", "c"] and summary["data"]["image_size"] == 8

    log_text = (exp / "final_experiment.log").read_text()
    assert "Training teacher ResNet18" in log_text and "Reusing teacher" not in log_text


def test_first_run_saves_teacher_and_tensorboard(world):
    _first_run_ok(world)
    teachers = world["ckpt"] / "teachers"
    assert (teachers / "ResNet18_teacher_best.pth").is_file()
    assert (teachers / "ResNet18_teacher_final.pth").is_file()
    assert not [p for p in teachers.iterdir() if p.name.endswith(".tmp")]
    assert list((world["ckpt"] / "students").glob("Baseline_ResNet18*_best.pth"))

    stamp = world["exp"].name.removeprefix("final_experiment_")
    teacher_runs = list((world["logs"] / "teachers").glob("ResNet18_Teacher_Final_*"))
    baseline_runs = list((world["logs"] / "Baseline").glob("Baseline_ResNet18_Final_*"))
    assert [p.name for p in teacher_runs] == [f"ResNet18_Teacher_Final_{stamp}"]
    assert [p.name for p in baseline_runs] == [f"Baseline_ResNet18_Final_{stamp}"]
    for run in teacher_runs + baseline_runs:
        assert list(run.glob("events.out.tfevents.*"))


def test_teacher_checkpoint_loads_into_plain_torchvision(world):
    path = world["ckpt"] / "teachers" / "ResNet18_teacher_best.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    meta = checkpoint["meta"]
    assert META_KEYS <= set(meta)
    _assert_plain_types(meta)
    assert meta["arch"] == "ResNet18" and meta["num_classes"] == 3 and meta["class_names"] == ["a", "b", "c"]
    assert meta["image_size"] == 8 and meta["stem"] == "cifar" and meta["epoch"] == 1
    model = apply_stem(torchvision.models.resnet18(num_classes=3), "cifar")
    model.load_state_dict(checkpoint["model"], strict=True)


def test_second_run_reuses_the_teacher(world):
    _first_run_ok(world)
    teachers = world["ckpt"] / "teachers"
    files = [teachers / "ResNet18_teacher_best.pth", teachers / "ResNet18_teacher_final.pth"]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in files]
    dirs_before = _experiment_dirs(world["logs"])

    assert run_experiment.cli(_argv(world)) == 0

    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in files] == before
    new = _experiment_dirs(world["logs"]) - dirs_before
    assert len(new) == 1
    exp = new.pop()
    assert "Reusing teacher" in (exp / "final_experiment.log").read_text()
    records = json.loads((exp / "comparison_results.json").read_text())
    assert records[0]["method"] == "Teacher" and records[0]["reused"] is True
    assert RECORD_KEYS <= set(records[0])
    assert [r["method"] for r in records] == ["Teacher", "Baseline"]


def test_mismatching_teacher_exits_2(world, capsys):
    _first_run_ok(world)
    best = world["ckpt"] / "teachers" / "ResNet18_teacher_best.pth"
    before = best.read_bytes()
    capsys.readouterr()
    code = run_experiment.cli(_argv(world, "--set", "experiment.image_size=16"))
    assert code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == errors[0]
    assert "image_size is 8 there but 16 here" in errors[0]
    assert "--retrain-teacher" in errors[0] and str(best) in errors[0]
    assert best.read_bytes() == before


# --- the trainer --------------------------------------------------------------------------------------------

def test_fit_lowers_the_training_loss(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 3})
    data = load_image_data(root, 8, hflip=False, num_workers=0)
    cfg = final.create_student_config(epochs=4, batch_size=8)  # the student defaults: SGD lr 0.01
    torch.manual_seed(0)
    model = build_resnet("ResNet18", 3, "cifar")
    spec = RunSpec("Baseline", cfg, 0, tmp_path / "tb", tmp_path / "ckpt" / "Baseline_ResNet18",
                   {"arch": "ResNet18", "epochs": 4})
    result, log, _ = fit(Baseline(model), data, spec, Runtime(torch.device("cpu"), "fp32", channels_last=False))

    history = log.history
    losses = [entry["train_loss"]["loss_ce"] for entry in history]
    assert len(history) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.best_accuracy > 0.5  # chance is 1/3
    assert [entry["epoch"] for entry in history] == [1, 2, 3, 4]
    assert 1 <= result.best_epoch <= 4 and 0.0 <= result.best_accuracy <= 1.0
    assert result.best_accuracy == max(entry["score"] for entry in history)
    assert result.final_accuracy == history[-1]["score"] and result.epochs == 4
    assert result.test_accuracy is None  # no test/ split
    assert (tmp_path / "ckpt" / "Baseline_ResNet18_best.pth").is_file()
    assert (tmp_path / "ckpt" / "Baseline_ResNet18_final.pth").is_file()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_step_lr_decays_where_the_yielded_batches_say(tmp_path, make_image_folder):
    # 33 images, batch 32: the lone 33rd image is dropped, so an epoch is one step, and StepLR(1, 0.1) must
    # decay before the second epoch (counting a second, never yielded, step decayed it one epoch late)
    root = make_image_folder(tmp_path / "data", per_class={"train": 11, "val": 2})
    data = load_image_data(root, 8, hflip=False, num_workers=0)
    cfg = final.create_student_config(epochs=3, batch_size=32, step_size=1, gamma=0.1)
    spec = RunSpec("Baseline", cfg, 0, tmp_path / "tb", tmp_path / "ckpt" / "Baseline", {})
    _, log, _ = fit(Baseline(build_resnet("ResNet18", 3, "cifar")), data, spec,
                    Runtime(torch.device("cpu"), "fp32", channels_last=False))
    assert [h["images"] for h in log.history] == [32, 32, 32]
    assert [h["lr"] for h in log.history] == pytest.approx([0.01, 0.001, 0.0001])


def test_lr_factor_schedules():
    step = lr_factor({"warmup_epochs": 0, "epochs": 100, "scheduler": "step", "step_size": 30, "gamma": 0.1}, 10)
    assert step(0) == 1.0 and step(299) == 1.0
    assert step(300) == pytest.approx(0.1) and step(600) == pytest.approx(0.01)

    warm = lr_factor({"warmup_epochs": 2, "epochs": 10, "scheduler": "onecycle", "step_size": 30,
                      "gamma": 0.1}, 5)
    assert warm(0) == pytest.approx(0.1) and warm(4) == pytest.approx(0.5) and warm(9) == pytest.approx(1.0)
    assert warm(10) == pytest.approx(1.0)
    factors = [warm(s) for s in range(10, 50)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    assert warm(49) < 0.01


def test_resolve_device_and_precision():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(UserError, match="fp16"):
        resolve_precision("fp16", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:0")

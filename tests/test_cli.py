"""Config validation, --set overrides and the command line (exit codes, one-line errors, --check)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import final
import run_experiment
from kd.errors import UserError
from kd.experiment.config import apply_overrides, parse_value

REPO = Path(__file__).resolve().parents[1]
VALID_METHODS = "Baseline, KD, AT, FitNets, DML, BYOT"


# --- config dicts --------------------------------------------------------------------------------------

def test_default_config_is_valid_and_a_copy():
    config = final.default_config()
    checked = final.validate_config(config)
    assert checked["experiment"]["methods"] == ["Baseline", "KD", "AT", "FitNets", "DML", "BYOT"]
    config["teacher"]["lr"] = 123.0
    config["methods"]["KD"]["temperature"] = 99.0
    assert final.TEACHER_CONFIG["lr"] == 0.1 and final.METHODS_CONFIG["KD"]["temperature"] == 4.0


def test_seed_defaults():
    teacher, student = final.TEACHER_CONFIG, final.STUDENT_CONFIG
    assert (teacher["model"], teacher["epochs"], teacher["lr"], teacher["batch_size"]) == ("ResNet50", 100, 0.1, 32)
    assert (teacher["scheduler"], teacher["step_size"], teacher["gamma"]) == ("step", 30, 0.1)
    assert (student["model"], student["epochs"], student["lr"], student["batch_size"]) == ("ResNet18", 50, 0.01, 32)
    for cfg in (teacher, student):
        assert (cfg["momentum"], cfg["weight_decay"]) == (0.9, 5e-4)
    assert final.METHODS_CONFIG["KD"]["temperature"] == 4.0
    assert final.METHODS_CONFIG["AT"]["beta"] == 1000.0


def test_demo_preset_applies_only_when_asked():
    demo = final.default_config("demo")
    assert Path(demo["experiment"]["data_dir"]) == Path("data", "digits")
    assert demo["experiment"]["hflip"] is False
    final.validate_config(demo)
    assert final.default_config()["experiment"]["data_dir"] == "data"


@pytest.mark.parametrize("create,typo,suggestion", [
    (final.create_student_config, "lr_rate", "lr"),
    (final.create_teacher_config, "epoch", "epochs"),
    (final.create_experiment_config, "seed", "seeds"),
    (final.create_kd_config, "temprature", "temperature"),
])
def test_unknown_key_suggests_the_closest(create, typo, suggestion):
    with pytest.raises(UserError) as info:
        create(**{typo: 1})
    message = str(info.value)
    assert "unknown config key" in message and f"{typo}'" in message
    assert f"did you mean '{suggestion}'?" in message


def test_unknown_key_in_a_full_config(tiny_config):
    tiny_config["student"]["lr_rate"] = 0.1
    with pytest.raises(UserError, match=r"student\.lr_rate.*did you mean 'lr'"):
        final.validate_config(tiny_config)


def test_missing_key_and_wrong_sections(tiny_config):
    del tiny_config["teacher"]["momentum"]
    with pytest.raises(UserError, match=r"'teacher' lacks key\(s\) momentum"):
        final.validate_config(tiny_config)
    with pytest.raises(UserError, match="config sections must be"):
        final.validate_config({"teacher": {}, "students": {}})


@pytest.mark.parametrize("section,key,value", [
    ("teacher", "lr", 0), ("student", "lr", -0.01), ("student", "epochs", 0), ("teacher", "epochs", 2.5),
    ("student", "epochs", True), ("teacher", "batch_size", 0), ("student", "momentum", 1.0),
    ("experiment", "precision", "fp8"), ("experiment", "device", "gpu"), ("experiment", "seeds", [0, 0]),
    ("experiment", "image_size", 4), ("experiment", "methods", []), ("experiment", "hflip", "yes"),
])
def test_bad_values_name_the_key(tiny_config, section, key, value):
    tiny_config[section][key] = value
    with pytest.raises(UserError) as info:
        final.validate_config(tiny_config)
    assert f"{section}.{key}=" in str(info.value) and "must be" in str(info.value)


@pytest.mark.parametrize("method,key,value", [
    ("KD", "temperature", 0), ("KD", "temperature", -1.0), ("KD", "kd_weight", -0.1), ("AT", "beta", -1),
    ("FitNets", "hint_layer", 0), ("DML", "num_peers", 1), ("BYOT", "alpha", 1.5)])
def test_bad_method_values_name_the_key(tiny_config, method, key, value):
    tiny_config["methods"][method][key] = value
    with pytest.raises(UserError, match=rf"methods\.{method}\.{key}="):
        final.validate_config(tiny_config)


def test_create_kd_config_is_validated():
    kd = final.create_kd_config(temperature=2.0)
    assert kd == {**final.METHODS_CONFIG["KD"], "temperature": 2.0}
    assert final.METHODS_CONFIG["KD"]["temperature"] == 4.0  # the dict itself is untouched
    with pytest.raises(UserError, match=r"methods\.KD\.temperature"):
        final.create_kd_config(temperature=0.0)
    assert final.create_teacher_config(epochs=3)["epochs"] == 3
    with pytest.raises(UserError, match=r"teacher\.lr"):
        final.create_teacher_config(lr=-1)


def test_method_names_are_case_insensitive(tiny_config):
    tiny_config["experiment"]["methods"] = ["kd", "BASELINE", " fitnets", "KD"]
    assert final.validate_config(tiny_config)["experiment"]["methods"] == ["KD", "Baseline", "FitNets"]
    tiny_config["experiment"]["methods"] = ["KD", "Distill"]
    with pytest.raises(UserError, match=f"unknown method 'Distill': valid methods are {VALID_METHODS}"):
        final.validate_config(tiny_config)


# --- --set -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("3", 3), ("0.05", 0.05), ("1e-3", 1e-3), ("true", True), ("False", False), ("null", None),
    ("None", None), ("[0, 1, 2]", [0, 1, 2]), ('["KD","AT"]', ["KD", "AT"]), ("cifar", "cifar"),
    ("ResNet18", "ResNet18"), ("data/my images", "data/my images"), (" 7 ", 7)])
def test_parse_value(text, expected):
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_apply_overrides_then_validate(tiny_config):
    apply_overrides(tiny_config, ["student.lr=0.05", "teacher.epochs=3", "experiment.hflip=false",
                                  "experiment.seeds=[0,1]", "methods.KD.temperature=2",
                                  "experiment.methods=[\"kd\",\"at\"]", "methods.FitNets.hint_epochs=null",
                                  "teacher.model=ResNet34", "experiment.stem=cifar"])
    checked = final.validate_config(tiny_config)
    assert checked["student"]["lr"] == 0.05
    assert checked["teacher"]["epochs"] == 3 and checked["teacher"]["model"] == "ResNet34"
    assert checked["experiment"]["hflip"] is False and checked["experiment"]["seeds"] == [0, 1]
    assert checked["methods"]["KD"]["temperature"] == 2
    assert checked["experiment"]["methods"] == ["KD", "AT"]
    assert checked["experiment"]["stem"] == "cifar"


@pytest.mark.parametrize("assignment,pattern", [
    ("student.lr_rate=0.1", r"unknown config key 'student\.lr_rate'.*did you mean 'lr'"),
    ("studnet.lr=0.1", r"unknown config section 'studnet'.*did you mean 'student'"),
    ("methods.KD.temprature=2", r"unknown config key 'methods\.KD\.temprature'.*did you mean 'temperature'"),
    ("methods.Hinton.temperature=2", r"unknown config key 'methods\.Hinton'"),
    ("student.lr", r"not of the form section\.key=value"),
    ("student=3", r"must name a key"),
])
def test_bad_set_assignments(tiny_config, assignment, pattern):
    with pytest.raises(UserError, match=pattern):
        apply_overrides(tiny_config, [assignment])


def test_flags_override_set_and_batch_size_sets_both(tmp_path):
    args = run_experiment.build_parser().parse_args(
        ["--set", "student.epochs=5", "--student-epochs", "2", "--batch-size", "4", "--methods", "kd,,AT",
         "--seeds", "0,3", "--data", str(tmp_path / "d"), "--retrain-teacher", "--set", "teacher.lr=0.2"])
    config = run_experiment.config_from_args(args)
    assert config["student"]["epochs"] == 2
    assert config["teacher"]["batch_size"] == config["student"]["batch_size"] == 4
    assert config["experiment"]["methods"] == ["kd", "AT"] and config["experiment"]["seeds"] == [0, 3]
    assert config["experiment"]["retrain_teacher"] is True and config["teacher"]["lr"] == 0.2
    assert config["experiment"]["data_dir"] == str(tmp_path / "d")
    # flags that were not given leave the dicts alone
    assert config["experiment"]["skip_bad_images"] is False and config["experiment"]["device"] == "auto"


# --- the command line ----------------------------------------------------------------------------------------

def _one_error_line(err: str) -> str:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("error: ")
    return lines[0]


def _out_args(tmp_path) -> list[str]:
    return ["--logs-dir", str(tmp_path / "logs"), "--checkpoints-dir", str(tmp_path / "checkpoints")]


def test_subprocess_without_data_folder_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "run_experiment.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "data folder 'data' not found" in line and "--demo" in line
    assert sorted(os.listdir(tmp_path)) == []  # nothing was created


def test_missing_data_dir_exits_2(tmp_path, capsys):
    code = run_experiment.cli(["--data", str(tmp_path / "missing")] + _out_args(tmp_path))
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "missing") in line
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("argv", [["--bogus"], ["--teacher-epochs", "many"], ["--batch-size"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        run_experiment.cli(argv)
    assert info.value.code == 2
    _one_error_line(capsys.readouterr().err)


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as info:
        run_experiment.cli(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--demo", "--data", "--methods", "--seeds", "--device", "--precision", "--retrain-teacher",
                 "--check", "--logs-dir", "--checkpoints-dir", "--set"):
        assert flag in out


def test_unknown_method_exits_2_listing_valid_ones(tmp_path, capsys, image_folder):
    code = run_experiment.cli(["--data", str(image_folder), "--methods", "KD,Bogus"] + _out_args(tmp_path))
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "Bogus" in line and VALID_METHODS in line


def test_fp16_on_cpu_exits_2(tmp_path, capsys, image_folder):
    code = run_experiment.cli(["--data", str(image_folder), "--device", "cpu", "--precision", "fp16"]
                              + _out_args(tmp_path))
    assert code == 2
    assert "fp16" in _one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_cpu_machine_exits_2(tmp_path, capsys, image_folder, device):
    code = run_experiment.cli(["--data", str(image_folder), "--device", device] + _out_args(tmp_path))
    assert code == 2
    assert "CUDA is not available" in _one_error_line(capsys.readouterr().err)


def test_check_prints_the_plan_and_trains_nothing(tmp_path, capsys, make_image_folder):
    root = make_image_folder(tmp_path / "data", classes=("cat", "dog", "emu"),
                             per_class={"train": 4, "val": 2, "test": 1})
    (root / "train" / "cat" / "notes.txt").write_text("x")
    code = run_experiment.cli(["--data", str(root), "--check", "--methods", "at,kd", "--seeds", "0,1",
                               "--device", "cpu"] + _out_args(tmp_path))
    assert code == 0
    out = capsys.readouterr().out
    assert "cat, dog, emu" in out and "3 classes" in out
    assert "train 12" in out and "val 6" in out and "test 3" in out
    assert "1 non-image file(s) ignored" in out
    assert f"{16}x{16} px" in out and "cifar stem" in out  # 8 px images: "auto" clamps to 16
    assert "AT, KD" in out and "seeds 0, 1" in out
    # from timed steps; the teacher is trained too, so it has a time of its own (not "reused")
    assert re.search(r"estimated time: ~[\d.]+ (s|min) \(teacher [\d.]+ (s|min), students [\d.]+ (s|min)\)", out), out
    assert "check passed" in out
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()


def test_demo_check_exports_digits_into_the_working_directory(tmp_path, capsys):
    # cwd is tmp_path (conftest), so the demo's data/digits lands there, not in the repository
    code = run_experiment.cli(["--demo", "--check", "--device", "cpu"] + _out_args(tmp_path))
    assert code == 0
    out = capsys.readouterr().out
    assert "10 classes" in out and "train 1078" in out and "horizontal flip off" in out
    assert (tmp_path / "data" / "digits" / "val").is_dir()
    assert not (tmp_path / "logs").exists()

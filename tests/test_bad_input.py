"""Every row of the bad-input table: exit code 2 (or a clean run where the input is fine), one line on
stderr naming the problem and the fix, no traceback, and nothing already written is touched."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import run_experiment


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = run_experiment.cli(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _fast(*extra: str) -> list[str]:
    return ["--device", "cpu", "--precision", "fp32", "--batch-size", "8", "--set", "teacher.model=ResNet18",
            "--set", "experiment.image_size=8", "--teacher-epochs", "1", "--student-epochs", "1", *extra]


@pytest.fixture
def folder(make_image_folder, tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


def _remove(path: Path) -> None:
    shutil.rmtree(path)


@pytest.mark.parametrize("breakage, needle", [
    (lambda root: _remove(root), "not found"),
    (lambda root: _remove(root / "train"), "no train/ folder"),
    (lambda root: _remove(root / "val"), "no val/ folder"),
], ids=["no data dir", "no train", "no val"])
def test_missing_folders_show_the_layout(capsys, folder, breakage, needle):
    breakage(folder)
    code, _, err = _cli(capsys, "--data", str(folder), "--check")
    line = _one_error_line(err)
    assert code == 2 and needle in line and "train/<class>/" in line and "--demo" in line


def test_empty_class_folder_is_named(capsys, folder):
    for image in (folder / "val" / "b").iterdir():
        image.unlink()
    code, _, err = _cli(capsys, "--data", str(folder), "--check")
    assert code == 2 and str(folder / "val" / "b") in _one_error_line(err)


def test_single_class_gives_the_count(capsys, make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "one", classes=("only",))
    code, _, err = _cli(capsys, "--data", str(root), "--check")
    assert code == 2 and "1 class folder" in _one_error_line(err)


@pytest.mark.parametrize("split, needle", [("val", "no readable image left in"),
                                           ("train", "the train split has 1 image(s), too few for 1 process")])
def test_too_few_readable_images_after_skipping(capsys, make_image_folder, tmp_path, split, needle):
    root = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class={"train": 1, "val": 1})
    broken = (root / "val").rglob("*.png") if split == "val" else (root / "train" / "b").glob("*.png")
    for image in list(broken):
        image.write_bytes(b"not an image")
    code, _, err = _cli(capsys, "--data", str(root), "--check", "--skip-bad-images", *_fast())
    assert code == 2 and needle in _one_error_line(err)


def test_differing_class_sets_are_listed(capsys, folder):
    (folder / "val" / "c").rename(folder / "val" / "z")
    code, _, err = _cli(capsys, "--data", str(folder), "--check")
    line = _one_error_line(err)
    assert code == 2 and "only in train: c" in line and "only in val: z" in line


def test_corrupt_image_is_named_and_can_be_skipped(capsys, folder):
    bad = folder / "train" / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, _, err = _cli(capsys, "--data", str(folder), "--check")
    line = _one_error_line(err)
    assert code == 2 and str(bad) in line and "--skip-bad-images" in line
    code, out, err = _cli(capsys, "--data", str(folder), "--check", "--skip-bad-images")
    assert code == 0 and "skipped 1 unreadable image" in err and "check passed" in out


def test_hidden_and_non_image_files_are_ignored_and_counted(capsys, folder):
    for name in (".DS_Store", "Thumbs.db", "notes.txt"):
        (folder / "train" / "a" / name).write_bytes(b"junk")
    code, out, _ = _cli(capsys, "--data", str(folder), "--check")
    assert code == 0 and "3 non-image file(s) ignored" in out


def test_mixed_image_modes_train(capsys, folder, tmp_path):
    rgb = Image.open(folder / "train" / "a" / "img_000.png").convert("RGB")
    rgb.convert("L").save(folder / "train" / "a" / "gray.png")
    rgb.convert("RGBA").save(folder / "train" / "b" / "alpha.png")
    rgb.convert("P").save(folder / "train" / "c" / "palette.png")
    Image.fromarray((__import__("numpy").asarray(rgb.convert("L"), dtype="uint16") * 257)).save(
        folder / "val" / "a" / "deep.png")
    code, _, err = _cli(capsys, "--data", str(folder), "--methods", "Baseline", "--logs-dir", str(tmp_path / "logs"),
                        "--checkpoints-dir", str(tmp_path / "ckpt"), *_fast())
    assert code == 0, err


@pytest.fixture
def trained(capsys, folder, tmp_path) -> dict:
    """A finished tiny experiment whose files later bad input must not touch."""
    logs, ckpt = tmp_path / "logs", tmp_path / "ckpt"
    code, _, err = _cli(capsys, "--data", str(folder), "--methods", "Baseline", "--logs-dir", str(logs),
                        "--checkpoints-dir", str(ckpt), *_fast())
    assert code == 0, err
    files = {p: p.read_bytes() for p in [*logs.rglob("*"), *ckpt.rglob("*")] if p.is_file()}
    return {"data": folder, "logs": logs, "ckpt": ckpt, "files": files}


def _untouched(trained: dict) -> None:
    for path, content in trained["files"].items():
        assert path.read_bytes() == content, path


@pytest.mark.parametrize("flags, needle", [
    (["--set", "experiment.image_size=16"], "image_size is 8 there but 16 here"),
    (["--set", "teacher.model=ResNet34"], "ResNet34_teacher_best.pth"),
], ids=["image size", "arch"])
def test_mismatching_teacher(capsys, trained, flags, needle):
    base = ["--data", str(trained["data"]), "--logs-dir", str(trained["logs"]), "--checkpoints-dir",
            str(trained["ckpt"]), *_fast()]
    if "ResNet34" in flags[1]:  # a ResNet18 checkpoint where a ResNet34 teacher is expected
        shutil.copy(trained["ckpt"] / "teachers" / "ResNet18_teacher_best.pth",
                    trained["ckpt"] / "teachers" / "ResNet34_teacher_best.pth")
        needle = "builder is 'resnet18' there but 'resnet34' here"
    code, _, err = _cli(capsys, *base, *flags, "--check")
    line = _one_error_line(err)
    assert code == 2 and needle in line and "--retrain-teacher" in line
    _untouched(trained)


def test_other_classes_in_teacher(capsys, trained, make_image_folder, tmp_path):
    other = make_image_folder(tmp_path / "other", classes=("x", "y", "z"))
    code, _, err = _cli(capsys, "--data", str(other), "--checkpoints-dir", str(trained["ckpt"]), *_fast(),
                        "--check")
    line = _one_error_line(err)
    assert code == 2 and "class_names" in line and "--retrain-teacher" in line


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"], ids=["truncated", "foreign"])
def test_broken_teacher_file_is_named(capsys, folder, tmp_path, content):
    path = tmp_path / "ckpt" / "teachers" / "ResNet18_teacher_best.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    code, _, err = _cli(capsys, "--data", str(folder), "--checkpoints-dir", str(tmp_path / "ckpt"), *_fast(),
                        "--check")
    assert code == 2 and str(path) in _one_error_line(err)


@pytest.mark.parametrize("flags, needle", [
    (["--set", "student.learning_rate=0.1"], "did you mean 'lr'"),
    (["--set", "student.lr_rate=0.1"], "did you mean 'lr'"),
    (["--set", "methods.KD.temprature=2"], "did you mean 'temperature'"),
    (["--set", "student.lr=0"], "student.lr=0"),
    (["--set", "student.lr=-1"], "student.lr=-1"),
    (["--student-epochs", "0"], "student.epochs=0"),
    (["--batch-size", "0"], "batch_size=0"),
    (["--set", "methods.KD.temperature=-1"], "methods.KD.temperature=-1"),
    (["--set", "methods.AT.beta=-5"], "methods.AT.beta=-5"),
    (["--seeds", "0,x"], "--seeds '0,x'"),
    (["--seeds", "1,1"], "experiment.seeds=[1, 1]"),
    (["--precision", "fp8"], "one of auto, fp32, bf16, fp16"),
], ids=["key typo", "key typo 2", "method key typo", "lr", "negative lr", "epochs", "batch", "temperature",
        "weight", "seeds", "dup seeds", "precision"])
@pytest.mark.parametrize("check", [["--check"], []], ids=["check", "run"])
def test_bad_config(capsys, folder, flags, needle, check):
    code, _, err = _cli(capsys, "--data", str(folder), *_fast(), *flags, *check)
    assert code == 2 and needle in _one_error_line(err)
    assert not Path("logs").exists()  # stopped before anything was written


@pytest.mark.parametrize("device, available", [("cuda", "cuda"), ("mps", "mps")])
def test_unavailable_device(capsys, folder, device, available):
    import torch
    if (device == "cuda" and torch.cuda.is_available()) or (device == "mps" and torch.backends.mps.is_available()):
        pytest.skip(f"{device} is available here")
    code, _, err = _cli(capsys, "--data", str(folder), "--device", device, "--check")
    line = _one_error_line(err)
    assert code == 2 and "--device cpu" in line


def test_unwritable_logs_dir_is_named(capsys, trained, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = _cli(capsys, "--data", str(trained["data"]), "--methods", "Baseline", "--logs-dir",
                        str(blocker / "logs"), "--checkpoints-dir", str(trained["ckpt"]), *_fast())
    assert code == 2 and str(blocker / "logs") in _one_error_line(err)
    _untouched(trained)


def test_diverging_run_is_recorded_as_failed_and_others_go_on(capsys, folder, tmp_path):
    code, _, err = _cli(capsys, "--data", str(folder), "--methods", "AT,Baseline", "--set", "methods.AT.beta=1e300",
                        "--logs-dir", str(tmp_path / "logs"), "--checkpoints-dir", str(tmp_path / "ckpt"), *_fast())
    assert code == 1
    assert "AT (seed 0) diverged in epoch 1" in err and "lower lr" in err
    records = json.loads(next((tmp_path / "logs").glob("final_experiment_*/comparison_results.json")).read_text())
    status = {r["method"]: r["status"] for r in records}
    assert status == {"Teacher": "ok", "AT": "failed", "Baseline": "ok"}
    csv = next((tmp_path / "logs").glob("final_experiment_*/comparison_results.csv")).read_text()
    assert "Baseline" in csv and "\nAT," not in csv


def test_run_whose_weights_turn_non_finite_after_a_finite_loss_is_recorded_as_failed(capsys, folder, tmp_path):
    # one step per epoch (18 images, batch 32): the loss is computed before the step, so only the
    # evaluation can see that lr 1e30 left the weights non-finite
    code, _, err = _cli(capsys, "--data", str(folder), "--methods", "Baseline", "--set", "student.lr=1e30",
                        "--logs-dir", str(tmp_path / "logs"), "--checkpoints-dir", str(tmp_path / "ckpt"),
                        *_fast("--batch-size", "32"))
    assert code == 1
    assert "Baseline (seed 0) diverged in epoch 1: its val outputs are not finite" in err
    records = json.loads(next((tmp_path / "logs").glob("final_experiment_*/comparison_results.json")).read_text())
    assert {r["method"]: r["status"] for r in records} == {"Teacher": "ok", "Baseline": "failed"}


def test_run_out_of_memory_is_recorded_as_failed_and_others_go_on(capsys, folder, tmp_path, monkeypatch):
    from kd.methods.at import AT

    def out_of_memory(self, images, targets, **batch):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(AT, "forward_train", out_of_memory)
    code, _, err = _cli(capsys, "--data", str(folder), "--methods", "AT,Baseline", "--no-share-teacher",
                        "--logs-dir", str(tmp_path / "logs"), "--checkpoints-dir", str(tmp_path / "ckpt"), *_fast())
    assert code == 1
    assert "cpu ran out of memory training AT: try a smaller --batch-size (now 8)" in err
    records = json.loads(next((tmp_path / "logs").glob("final_experiment_*/comparison_results.json")).read_text())
    assert {r["method"]: r["status"] for r in records} == {"Teacher": "ok", "AT": "failed", "Baseline": "ok"}


def test_experiments_started_in_the_same_second_get_their_own_folders(tmp_path):
    from kd.results.files import create_experiment_dir

    folders = [create_experiment_dir(tmp_path / "logs").path for _ in range(3)]
    assert len(set(folders)) == 3 and all(folder.is_dir() for folder in folders)

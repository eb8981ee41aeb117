"""--data cifar100:DIR / cifar10:DIR: torchvision's CIFAR files, val held out of the training set, the official
test set reporting; a file in the same format that is not the official one is read with a warning; offline
without the files is one line and exit 2."""
from __future__ import annotations

import csv
import json
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torchvision

import run_experiment
from conftest import make_image_array
from kd.data.cifar import cifar_name, load_cifar

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from cifar import write_cifar100 as write_cifar_files  # noqa: E402  bench/cifar.py's writer of the format

CLASSES = ["apple", "bee", "cat", "dog"]


def write_cifar100(root: Path, train_per_class: int = 12, test_per_class: int = 3) -> Path:
    """A tiny file in CIFAR-100's python format (not the official one): learnable 32 px classes."""
    rng = np.random.default_rng(0)
    labels = {split: [k for k in range(len(CLASSES)) for _ in range(count)]
              for split, count in (("train", train_per_class), ("test", test_per_class))}
    return write_cifar_files(root, labels, lambda k: make_image_array(k, 32, rng), CLASSES)


def test_names():
    assert cifar_name("cifar100:/data") == "cifar100" and cifar_name("CIFAR10:x") == "cifar10"
    assert cifar_name("data/digits") is None and cifar_name("c:/images") is None


def test_val_is_a_stratified_share_of_the_training_set_and_test_is_the_test_set(tmp_path, kd_log):
    data = load_cifar(f"cifar100:{write_cifar100(tmp_path)}", "auto", True, val_images=8)
    assert data.counts == {"train": 40, "val": 8, "test": 12} and data.class_names == CLASSES
    assert [int((data.splits["val"].labels == k).sum()) for k in range(4)] == [2, 2, 2, 2]
    assert data.image_size == 32 and data.splits["train"].images.shape[1:] == (3, 32, 32)
    assert data.official is False and "not the official cifar100" in kd_log.text


def test_a_run_on_the_file_records_that_it_is_not_the_official_one(tmp_path, capsys):
    root = write_cifar100(tmp_path / "c100")
    code = run_experiment.cli(["--data", f"cifar100:{root}", "--methods", "Baseline,KD", "--device", "cpu",
                               "--precision", "fp32", "--batch-size", "16", "--teacher-epochs", "1",
                               "--student-epochs", "1", "--set", "teacher.model=ResNet18",
                               "--set", "experiment.cifar_val_images=8"])
    out = capsys.readouterr().out
    assert code == 0 and "images: train 40, val 8, test 12" in out
    folder = next((tmp_path / "logs").glob("final_experiment_*"))
    summary = json.loads((folder / "experiment_summary.json").read_text())
    assert summary["data"]["official_files"] is False and summary["data"]["image_size"] == 32
    records = json.loads((folder / "comparison_results.json").read_text())
    assert [r["method"] for r in records] == ["Teacher", "Baseline", "KD"] and all(r["status"] == "ok" for r in records)
    assert all(r["test_accuracy"] is not None for r in records)  # the official test set reports
    with open(folder / "comparison_results.csv", encoding="utf-8") as file:  # and the last epoch's, labelled
        rows = {row["method"]: row for row in csv.DictReader(file)}
    kd = next(r for r in records if r["method"] == "KD")
    assert float(rows["KD"]["final_test_accuracy"]) == pytest.approx(kd["final_test_accuracy"])


def test_offline_without_the_files_is_one_line(tmp_path, capsys, monkeypatch):
    def offline(*_args, **_kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", offline)
    code = run_experiment.cli(["--data", f"cifar100:{tmp_path / 'nothing'}", "--check", "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert "cifar-100-python.tar.gz" in lines[0] and str(tmp_path / "nothing") in lines[0]
    assert not (tmp_path / "logs").exists()


def test_other_image_sizes_are_refused(tmp_path, capsys):
    root = write_cifar100(tmp_path / "c100")
    code = run_experiment.cli(["--data", f"cifar100:{root}", "--check", "--set", "experiment.image_size=24"])
    assert code == 2 and "cifar100 images are 32 px" in capsys.readouterr().err

"""The benchmarks' own plumbing, checked on the CPU so that CI catches what would crash them on a GPU."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import final
from kd.data.load import load_image_data

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import cifar as cifar_bench  # noqa: E402
import compare_records  # noqa: E402
import scale  # noqa: E402
import throughput  # noqa: E402


def test_throughput_distillers_live_on_the_teachers_device():
    """The plain side of bench/throughput.py moves every distiller to the teacher's device, FitNets'
    regressor included; on the meta device (no memory, no CPU fallback) a step runs only if it did."""
    meta = torch.device("meta")
    teacher, student = throughput._models(10, meta)
    state = throughput._models(10, torch.device("cpu"))[1].state_dict()
    settings = final.default_config()["methods"]
    images, labels = torch.randn(4, 3, 12, 12, device=meta), torch.zeros(4, dtype=torch.long, device=meta)
    for distiller in throughput._distillers(state, teacher.eval(), 10, settings):
        assert {p.device for p in distiller.parameters()} == {meta}, type(distiller).__name__
        _, losses = distiller.forward_train(images, labels)
        assert all(loss.device == meta for loss in losses.values())
        distiller.close()


def test_cifar_bench_measures_both_sides_on_a_tiny_file(tmp_path):
    """bench/cifar.py (gpu_check's cifar step) on a CPU: the synthetic CIFAR-100 file, the teacher in the published
    layout, the project's run under --preset cifar100 and the plain loop each give a speed."""
    cifar_bench.random_cifar100(tmp_path, train_per_class=2, test_per_class=1)
    cifar_bench.teacher_file(tmp_path / "teacher.pth")
    args = argparse.Namespace(device="cpu", epochs=1, val_images=100)
    speeds = cifar_bench.project(tmp_path, args, batch=64, runs=1)
    assert speeds["steps"] > 0 and speeds["wall"] > 0
    with pytest.raises(cifar_bench.Failed, match="past the budget"):  # its process group killed, not waited for
        cifar_bench.project(tmp_path, args, batch=64, runs=1, timeout=1)
    assert cifar_bench.plain(tmp_path, args, batch=64) > 0


def test_scale_images_and_subsets(tmp_path):
    scale.make_images(tmp_path / "full", per_class=2)
    scale.subset(tmp_path / "full", tmp_path / "half", per_class=1)
    full = load_image_data(tmp_path / "full", scale.SIZE, num_workers=0)
    half = load_image_data(tmp_path / "half", scale.SIZE, num_workers=0)
    assert len(full.class_names) == scale.CLASSES == len(half.class_names)
    assert full.counts == {"train": 200, "val": 200} and half.counts == {"train": 100, "val": 200}
    assert full.splits["train"].images.shape[1:] == (3, 32, 32)
    assert torch.equal(full.splits["train"].images[::2], half.splits["train"].images)  # the same first images


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_gpu_check_without_a_gpu_says_so():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "no CUDA GPU here" in done.stderr


def test_compare_records_tells_clocks_from_results(tmp_path, capsys):
    """bench/compare_records.py: runs equal but for clocks and paths are equal; any other value differs."""
    run = {"method": "KD", "seed": 0, "best_accuracy": 0.5, "training_time": 3.0, "checkpoint": "a.pth",
           "history": [{"train_seconds": 1.0, "val": {"student": 0.5}}]}
    changed = {**run, "training_time": 9.0, "checkpoint": "b.pth", "history": [{"train_seconds": 2.0,
                                                                                  "val": {"student": 0.25}}]}
    for name, records in (("a", [run]), ("b", [{**run, "training_time": 7.0}]), ("c", [changed])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "comparison_results.json").write_text(json.dumps(records))
    assert compare_records.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "KD seed 0: equal" in capsys.readouterr().out
    assert compare_records.main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "KD seed 0: 1 value(s) differ: history[0].val.student: 0.5 != 0.25" in capsys.readouterr().out
    assert compare_records.main([str(tmp_path / "a"), str(tmp_path / "c"), "--expect-changed", "KD"]) == 0

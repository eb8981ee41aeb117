"""Shared fixtures: tiny learnable image folders and a fast config.

Every test runs with the working directory switched to its own tmp_path (autouse fixture below), so
a relative default such as data/, logs/ or checkpoints/ can never touch the repository's folders.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")
if str(REPO) not in sys.path:  # plain `pytest` (not `python -m pytest`) does not add the repo root
    sys.path.insert(0, str(REPO))


def class_pattern(k: int, size: int) -> tuple[int, int, int]:
    """Where class k's bright square sits (row, col) and in which channel: one corner per class,
    then the channel changes, so classes 0..11 are all distinct."""
    half = size // 2
    corner = k % 4
    row, col = (corner // 2) * half, (corner % 2) * half
    channel = (k // 4) % 3
    return row, col, channel


def make_image_array(k: int, size: int, rng: np.random.Generator, noise: int = 30) -> np.ndarray:
    """An RGB uint8 (size, size, 3) image of class k: dark noise plus a bright class-specific square."""
    image = rng.integers(0, noise + 1, size=(size, size, 3), dtype=np.int64)
    row, col, channel = class_pattern(k, size)
    half = max(1, size // 2)
    image[row:row + half, col:col + half, :] += 60
    image[row:row + half, col:col + half, channel] += 150
    return np.clip(image, 0, 255).astype(np.uint8)


def _make_image_folder(root, classes=("a", "b", "c"), per_class=None, size=8, seed=0, ext=".png",
                       mode="RGB") -> Path:
    """Write root/<split>/<class>/img_XXX<ext> images whose content depends on the class.

    per_class maps split -> images per class (default {"train": 6, "val": 3}); `mode` converts the
    RGB image to another PIL mode before saving (e.g. "L"). Returns root as a Path.
    """
    root = Path(root)
    per_class = {"train": 6, "val": 3} if per_class is None else per_class
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = Image.fromarray(make_image_array(k, size, rng), mode="RGB")
                if mode != "RGB":
                    image = image.convert(mode)
                image.save(folder / f"img_{i:03d}{ext}")
    return root


@pytest.fixture(scope="session")
def make_image_folder():
    """The folder writer as a fixture: make_image_folder(root, classes=..., per_class=..., size=...)."""
    return _make_image_folder


@pytest.fixture(scope="module")
def module_dir(request, tmp_path_factory) -> Iterator[Path]:
    """A folder for the experiment that one module's tests share, removed when the module is done: each
    such experiment writes hundreds of MB of checkpoints, and the whole suite's together would fill a disk.
    (Each test's own tmp_path goes when the test passes: tmp_path_retention_policy in pytest.ini.)"""
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A default tiny folder: 3 classes, 6 train and 3 val images each, 8x8 px."""
    return _make_image_folder(tmp_path / "data")


@pytest.fixture
def tiny_config(tmp_path) -> dict:
    """final.default_config() made fast: ResNet18 teacher, 1 epoch, batch 8, 8 px, Baseline only,
    CPU, fp32, outputs and data under tmp_path."""
    import final

    config = final.default_config()
    config["teacher"].update(model="ResNet18", epochs=1, batch_size=8)
    config["student"].update(epochs=1, batch_size=8)
    config["experiment"].update(
        data_dir=str(tmp_path / "data"), methods=["Baseline"], image_size=8, device="cpu",
        precision="fp32", num_workers=0, logs_dir=str(tmp_path / "logs"),
        checkpoints_dir=str(tmp_path / "checkpoints"))
    return config


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Run every test inside its own tmp_path, so relative defaults never reach the repository."""
    monkeypatch.chdir(tmp_path)
    yield
    # final.main attaches a FileHandler to the "kd" logger; close it so it does not write into
    # (or hold open) a finished test's folder.
    logger = logging.getLogger("kd")
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(handler)
        handler.close()


@pytest.fixture
def kd_log(caplog, monkeypatch) -> pytest.LogCaptureFixture:
    """caplog for the project's "kd" logger, whatever ran before: final.main turns its propagation off for its
    own console, so an earlier in-process run would otherwise hide the records from caplog."""
    monkeypatch.setattr(logging.getLogger("kd"), "propagate", True)
    return caplog


def in_one_thread(call: Callable[[], T], cwd: Path) -> T:
    """call() in this process, in `cwd`, with one intra-op thread, as the subprocesses run (OMP_NUM_THREADS=1):
    the same floating-point order, without a second start of Python and torch."""
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(cwd)
            torch.set_num_threads(1)
            return call()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is several times faster than two fighting over a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def experiment_argv(base: Path | None, data: Path, methods: str = "Baseline,KD,DML", seeds: str = "0,1"
                    ) -> list[str]:
    """run_experiment.py's arguments for a tiny experiment that several processes train fast: ResNet18 teacher,
    1 epoch each, batch 8, 8 px, CPU, fp32. Its outputs go under `base` (None: the default logs/ and
    checkpoints/ of the working folder, as on a machine of its own)."""
    argv = ["--data", str(data), "--methods", methods, "--seeds", seeds, "--teacher-epochs", "1",
            "--student-epochs", "1", "--batch-size", "8", "--device", "cpu", "--precision", "fp32",
            "--set", "teacher.model=ResNet18", "--set", "teacher.lr=0.01", "--set", "experiment.image_size=8"]
    if base is not None:
        argv += ["--logs-dir", str(base / "logs"), "--checkpoints-dir", str(base / "checkpoints")]
    return argv


def write_driver(base: Path, patch: str = "") -> Path:
    """base/driver.py: run_experiment.py's command line after `patch` (code that changes the project where a
    test needs it to, e.g. to kill a process at a chosen moment)."""
    driver = base / "driver.py"
    driver.write_text(patch + "\nimport sys, run_experiment\nsys.exit(run_experiment.cli(sys.argv[1:]))\n")
    return driver


def one_thread_env() -> dict[str, str]:
    """The environment of a launched experiment: one thread per process, the repository importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def launch_experiment(base: Path, argv: list[str], processes: int | None, patch: str = ""
                      ) -> subprocess.CompletedProcess:
    """run_experiment.py's command line with one thread per process: alone, or under torchrun."""
    driver = write_driver(base, patch)
    launcher = ([sys.executable] if processes is None else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"])
    return subprocess.run([*launcher, str(driver), *argv], cwd=base, env=one_thread_env(), capture_output=True,
                          text=True, timeout=600)


def experiment_records(base: Path) -> list[dict]:
    """The records of the one experiment under base/logs."""
    (exp_dir,) = (base / "logs").glob("final_experiment_*")
    return json.loads((exp_dir / "comparison_results.json").read_text())


@pytest.fixture(scope="session")
def one_process(tmp_path_factory) -> Iterator[tuple[Path, list[dict]]]:
    """The reference that several processes (on one machine or two) must reproduce: Baseline, KD and DML with
    seeds 0 and 1 (experiment_argv's defaults) trained by one plain process, and its tiny data folder. Trained
    once per session for every module that compares with it; removed at the end (hundreds of MB)."""
    base = tmp_path_factory.mktemp("one_process")
    data = _make_image_folder(base / "data", per_class={"train": 8, "val": 3})
    done = launch_experiment(base, experiment_argv(base, data), processes=None)
    assert done.returncode == 0, done.stderr[-3000:]
    yield data, experiment_records(base)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def method_inputs() -> Callable[..., dict]:
    """The inputs a method's forward_train takes beside the images and labels, as the trainer passes them: the
    batch's positions in the train split (CRD) and a second, strongly augmented view (MLKD; here the images
    flipped, which any tensor of their shape could stand for)."""
    def inputs(distiller, images: torch.Tensor, indices: torch.Tensor) -> dict:
        extra = {"indices": indices} if distiller.needs_index else {}
        if distiller.needs_strong_view:
            extra["strong_images"] = images.flip(3)
        return extra
    return inputs

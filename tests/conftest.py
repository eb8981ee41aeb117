"""Shared fixtures: tiny learnable image folders and a fast config.

Every test runs with the working directory switched to its own tmp_path (autouse fixture below), so
a relative default such as data/, logs/ or checkpoints/ can never touch the repository's folders.
"""
from __future__ import annotations

import logging
import shutil
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

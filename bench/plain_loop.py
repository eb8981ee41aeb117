"""The plain reference loop, written the way the common KD repositories do it.

The benchmark runs this side by side with the project's own trainer. It is deliberately the common,
unoptimised way of doing things, so that the comparison shows what the project's trainer saves:

* data: torchvision `ImageFolder` decoding PIL images on every epoch, per-sample transforms, and a
  `DataLoader` with worker processes (loading time counts as part of the loop's cost);
* compute: fp32, NCHW (no channels_last), the default allocator (glibc malloc as it comes),
  `torch.optim.SGD` with its defaults;
* distillation: the teacher's forward is recomputed for every method on every batch.

Every step moves its batch to the device of the model it trains.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from kd.methods.base import Distiller
from kd.methods.common import kd_loss

Step = Callable[[Tensor, Tensor], None]

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


def _rgb_loader(path: str) -> Image.Image:
    """Open an image and convert any PIL mode (grayscale digits included) to RGB."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def _sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync() -> None:
    """Wait for queued GPU work, so that a timer sees it finished."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plain_loader(root: Path, image_size: int, batch_size: int, mean: list[float], std: list[float],
                 num_workers: int = 2, limit: int | None = None) -> DataLoader:
    """Shuffled training batches from `root/train` via ImageFolder + PIL + per-sample transforms.

    No horizontal flip (digits data). `limit` keeps the first `limit` samples of a fixed random
    permutation (seed 0); the shuffle order is seeded too.
    """
    transform = transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.RandomCrop(image_size, padding=max(1, image_size // 8)),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    dataset = datasets.ImageFolder(str(Path(root) / "train"), transform=transform, loader=_rgb_loader)
    if limit is not None:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        dataset = Subset(dataset, order[:limit].tolist())
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                      drop_last=True, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(0))


def _cycle(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches forever, re-iterating the loader whenever it is exhausted."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the loader yields no batches (fewer samples than one batch?)")


def measure_steps(step: Step, loader: DataLoader, steps: int, warmup: int = 2) -> float:
    """Images per second over `steps` timed steps after `warmup` untimed ones.

    Data loading is inside the timed region: it is part of the plain loop's cost.
    """
    batches = _cycle(loader)
    for x, y in islice(batches, warmup):
        step(x, y)
    _sync()
    images = 0
    start = time.perf_counter()
    for x, y in islice(batches, steps):
        step(x, y)
        images += x.shape[0]
    _sync()
    return images / (time.perf_counter() - start)


def teacher_step(teacher: nn.Module) -> Step:
    """A cross-entropy SGD training step for the teacher (expects its parameters to require grad)."""
    optimizer = _sgd(teacher.parameters())
    device = _device(teacher)

    def step(x: Tensor, y: Tensor) -> None:
        teacher.train()
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(teacher(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def kd_step(student: nn.Module, teacher: nn.Module, temperature: float = 4.0) -> Step:
    """A Hinton KD step the common way: teacher forward under no_grad, SGD on the student only."""
    optimizer = _sgd(student.parameters())
    device = _device(student)

    def step(x: Tensor, y: Tensor) -> None:
        teacher.eval()
        student.train()
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        loss = 0.1 * F.cross_entropy(s, y) + 0.9 * kd_loss(s, t, temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def distill_epoch(distiller: Distiller, loader: DataLoader) -> tuple[int, float]:
    """One epoch with the project's Distiller, the teacher recomputed on every batch.

    Returns (images seen, seconds), data loading included.
    """
    optimizer = _sgd(distiller.trainable_parameters())
    device = _device(distiller.student)
    distiller.train()
    images = 0
    _sync()
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)  # a new batch tensor: the teacher runs again for this method
        _logits, losses = distiller.forward_train(x, y)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        images += x.shape[0]
    _sync()
    return images, time.perf_counter() - start

"""The data as the trainer sees it: each split in memory (one uint8 tensor) or streamed, every epoch's
order and augmentation from a generator seeded by (seed, epoch), so that every method sees the same
batches, and the batches cropped, flipped and normalised in one go on the training device."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from kd.data.strong_view import rand_augment
from kd.engine import distributed
from kd.errors import UserError

StrongView = Callable[[], torch.Tensor]  # a batch's strong view, made on the first call


@dataclass
class Split:
    """One split: either decoded in memory (`images` set) or streamed from `files`."""
    files: torch.utils.data.Dataset  # (uint8 image, label) pairs, decoded when asked for
    labels: torch.Tensor
    images: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: torch.Tensor, batch_size: int, num_workers: int, device: torch.device
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 image batches and labels in the given order, for training on `device` (streamed batches
        for a GPU come in page-locked memory, so that their copy need not wait)."""
        if self.images is not None:
            order = to_device(order, self.images.device)  # one copy per epoch, not one per batch
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                yield self.images[index], self.labels[index]
            return
        loader = torch.utils.data.DataLoader(self.files, batch_size=batch_size, sampler=order.tolist(),
                                             num_workers=num_workers, persistent_workers=False,
                                             pin_memory=device.type == "cuda")
        try:
            yield from loader
        except UserError as err:  # re-raised from a worker with its traceback: keep the one-line message
            raise UserError(str(err).strip().splitlines()[-1].split("UserError: ", 1)[-1]) from None


@dataclass
class ImageData:
    """Everything the trainer needs from a data set, the same for the teacher and every method."""
    root: Path
    class_names: list[str]
    image_size: int
    splits: dict[str, Split]
    mean: list[float]
    std: list[float]
    hflip: bool
    ignored_files: int
    bad_images: int
    fingerprint: str
    num_workers: int = 0
    held_out: str | None = None  # when tuning without test/: which share of train/ selects (kd/data/holdout.py)
    official: bool | None = None  # CIFAR (kd/data/cifar.py): whether the files are the official ones
    counts: dict[str, int] = field(default_factory=dict)
    _normalization: dict = field(default_factory=dict, init=False, repr=False)  # device -> (mean, std)

    def __post_init__(self) -> None:
        self.counts = {name: len(split) for name, split in self.splits.items()}

    def epoch_generator(self, seed: int, epoch: int, view: int = 0) -> torch.Generator:
        # One generator per (seed, epoch): the data order and augmentation do not depend on the method. A second
        # view's stream (view 1) lies far from every (seed, epoch) of the first's.
        return torch.Generator().manual_seed(seed * 1_000_003 + epoch + view * 2 ** 48)

    def keep_on(self, device: torch.device, budget: float = 0.25) -> bool:
        """Move the decoded images to a GPU once when they take at most `budget` of its free memory, so
        that batches are cut and augmented there with no copy per step. Returns whether they moved."""
        splits = self.splits.values()
        if device.type != "cuda" or any(split.images is None for split in splits):
            return False
        free_bytes, _ = torch.cuda.mem_get_info(device)
        if sum(split.images.numel() for split in splits) > budget * free_bytes:
            return False
        for split in splits:
            split.images, split.labels = split.images.to(device), split.labels.to(device)
        return True

    def epoch_images(self, batch_size: int) -> int:
        """Training images one process sees per epoch: its shard of the split (all of it when alone), less
        a last image that would make a batch of one, on which BatchNorm cannot train. The lr schedule,
        the progress bar and `train_batches` all count from here, so they agree for every size."""
        shard = self.counts["train"] // distributed.world_size()
        return shard - 1 if shard % batch_size == 1 and shard > 1 else shard

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.epoch_images(batch_size) / batch_size)

    def train_batches(self, seed: int, epoch: int, batch_size: int, device: torch.device, channels_last: bool,
                      strong_view: bool = False
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, StrongView | None]]:
        """This epoch's (images, labels, indices, strong view) batches; `indices` are the images' positions in the
        train split (CRD's memory is kept per training image). With `strong_view`, the same images also come
        strongly augmented (kd/data/strong_view.py), made when first asked for, from a generator of their own, so
        the first view and the order are the same with it or without; else the strong view is None."""
        stream = (seed, epoch)
        generator = self.epoch_generator(*stream)
        train = self.splits["train"]
        order = torch.randperm(len(train), generator=generator)
        world, rank = distributed.world_size(), distributed.rank()
        if world > 1:  # each process its own shard, all of the same length so that they step together
            order = order[:len(train) // world * world][rank::world]
            stream = (seed * world + rank, epoch + 1_000)
            generator = self.epoch_generator(*stream)
        strong_generator = self.epoch_generator(*stream, view=1)
        order = order[:self.epoch_images(batch_size)]
        for start, (images, labels) in zip(range(0, len(order), batch_size),
                                           train.batches(order, batch_size, self.num_workers, device)):
            images = to_device(images, device)
            # made when a run first asks for it: inside that run's step, so that its clock pays for it (not the
            # time all runs share), and the runs after it get the same tensor; each batch's runs step before the
            # next batch is cut, so the generator's draws stay in order
            strong = functools.cache(functools.partial(self.strong_view, images, strong_generator, channels_last)) \
                if strong_view else None
            indices = to_device(order[start:start + batch_size], device)
            yield self.normalize(self.augment(images, generator), channels_last), to_device(labels, device), \
                indices, strong

    def strong_view(self, images: torch.Tensor, generator: torch.Generator, channels_last: bool) -> torch.Tensor:
        """A uint8 batch's strong view: a crop and flip of its own, then RandAugment and Cutout, normalised."""
        return self.normalize(rand_augment(self.augment(images, generator), generator), channels_last)

    def eval_indices(self, split: str) -> torch.Tensor:
        """This process's share of a split for evaluation (the whole split when it is alone; empty when
        the split has fewer images than there are processes)."""
        return torch.arange(len(self.splits[split]))[distributed.rank()::distributed.world_size()]

    def eval_batches(self, split: str, batch_size: int, device: torch.device, channels_last: bool
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data = self.splits[split]
        for images, labels in data.batches(self.eval_indices(split), batch_size, self.num_workers, device):
            yield self.normalize(to_device(images, device), channels_last), to_device(labels, device)

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random crop with zero padding (S/8 pixels) and optional horizontal flip, for a whole batch.

        The random numbers come from the CPU generator (the same on every device), and reach a GPU
        by an asynchronous copy.
        """
        n, _, size, _ = images.shape
        pad = max(1, size // 8)
        padded = F.pad(images, (pad, pad, pad, pad))
        offsets = to_device(torch.randint(0, 2 * pad + 1, (2, n), generator=generator), images.device)
        span = torch.arange(size, device=images.device)
        rows = (offsets[0][:, None] + span)[:, :, None]
        cols = (offsets[1][:, None] + span)[:, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None]
        crops = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
        if self.hflip:
            flip = to_device(torch.rand(n, generator=generator) < 0.5, images.device)
            crops = torch.where(flip[:, None, None, None], crops.flip(3), crops)
        return crops

    def normalize(self, images: torch.Tensor, channels_last: bool) -> torch.Tensor:
        if images.device not in self._normalization:  # made once per device, not copied there every batch
            self._normalization[images.device] = (torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1),
                                                  torch.tensor(self.std, device=images.device).view(1, 3, 1, 1))
        mean, std = self._normalization[images.device]
        out = (images.float() / 255.0 - mean) / std
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a host tensor goes to a GPU through page-locked memory without blocking, so
    the host can queue the next kernels instead of waiting for the GPU to drain."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)

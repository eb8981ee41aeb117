"""An image folder loaded for training: checked, decoded into the in-memory uint8 cache when it fits the
memory budget (else streamed through a DataLoader), and its normalisation statistics computed.

kd/data/batches.py turns either into the epoch's batches.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from kd.data.batches import ImageData, Split
from kd.data.decode import DecodedFiles, auto_image_size, decode_images
from kd.data.folder import fingerprint, scan_dataset
from kd.errors import UserError

log = logging.getLogger("kd")


def load_image_data(root: str | Path, image_size: int | str = "auto", hflip: bool = True,
                    cache_max_gb: float = 4.0, num_workers: int = 2, skip_bad_images: bool = False,
                    decode_all: bool = False) -> ImageData:
    """Check and load an ImageFolder data set; decode it into memory when it fits `cache_max_gb`.

    A streamed set is decoded once up front only to find unreadable images (`decode_all`, or when
    they may be skipped); otherwise a bad image stops the run when it is first read.
    """
    root = Path(root)
    class_names, files = scan_dataset(root)
    size = auto_image_size(files["train"].samples) if image_size == "auto" else int(image_size)
    total = sum(len(f.samples) for f in files.values())
    fits = total * 3 * size * size <= cache_max_gb * 2**30
    splits, bad = {}, 0
    for name, split_files in files.items():
        samples = split_files.samples
        images = None
        if fits or skip_bad_images or decode_all:
            images, samples, skipped = decode_images(samples, size, skip_bad_images, f"decoding {name}", keep=fits)
            bad += skipped
        if not samples:
            raise UserError(f"no readable image left in '{root / name}' after skipping the unreadable ones: "
                            "replace them")
        labels = torch.tensor([label for _, label in samples])
        splits[name] = Split(DecodedFiles(samples, size), labels, images)
    if bad:
        log.warning("skipped %d unreadable image(s) (--skip-bad-images)", bad)
    mean, std = channel_stats(splits["train"])
    ignored = sum(f.ignored for f in files.values())
    if ignored:
        log.info("ignored %d hidden or non-image file(s) under %s", ignored, root)
    return ImageData(root, class_names, size, splits, mean, std, hflip, ignored, bad,
                     fingerprint(root, files), num_workers if not fits else 0)


def channel_stats(train: Split, max_streamed: int = 2000, chunk_values: int = 2**22
                   ) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the training images: all of them when decoded in memory, an even sample
    of about `max_streamed` across the split when streamed (decoding them all would take a pass).

    The split is listed class by class, so a sample must span all of it, never its first images. Sums
    run in float64 over chunks of about `chunk_values` pixel values (32 MB), whatever the image size.
    """
    step = 1 if train.images is not None else max(1, len(train) // max_streamed)
    picked = range(0, len(train), step)
    size = train.images.shape[-1] if train.images is not None else train.files[0][0].shape[-1]
    chunk = max(1, chunk_values // (3 * size * size))
    total, squares, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for start in range(0, len(picked), chunk):
        index = picked[start:start + chunk]
        batch = (train.images[index.start:index.stop:index.step] if train.images is not None
                 else torch.stack([train.files[i][0] for i in index]))
        pixels = batch.to("cpu", torch.float64).div_(255.0).transpose(0, 1).reshape(3, -1)
        total += pixels.sum(dim=1)
        squares += pixels.square().sum(dim=1)
        count += pixels.shape[1]
    mean = total / count
    variance = (squares - count * mean.square()) / max(1, count - 1)  # sample variance, as torch.std
    std = variance.clamp_min(0).sqrt().clamp_min(1e-3)  # a constant channel must not divide by zero
    return mean.tolist(), std.tolist()

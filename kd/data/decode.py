"""Decoding: any PIL-readable image to an RGB uint8 tensor of the run's square size, once into memory or on
demand when a data set streams from disk."""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from kd.engine import distributed
from kd.errors import UserError

AUTO_SIZE_RANGE = (16, 224)  # "auto" image size: the images' typical shorter side, clamped to this


def load_rgb(path: Path) -> Image.Image:
    """Open any image as 8-bit RGB (grayscale, palette, RGBA and 16-bit images included)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(img, dtype=np.float64)
            peak = 65535.0 if array.max() > 255 else 255.0
            img = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
        elif img.mode in ("P", "LA", "PA"):
            img = img.convert("RGBA")
        return img.convert("RGB")


def decode(path: Path, image_size: int) -> torch.Tensor:
    """One image as a uint8 tensor (3, S, S): shorter side resized to S, then center-cropped."""
    try:
        img = load_rgb(path)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UserError(f"cannot read image '{path}' ({type(err).__name__}: {err}): replace or remove it, "
                        "or pass --skip-bad-images") from None
    img = TF.center_crop(TF.resize(img, image_size), image_size)
    return TF.pil_to_tensor(img)


def auto_image_size(samples: list[tuple[Path, int]], max_probe: int = 200) -> int:
    """The typical shorter side of the training images (read from headers), clamped to a sane range."""
    step = max(1, len(samples) // max_probe)
    sides = []
    for path, _ in samples[::step]:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except (UnidentifiedImageError, OSError):
            continue  # reported with its path when the image is decoded
    typical = int(statistics.median(sides)) if sides else AUTO_SIZE_RANGE[1]
    return max(AUTO_SIZE_RANGE[0], min(AUTO_SIZE_RANGE[1], typical))


class DecodedFiles(torch.utils.data.Dataset):
    """Decodes on demand: the streaming path for data sets larger than the memory budget."""

    def __init__(self, samples: list[tuple[Path, int]], image_size: int):
        self.samples, self.image_size = samples, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return decode(path, self.image_size), label


def decode_images(samples: list[tuple[Path, int]], image_size: int, skip_bad: bool, desc: str, keep: bool = True
                ) -> tuple[torch.Tensor | None, list[tuple[Path, int]], int]:
    """Decode every image once (kept in memory when `keep`), dropping unreadable ones if `skip_bad`.

    The images go straight into one preallocated uint8 tensor: peak memory is the cache itself, not
    the cache plus a list of per-image copies.
    """
    images = torch.empty((len(samples) if keep else 0, 3, image_size, image_size), dtype=torch.uint8)
    kept, bad = [], 0
    for path, label in tqdm(samples, desc=desc, unit="img", leave=False, disable=distributed.quiet()):
        try:
            image = decode(path, image_size)
        except UserError:
            if not skip_bad:
                raise
            bad += 1
            continue
        if keep:
            images[len(kept)] = image
        kept.append((path, label))
    return (images[:len(kept)] if keep else None), kept, bad

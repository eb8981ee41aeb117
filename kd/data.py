"""Image-folder data: layout checks, decoding to RGB, the in-memory uint8 cache, normalisation statistics
and the digits demo.

Images are decoded once (any PIL mode -> RGB, resized to a square `image_size`) and kept as one uint8
tensor when they fit the memory budget; bigger sets stream through a DataLoader with workers
(kd/batches.py turns either into the epoch's batches).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from kd import distributed
from kd.batches import ImageData, Split
from kd.config import UserError

log = logging.getLogger("kd")

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLITS = ("train", "val", "test")
AUTO_SIZE_RANGE = (16, 224)  # "auto" image size: the images' typical shorter side, clamped to this
LAYOUT_HINT = "expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (optional {root}/test/)"


def _layout_error(problem: str, root: Path) -> UserError:
    return UserError(f"{problem}: {LAYOUT_HINT.format(root=root)}; or try the built-in demo: "
                     "python run_experiment.py --demo")


def _is_image(path: Path, folder: Path) -> bool:
    """An image file not hidden itself nor inside a hidden folder (.ipynb_checkpoints, ...)."""
    hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
    return path.is_file() and not hidden and path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class SplitFiles:
    samples: list[tuple[Path, int]]
    ignored: int  # hidden or non-image files that were skipped


def scan_dataset(root: Path) -> tuple[list[str], dict[str, SplitFiles]]:
    """Check the ImageFolder layout under `root` and list (path, label) for each split present."""
    root = Path(root)
    if not root.is_dir():
        raise _layout_error(f"data folder '{root}' not found", root)
    for required in ("train", "val"):
        if not (root / required).is_dir():
            raise _layout_error(f"data folder '{root}' has no {required}/ folder", root)
    class_sets: dict[str, list[str]] = {}
    for split in SPLITS:
        if (root / split).is_dir():
            class_sets[split] = sorted(d.name for d in (root / split).iterdir()
                                       if d.is_dir() and not d.name.startswith("."))
    classes = class_sets["train"]
    if len(classes) < 2:
        raise UserError(f"{root / 'train'} has {len(classes)} class folder(s): at least 2 are needed, "
                        "one folder per class")
    for split, names in class_sets.items():
        if names != classes:
            only_train = sorted(set(classes) - set(names))
            only_here = sorted(set(names) - set(classes))
            raise UserError(f"train and {split} class folders differ: only in train: "
                            f"{', '.join(only_train) or '-'}; only in {split}: {', '.join(only_here) or '-'}; "
                            "make the class folders match")
    splits = {}
    for split in class_sets:
        samples, ignored = [], 0
        for label, name in enumerate(classes):
            folder = root / split / name
            entries = sorted(folder.rglob("*"))
            images = [p for p in entries if _is_image(p, folder)]
            ignored += sum(1 for p in entries if p.is_file()) - len(images)
            if not images:
                raise UserError(f"class folder '{folder}' holds no images: add images "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))}) or remove the folder")
            samples += [(p, label) for p in images]
        splits[split] = SplitFiles(samples, ignored)
    return classes, splits


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


class _DecodedFiles(torch.utils.data.Dataset):
    """Decodes on demand: the streaming path for data sets larger than the memory budget."""

    def __init__(self, samples: list[tuple[Path, int]], image_size: int):
        self.samples, self.image_size = samples, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return decode(path, self.image_size), label


def _decode_all(samples: list[tuple[Path, int]], image_size: int, skip_bad: bool, desc: str, keep: bool = True
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


def _fingerprint(root: Path, splits: dict[str, SplitFiles]) -> str:
    digest = hashlib.sha256()
    for name, files in splits.items():
        for path, label in files.samples:
            digest.update(f"{name}/{path.relative_to(root)}:{label}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


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
            images, samples, skipped = _decode_all(samples, size, skip_bad_images, f"decoding {name}", keep=fits)
            bad += skipped
        if not samples:
            raise UserError(f"no readable image left in '{root / name}' after skipping the unreadable ones: "
                            "replace them")
        labels = torch.tensor([label for _, label in samples])
        splits[name] = Split(_DecodedFiles(samples, size), labels, images)
    if bad:
        log.warning("skipped %d unreadable image(s) (--skip-bad-images)", bad)
    mean, std = _channel_stats(splits["train"])
    ignored = sum(f.ignored for f in files.values())
    if ignored:
        log.info("ignored %d hidden or non-image file(s) under %s", ignored, root)
    return ImageData(root, class_names, size, splits, mean, std, hflip, ignored, bad,
                     _fingerprint(root, files), num_workers if not fits else 0)


def _channel_stats(train: Split, max_streamed: int = 2000, chunk_values: int = 2**22
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


def export_digits_demo(root: str | Path) -> Path:
    """Write scikit-learn's bundled digits as PNGs into root/{train,val,test}/<digit>/ (once).

    Stratified 60/20/20 split with a fixed seed; written to a temporary folder and renamed, so an
    interrupted export never leaves a half-written data set behind.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    index = np.arange(len(pixels))
    train_idx, rest = train_test_split(index, test_size=0.4, stratify=digits.target, random_state=0)
    val_idx, test_idx = train_test_split(rest, test_size=0.5, stratify=digits.target[rest], random_state=0)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"demo folder '{root}' exists but is not a complete export (no train/ and val/): "
                        "move it away and run --demo again")
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for split, ids in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        for i in ids:
            folder = staging / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i], mode="L").save(folder / f"digit_{i:04d}.png")
    if root.exists():
        root.rmdir()
    os.replace(staging, root)
    return root

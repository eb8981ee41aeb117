"""The strong view (kd/data/strong_view.py): each RandAugment operation gives the pixels of the MLKD authors' PIL
operation (written out here with PIL, as their mdistiller/dataset/cifar100.py defines it), Cutout covers PIL's
rectangle, and the batch pipeline draws the strong view from a stream of its own: the first view, which every
other method sees, is the same with it or without."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from kd.data.batches import ImageData
from kd.data.load import load_image_data
from kd.data.strong_view import OPERATIONS, cutout, rand_augment
from kd.engine.run import tensor_digest

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")

# The authors' operations on a PIL image, in the order of their augment_list()
PIL_OPERATIONS = [
    lambda img, v: ImageOps.autocontrast(img),
    lambda img, v: ImageEnhance.Brightness(img).enhance(v),
    lambda img, v: ImageEnhance.Color(img).enhance(v),
    lambda img, v: ImageEnhance.Contrast(img).enhance(v),
    lambda img, v: ImageOps.equalize(img),
    lambda img, v: img,
    lambda img, v: ImageOps.posterize(img, max(1, int(v))),
    lambda img, v: img.rotate(v),
    lambda img, v: ImageEnhance.Sharpness(img).enhance(v),
    lambda img, v: img.transform(img.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    lambda img, v: img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    lambda img, v: ImageOps.solarize(img, v),
    lambda img, v: img.transform(img.size, Image.AFFINE, (1, 0, v * img.size[0], 0, 1, 0)),
    lambda img, v: img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, v * img.size[1])),
]


def smooth_image(seed: int, size: int = 32) -> torch.Tensor:
    """A uint8 image with some structure (a blurred noise), so that geometric operations move real content."""
    noise = torch.randint(0, 256, (1, 3, size, size), generator=torch.Generator().manual_seed(seed)).float()
    return torch.nn.functional.avg_pool2d(noise, 3, 1, 1)[0].to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.mark.parametrize("index", range(len(OPERATIONS)))
def test_each_operation_gives_pils_pixels_across_its_range(index):
    operation, low, high = OPERATIONS[index]
    for seed, fraction in enumerate((0.0, 0.3, 0.7, 1.0)):
        image = smooth_image(seed)
        magnitude = low + (high - low) * fraction
        ours = operation(image, magnitude).int()
        theirs = from_pil(PIL_OPERATIONS[index](to_pil(image), magnitude)).int()
        difference = (ours - theirs).abs()
        # blends round where PIL truncates (at most 1 level); nearest-neighbour sampling breaks ties (a pixel centre
        # mapped exactly half-way) the other way: a few rotated pixels, at most one sheared row or column (1/32)
        assert difference.float().mean() < 0.6 and (difference > 1).float().mean() < 1 / 32, (index, magnitude)


def test_cutout_covers_the_pixels_of_pils_rectangle():
    """The authors' CutoutAbs draws PIL's rectangle from (x0, y0) to (x0 + v, y0 + v), clipped, ends included;
    their centre is numpy's uniform(size), which lies in (1, size]."""
    size, n = 32, 200
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    covered = cutout(images, torch.Generator().manual_seed(0))[:, 0] > 0
    draws = torch.rand((3, n), generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    for i in range(n):
        v = draws[0, i] * 0.5 * size
        x0, y0 = size - (size - 1) * draws[1, i], size - (size - 1) * draws[2, i]
        x0, y0 = int(max(0, x0 - v / 2.0)), int(max(0, y0 - v / 2.0))
        canvas = Image.new("L", (size, size))
        if v > 0:
            ImageDraw.Draw(canvas).rectangle((x0, y0, min(size, x0 + v), min(size, y0 + v)), 255)
        assert torch.equal(covered[i], torch.from_numpy(np.array(canvas) > 0)), i
    assert covered.any(dim=(1, 2)).all()


def test_rand_augment_applies_two_operations_per_image_from_the_generator():
    images = torch.stack([smooth_image(seed) for seed in range(6)])
    first = rand_augment(images, torch.Generator().manual_seed(5))
    again = rand_augment(images, torch.Generator().manual_seed(5))
    other = rand_augment(images, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.dtype == torch.uint8 and first.shape == images.shape
    # the draws, replayed: every image is its two operations then the cutout
    generator = torch.Generator().manual_seed(5)
    choices = torch.randint(len(OPERATIONS), (6, 2), generator=generator)
    draws = torch.rand((6, 2), generator=generator, dtype=torch.float64)
    replayed = []
    for image, picked, drawn in zip(images, choices.tolist(), draws.tolist()):
        for choice, draw in zip(picked, drawn):
            operation, low, high = OPERATIONS[choice]
            image = operation(image, low + (high - low) * draw)
        replayed.append(image)
    assert torch.equal(first, cutout(torch.stack(replayed), generator))


def _digests(data: ImageData, strong_view: bool) -> tuple[list[str], list[str | None]]:
    batches = list(data.train_batches(3, 1, 4, CPU, False, strong_view))
    return ([tensor_digest(*batch[:3]) for batch in batches],
            [None if batch[3] is None else tensor_digest(batch[3]()) for batch in batches])


def test_the_strong_view_leaves_the_common_view_unchanged_and_repeats_per_seed_and_epoch(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", per_class={"train": 7, "val": 2}, size=16)
    data = load_image_data(root, 16, hflip=True, num_workers=0)
    common, none = _digests(data, strong_view=False)
    with_strong, strong = _digests(data, strong_view=True)
    assert with_strong == common and none == [None] * len(common)
    assert _digests(data, strong_view=True)[1] == strong and None not in strong
    images, _, _, strong_view = next(data.train_batches(3, 1, 4, CPU, False, True))
    strong = strong_view()
    assert strong_view() is strong  # made once: every two-view run of the batch gets the same tensor
    assert strong.shape == images.shape and strong.dtype == images.dtype and not torch.equal(strong, images)
    next_epoch = next(data.train_batches(3, 2, 4, CPU, False, True))[3]()
    assert not torch.equal(next_epoch, strong)
    assert math.isfinite(strong.abs().max().item())

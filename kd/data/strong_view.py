"""The strong view of a training batch, for methods that train on two views of each image (MLKD).

It is the strong augmentation of the MLKD authors' CIFAR-100 pipeline (github.com/Jin-Ying/Multi-Level-Logit-
Distillation, mdistiller/dataset/cifar100.py): a crop and flip of its own, then their RandAugment, which
applies 2 operations drawn with replacement from 14, each at a magnitude drawn uniformly from the operation's
range, and then a Cutout of a random square of up to half the image's side in a grey fill. Each operation is
torchvision's on uint8 tensors, which gives PIL's pixels (tests/test_strong_view.py compares them), so the view
is made on the training device. Every random number comes from the generator passed in (a stream apart from
the weak view's), so that the batches of the other methods do not change when a two-view method trains
beside them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torchvision.transforms.v2.functional as TF

OPS_PER_IMAGE = 2
CUTOUT_MAX = 0.5  # of the image's side
CUTOUT_FILL = (125, 123, 114)  # the authors' fill colour


def _shear(image: torch.Tensor, v: float, axis: int) -> torch.Tensor:
    # PIL's affine transform (1, v, 0, 0, 1, 0) shears about the top-left corner, not the centre
    angles = [0.0, 0.0]
    angles[axis] = math.degrees(math.atan(v))
    return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=angles, center=[0, 0])


def _translate(image: torch.Tensor, v: float, axis: int) -> torch.Tensor:
    # PIL samples the input at x + v * size, which moves the content by -v * size
    shift = [0, 0]
    shift[axis] = -v * image.shape[-1]
    return TF.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0])


def _solarize(image: torch.Tensor, threshold: float) -> torch.Tensor:
    # the range reaches 256, above every uint8 value: nothing is inverted (torchvision refuses such a threshold)
    return image if threshold > 255 else TF.solarize(image, threshold)


# (operation, lowest magnitude, highest magnitude): the authors' augment_list()
OPERATIONS: list[tuple[Callable[[torch.Tensor, float], torch.Tensor], float, float]] = [
    (lambda image, _: TF.autocontrast(image), 0.0, 1.0),
    (TF.adjust_brightness, 0.05, 0.95),
    (TF.adjust_saturation, 0.05, 0.95),  # PIL's ImageEnhance.Color
    (TF.adjust_contrast, 0.05, 0.95),
    (lambda image, _: TF.equalize(image), 0.0, 1.0),
    (lambda image, _: image, 0.0, 1.0),
    (lambda image, v: TF.posterize(image, int(v)), 4.0, 8.0),
    (lambda image, v: TF.rotate(image, v), -30.0, 30.0),
    (TF.adjust_sharpness, 0.05, 0.95),
    (lambda image, v: _shear(image, v, 0), -0.3, 0.3),
    (lambda image, v: _shear(image, v, 1), -0.3, 0.3),
    (_solarize, 0.0, 256.0),
    (lambda image, v: _translate(image, v, 0), -0.3, 0.3),
    (lambda image, v: _translate(image, v, 1), -0.3, 0.3),
]


def rand_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The authors' RandAugment and Cutout on a uint8 batch (N, 3, S, S), each image with its own draws.

    The operations run image by image: each takes one magnitude, and the image's pixels are what PIL gives.
    """
    n = images.shape[0]
    choices = torch.randint(len(OPERATIONS), (n, OPS_PER_IMAGE), generator=generator).tolist()
    draws = torch.rand((n, OPS_PER_IMAGE), generator=generator, dtype=torch.float64).tolist()
    out = []
    for image, image_choices, image_draws in zip(images, choices, draws):
        for choice, draw in zip(image_choices, image_draws):
            operation, low, high = OPERATIONS[choice]
            image = operation(image, low + (high - low) * draw)
        out.append(image)
    return cutout(torch.stack(out), generator)


def cutout(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A square of side U(0, 1/2) of the image's, at a uniformly drawn centre, clipped to the image, filled grey:
    the pixels PIL's rectangle covers for the authors' corners (their ends included)."""
    n, _, size, _ = images.shape
    side_draw, x_draw, y_draw = torch.rand((3, n), generator=generator, dtype=torch.float64)
    side = CUTOUT_MAX * size * side_draw
    # the authors' np.random.uniform(size) has low=size and high=1: the centre lies in (1, size]
    centre_x, centre_y = size - (size - 1) * x_draw, size - (size - 1) * y_draw
    x0, y0 = (centre_x - side / 2).clamp(min=0).floor(), (centre_y - side / 2).clamp(min=0).floor()
    x1, y1 = (x0 + side).clamp(max=size), (y0 + side).clamp(max=size)
    span = torch.arange(size, dtype=torch.float64)
    cols = (span >= x0[:, None]) & (span <= x1[:, None])
    rows = (span >= y0[:, None]) & (span <= y1[:, None])
    inside = (rows[:, :, None] & cols[:, None, :] & (side > 0)[:, None, None])[:, None].to(images.device)
    fill = torch.tensor(CUTOUT_FILL, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return torch.where(inside, fill, images)

"""VGG for CIFAR (Simonyan & Zisserman 2015, configurations A/B/D/E, plus CRD's 8-layer "S"), with BatchNorm
after every conv and a single Linear on globally pooled features in place of the three fully connected layers.
Module names (`block0`..`block4`, `classifier`) follow CRD's release, so its checkpoints load.

Forward hooks keep the outputs of `block0`..`block4` for feature losses, so no op here writes into a tensor
that a module has returned: ReLUs are out of place.
"""
from __future__ import annotations

import torch
from torch import nn

from models.cifar.initialise import init_as_crd

# Conv widths of the five blocks; a 2x2 max-pool follows each of the first four.
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    # CRD's blocks stop at the last BN and apply that ReLU outside; keeping it in the block (it has no weights,
    # so the keys are the same) lets a hook on the block read the activated map, CRD's block feature.
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, config: tuple[tuple[int, ...], ...], num_classes: int = 100) -> None:
        super().__init__()
        in_widths = (3,) + tuple(widths[-1] for widths in config[:-1])
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _block(c, widths) for c, widths in zip(in_widths, config, strict=True))
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(4))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(config[-1][-1], num_classes)

        init_as_crd(self, classifier="small_normal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CRD's models skip pool3 on 32 px inputs, so block4 runs on the 4x4 map (their CIFAR checkpoints were
        # trained so), and use it on 64 px ones (Tiny-ImageNet); it is used on every input of 64 px and more here,
        # so that larger images keep being downsampled.
        large = x.shape[-2] >= 64
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.block3(self.pool2(self.block2(x)))
        if large:
            x = self.pool3(x)
        x = self.block4(x)
        return self.classifier(torch.flatten(self.pool4(x), 1))


def vgg8(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["vgg8"], num_classes)


def vgg11(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["vgg11"], num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["vgg13"], num_classes)


def vgg16(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["vgg16"], num_classes)


def vgg19(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["vgg19"], num_classes)

"""CIFAR ResNets (He et al. 2016, Sec. 4.2): a 3x3 stem, then three stages of basic blocks at strides 1, 2, 4.

resnet8 ... resnet110 are 6n+2 layers deep at widths 16/32/64; resnet8x4 and resnet32x4 are CRD's four-times
wider versions (32 stem, 64/128/256 stages). Module names follow CRD's release, so its checkpoints load.

Forward hooks keep the outputs of `layer1`..`layer3` (and of blocks inside them) for feature losses, so no op
here writes into a tensor that a module has returned: residual sums and ReLUs are out of place.
"""
from __future__ import annotations

import torch
from torch import nn

from models.cifar.initialise import init_as_crd

THIN = (16, 16, 32, 64)     # stem, stage 1, stage 2, stage 3 widths
WIDE = (32, 64, 128, 256)   # the "x4" models


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by a BatchNorm, whose shift makes one redundant.
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # He et al. pad the identity with zeros on CIFAR (their option A); CRD's models project it with a 1x1
        # conv + BN (option B) wherever the shape changes, and their checkpoints hold those weights.
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        # the block's one ReLU module last, as in torchvision's blocks: a hook on its input reads the stage's
        # pre-activation, which ReviewKD distils from (CRD's models return it as `preact`)
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet of basic blocks is 6n+2 layers deep, not {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = _stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = _stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = _stage(widths[2], widths[3], blocks, stride=2)
        # CRD pools with a fixed 8x8 window, the last map's size at 32 px; global pooling is the same there
        # and also serves larger inputs.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        init_as_crd(self, classifier="library")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    # Only the first block changes the resolution and width.
    return nn.Sequential(BasicBlock(in_channels, out_channels, stride),
                         *(BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)))


def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, THIN, num_classes)


def resnet14(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(14, THIN, num_classes)


def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, THIN, num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, THIN, num_classes)


def resnet44(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(44, THIN, num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, THIN, num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, THIN, num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, WIDE, num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, WIDE, num_classes)

"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016): WRN-d-k has (d-4)/6 pre-activation blocks per stage at
widths 16k/32k/64k. Module names (`block1.layer.0.convShortcut`, ...) follow CRD's release, so its checkpoints
load.

Forward hooks keep the outputs of `block1`..`block3` (and of blocks inside them) for feature losses, so no op
here writes into a tensor that a module has returned: residual sums and ReLUs are out of place.
"""
from __future__ import annotations

import torch
from torch import nn

from models.cifar.initialise import init_as_crd


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv twice, plus a shortcut (no dropout: CRD trains these without it)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        # A 1x1 projection where the shape changes; the camelCase name is the one in the checkpoints.
        self.convShortcut = None
        if stride != 1 or in_channels != out_channels:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        # The projection reads the pre-activated input (as in the WRN authors' code), the identity the raw one.
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class WideStage(nn.Module):
    """A stage of blocks; the extra `.layer` level exists because the checkpoint keys have it."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(WideBlock(in_channels, out_channels, stride),
                                   *(WideBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet is 6n+4 layers deep, not {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.block1 = WideStage(widths[0], widths[1], blocks, stride=1)
        self.block2 = WideStage(widths[1], widths[2], blocks, stride=2)
        self.block3 = WideStage(widths[2], widths[3], blocks, stride=2)
        # Pre-activation blocks end on a conv: the final BN-ReLU belongs to the head.
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        # CRD pools with a fixed 8x8 window, the last map's size at 32 px; global pooling is the same there
        # and also serves larger inputs.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        init_as_crd(self, classifier="zero_bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)

"""MobileNetV2 for CIFAR (Sandler et al. 2018) as CRD uses it: expansion T=6 and width multiplier 0.5
("mobile_half"), with the layout of CRD's release (`conv1`, `blocks`, `conv2`, `classifier.0`) so that its
checkpoints load. Two departures from the paper come with those checkpoints: ReLU instead of ReLU6, and a 1x1
expansion conv even in the first block, whose expansion is 1 (torchvision's MobileNetV2 leaves it out).

Forward hooks keep the outputs of modules (`blocks.N`, `conv1`, ...) for feature losses, so no op here writes
into a tensor that a module has returned: residual sums and ReLUs are out of place.
"""
from __future__ import annotations

import torch
from torch import nn

from models.cifar.initialise import init_as_crd

# (expansion, output channels at width 1, blocks, stride of the first block); None stands for the model's T.
SETTINGS: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
    (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU())


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, 1x1 linear projection; the identity is added where the shape allows."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, kernel_size=3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(),
            # No ReLU after the projection: a nonlinearity in the narrow bottleneck destroys information
            # (Sandler et al. Sec. 3.2).
            nn.Conv2d(hidden, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(self, expansion: int, width_mult: float, num_classes: int = 100) -> None:
        super().__init__()
        channels = int(32 * width_mult)
        # The stem keeps ImageNet's stride 2, as in CRD's models: a 32 px input ends on a 2x2 map.
        self.conv1 = _conv_bn_relu(3, channels, kernel_size=3, stride=2)
        stages = []
        for t, width, blocks, stride in SETTINGS:
            out_channels = int(width * width_mult)
            stage = []
            for i in range(blocks):
                stage.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, t or expansion))
                channels = out_channels
            stages.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*stages)
        # Sandler et al. thin every layer but this last conv for width multipliers below 1: it feeds the classifier.
        last_channels = max(1280, int(1280 * width_mult))
        self.conv2 = _conv_bn_relu(channels, last_channels, kernel_size=1, stride=1)
        # A Sequential around the Linear because the checkpoints name it `classifier.0`.
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        # CRD pools with a fixed window equal to the last map at 32 px (2x2); global pooling is the same there
        # and also serves larger inputs.
        self.avgpool = nn.AdaptiveAvgPool2d(1)

        init_as_crd(self, classifier="small_normal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.blocks(self.conv1(x)))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    """CRD's "MobileNetV2": T=6, width 0.5."""
    return MobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes)

"""BYOT's auxiliary exits, built from a student's own stage channels and strides."""
from __future__ import annotations

from torch import nn


class ExitHead(nn.Sequential):
    """A BYOT auxiliary exit: 1x1 conv to `width`, kxk conv stride k, 1x1 conv to `out_channels` (each
    + BN + ReLU), global average pooling. `k` is the stage's downsampling factor to the deepest stage
    (8, 4, 2 for a ResNet's layer1-3), `out_channels` the width of the student's pooled feature."""

    def __init__(self, in_channels: int, stride: int, width: int = 128, out_channels: int = 512):
        def conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, kernel_size=k, stride=k, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]
        super().__init__(*conv_bn_relu(in_channels, width, 1), *conv_bn_relu(width, width, stride),
                         *conv_bn_relu(width, out_channels, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

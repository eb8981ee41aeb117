"""ShuffleNet V1 (Zhang et al. 2018; groups 3, stage widths 240/480/960) and ShuffleNet V2 (Ma et al. 2018; 1x,
stage widths 116/232/464) for CIFAR, with the layout of CRD's release so that its checkpoints load. As there,
the stem is a single 1x1 conv at full resolution (no stride-2 conv, no max-pool): a 32 px input ends on a 4x4
map after the three stride-2 stages. Like CRD's, these models keep PyTorch's default initialisation.

Forward hooks keep the outputs of `layer1`..`layer3` (and of units inside them) for feature losses, so no op
here writes into a tensor that a module has returned: residual sums and ReLUs are out of place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` groups, so that the next grouped conv mixes information across them."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1, shuffle, 3x3 depthwise, grouped 1x1; added to the identity, or at stride 2 concatenated with
    the 3x3 average-pooled input (so a stride-2 unit makes only `out_channels - in_channels` new channels)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        self.stride = stride
        self.first_groups = first_groups
        mid = out_channels // 4
        self.conv1 = nn.Conv2d(in_channels, mid, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        # A ReLU after the depthwise conv too (the paper has none there): CRD's weights were trained with it.
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, kernel_size=3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(self, widths: tuple[int, int, int], blocks: tuple[int, int, int], groups: int,
                 num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu1 = nn.ReLU()  # a module, unlike CRD's functional ReLU, so that hooks can read the stem's map
        channels = 24
        stages = []
        for width, count in zip(widths, blocks, strict=True):
            units = []
            for i in range(count):
                # The paper leaves the very first 1x1 ungrouped: the 24 stem channels are too few to split.
                first_groups = 1 if channels == 24 else groups
                units.append(ShuffleV1Unit(channels, width - channels if i == 0 else width, 2 if i == 0 else 1,
                                           groups, first_groups))
                channels = width
            stages.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # CRD: a fixed 4x4 window, the last map's size at 32 px
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu1(self.bn1(self.conv1(x))))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


class ShuffleV2Unit(nn.Module):
    """Half the channels pass through untouched; the other half go 1x1, 3x3 depthwise, 1x1; then concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, branch = x.chunk(2, dim=1)
        branch = F.relu(self.bn1(self.conv1(branch)))
        branch = self.bn2(self.conv2(branch))
        branch = F.relu(self.bn3(self.conv3(branch)))
        return channel_shuffle(torch.cat([kept, branch], 1), 2)


class ShuffleV2Down(nn.Module):
    """The stride-2 unit: both branches see the whole input (depthwise 3x3 + 1x1, and 1x1 + depthwise 3x3 + 1x1),
    each making half of the output channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, widths: tuple[int, int, int, int], blocks: tuple[int, int, int],
                 num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu1 = nn.ReLU()  # modules, unlike CRD's functional ReLUs, so that hooks can read these maps
        channels = 24
        stages = []
        # Each stage: a stride-2 unit, then `count` more (the paper's repeats 4, 8, 4 count the stride-2 unit).
        for width, count in zip(widths[:3], blocks, strict=True):
            stages.append(nn.Sequential(ShuffleV2Down(channels, width), *(ShuffleV2Unit(width) for _ in range(count))))
            channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(channels, widths[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # CRD: a fixed 4x4 window, the last map's size at 32 px
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu1(self.bn1(self.conv1(x))))))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def shufflenet_v1(num_classes: int = 100) -> ShuffleNetV1:
    """CRD's "ShuffleV1": groups 3."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)


def shufflenet_v2(num_classes: int = 100) -> ShuffleNetV2:
    """CRD's "ShuffleV2": the 1x widths."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes=num_classes)

"""Model builders: unmodified torchvision ResNets, an optional small-image stem, and feature taps."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

STAGES = ("layer1", "layer2", "layer3", "layer4")
SMALL_IMAGE_MAX = 64  # at or below this size the ImageNet stem would shrink the image 4x too early


def resolve_stem(stem: str, image_size: int) -> str:
    """"auto" picks the CIFAR stem for small images, the ImageNet stem otherwise."""
    if stem != "auto":
        return stem
    return "cifar" if image_size <= SMALL_IMAGE_MAX else "imagenet"


def apply_stem(model: nn.Module, stem: str) -> nn.Module:
    """Give a torchvision ResNet the CIFAR stem (3x3 stride-1 conv, no max-pool) when asked.

    This is the only change made to torchvision's model, and it is what a user repeats to load a
    saved checkpoint into a plain `torchvision.models.resnetXX(num_classes=K)`.
    """
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif stem != "imagenet":
        raise ValueError(f"unknown stem {stem!r}")
    return model


def build_resnet(arch: str, num_classes: int, stem: str, zero_init_residual: bool = False) -> nn.Module:
    """A torchvision ResNet ("ResNet18", "ResNet50", ...) with random weights and the given stem."""
    builder = getattr(torchvision.models, arch.lower())
    model = builder(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    return apply_stem(model, stem)


def stage_channels(model: nn.Module, stage: str) -> int:
    """Output channels of a ResNet stage, read from its last block (Bottleneck or BasicBlock)."""
    block = getattr(model, stage)[-1]
    return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features


class FeatureTap:
    """Forward hooks that keep the latest outputs of named submodules (e.g. layer1..layer4, avgpool).

    The model itself stays an unmodified torchvision ResNet, so its state_dict loads anywhere.
    """

    def __init__(self, model: nn.Module, names: tuple[str, ...] | list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._keeper(name)) for name in names]

    def _keeper(self, name: str):
        def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            self.outputs[name] = output
        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.outputs[name]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _last_bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm closing each residual branch (what `zero_init_residual` zeroes)."""
    blocks = [block for stage in STAGES for block in getattr(model, stage)]
    return [block.bn3 if hasattr(block, "bn3") else block.bn2 for block in blocks]


def reinitialize_resnet(model: nn.Module) -> nn.Module:
    """Draw fresh weights with torchvision's ResNet initialisation scheme (from the global RNG).

    Used for DML's extra peers: same architecture and stem as the student, a different start; a model
    built with `zero_init_residual` keeps its residual branches zeroed.
    """
    zero_init_residual = all(not bn.weight.any() for bn in _last_bns(model))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            module.reset_parameters()
    if zero_init_residual:
        for bn in _last_bns(model):
            nn.init.zeros_(bn.weight)
    return model


class ExitHead(nn.Sequential):
    """A BYOT auxiliary exit: 1x1 conv to 128, kxk conv stride k, 1x1 conv to 512 (each + BN + ReLU),
    global average pooling. `k` is the stage's downsampling factor to layer4 (8, 4, 2)."""

    def __init__(self, in_channels: int, stride: int, width: int = 128, out_channels: int = 512):
        def conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, kernel_size=k, stride=k, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]
        super().__init__(*conv_bn_relu(in_channels, width, 1), *conv_bn_relu(width, width, stride),
                         *conv_bn_relu(width, out_channels, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

"""The CIFAR model zoo of the CIFAR-100 distillation tables (CRD, ReviewKD, DKD, mdistiller), by the names of
CRD's `model_dict`:

- ResNets for CIFAR: He et al. 2016, "Deep Residual Learning for Image Recognition" (resnet8 ... resnet110, and
  CRD's four-times wider resnet8x4 / resnet32x4);
- Wide ResNets: Zagoruyko & Komodakis 2016, "Wide Residual Networks" (wrn_d_k);
- VGG with BatchNorm: Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale Image
  Recognition" (vgg8 is CRD's one-conv-per-block variant);
- MobileNetV2: Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CRD's
  `mobile_half`: expansion 6, width 0.5);
- ShuffleV1 / ShuffleV2: Zhang et al. 2018, "ShuffleNet: An Extremely Efficient Convolutional Neural Network for
  Mobile Devices", and Ma et al. 2018, "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design".

Layouts, state_dict keys and initialisation follow the models released with CRD (Tian et al. 2020, "Contrastive
Representation Distillation", github.com/HobbitLong/RepDistiller), so that its checkpoints (and mdistiller's,
which share the layouts) load with `load_state_dict(..., strict=True)`. Each model's `forward(x)` returns the
logits only (feature losses read intermediate maps with forward hooks), and its classifier is its last
`nn.Linear`.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from models.cifar.mobilenetv2 import mobile_half
from models.cifar.resnet import (resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44, resnet56,
                                 resnet110)
from models.cifar.shufflenet import shufflenet_v1, shufflenet_v2
from models.cifar.vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from models.cifar.wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

# Each builder takes `num_classes` (default 100, CIFAR-100).
CIFAR_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "MobileNetV2": mobile_half,
    "ShuffleV1": shufflenet_v1,
    "ShuffleV2": shufflenet_v2,
}

__all__ = ["CIFAR_MODELS"]

"""The initialisation of CRD's CIFAR models (github.com/HobbitLong/RepDistiller, models/), which the tables'
numbers were trained from: one loop for the families that share it, the classifier as each family has it."""
from __future__ import annotations

from typing import Literal

from torch import nn


def init_as_crd(model: nn.Module, classifier: Literal["library", "zero_bias", "small_normal"]) -> None:
    """He-normal convs (fan-out) with zero bias and unit BatchNorm, in module order; the Linear as the family's
    reference leaves it: PyTorch's own ("library"), with a zero bias ("zero_bias"), or N(0, 0.01) with a zero
    bias ("small_normal")."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and classifier != "library":
            if classifier == "small_normal":
                nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)

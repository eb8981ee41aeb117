"""ReviewKD: Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review" (CVPR 2021).

Each student level learns from the teacher's level at the same depth *and* from the deeper ones: attention-
based fusion modules (ABF) review the student's features from the deepest level (the pooled feature) up to the
shallowest stage, each fusing the deeper result into its own, and every fused level is compared with the
teacher's level by a hierarchical context loss (HCL) at several pooled resolutions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kd.methods.base import Distiller
from kd.methods.common import WARMUP_DECLARATION, WARMUP_RULE, LossWarmup
from kd.methods.registry import Method, register
from kd.rules import NON_NEGATIVE
from kd.space import Range
from models import classifier_name, find_stages, pair_stages
from models.cifar.resnet import CifarResNet


def hcl_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
    """Sum over levels of [mse(fs, ft) + sum_l w_l mse(P_l fs, P_l ft)] / (1 + sum_l w_l), P_l the average
    pool to l x l for l in (4, 2, 1) below the map's height, with w = 1/2, 1/4, 1/8 for the sizes used."""
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for fs, ft in zip(student_feats, teacher_feats, strict=True):
        fs, ft = fs.float(), ft.detach().float()
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size < fs.shape[2]:
                weight /= 2
                loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
                weights += weight
        total = total + loss / weights
    return total


class ABF(nn.Module):
    """Attention-based fusion: the student's level to `mid` channels, fused with the deeper level's result by
    two attention maps, resized to the teacher's level and widened to its channels."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        for conv in (self.conv1[0], self.conv2[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None, out_size: torch.Size
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this level's output at the teacher's size and channels, the fused map the next level fuses)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            deeper = F.interpolate(deeper, x.shape[-2:], mode="nearest")
            attention = self.att_conv(torch.cat([x, deeper], dim=1))
            x = x * attention[:, 0:1] + deeper * attention[:, 1:2]
        if x.shape[-2:] != out_size:
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


def teacher_preactivations(teacher: nn.Module, stage_modules: list[str]) -> list[str] | None:
    """The modules whose input is each stage's pre-ReLU output: a torchvision ResNet's blocks (and the CIFAR
    zoo's) apply their one `relu` last to the residual sum, so the last call's input to `layerK[-1].relu` is it.
    None for other architectures (whose stage outputs are used instead)."""
    if not isinstance(teacher, (torchvision.models.ResNet, CifarResNet)):
        return None
    return [f"{name}.{len(teacher.get_submodule(name)) - 1}.relu" for name in stage_modules]


class ReviewKD(LossWarmup, Distiller):
    """ReviewKD over the paired stages plus the pooled feature. The ABFs train with the student and are never
    saved with it."""
    warmup_name = "reviewkd"
    needs_teacher = True
    needs_stages = ("student", "teacher")

    def __init__(self, student: nn.Module, teacher: nn.Module, *, ce_weight: float, beta: float,
                 warmup_epochs: int):
        super().__init__(student, teacher)
        self.ce_weight, self.beta, self.warmup_epochs = ce_weight, beta, warmup_epochs
        student_stages, teacher_stages = find_stages(student), find_stages(teacher)
        pairs = pair_stages(student_stages, teacher_stages)
        self.student_layers = [student_stages[i].module for i, _ in pairs]
        teacher_layers = [teacher_stages[j].module for _, j in pairs]
        self.teacher_layers = teacher_preactivations(teacher, teacher_layers) or teacher_layers
        self.student_tap = self.tap(student, self.student_layers)
        self.teacher_tap = self.tap(teacher, self.teacher_layers, inputs=self.teacher_layers != teacher_layers)
        self.student_pooled, self.teacher_pooled = self.tap_pooled(student), self.tap_pooled(teacher)
        widths = [model.get_submodule(classifier_name(model)).in_features for model in (student, teacher)]
        in_channels = [student_stages[i].channels for i, _ in pairs] + [widths[0]]
        out_channels = [teacher_stages[j].channels for _, j in pairs] + [widths[1]]
        mid = min(512, widths[0])
        # shallow -> deep; every level but the deepest (the pooled feature) fuses the deeper one
        self.abfs = nn.ModuleList(ABF(c_in, mid, c_out, fuse=level < len(in_channels) - 1)
                                  for level, (c_in, c_out) in enumerate(zip(in_channels, out_channels)))

    @staticmethod
    def plan_notes(student: nn.Module, teacher: nn.Module) -> list[str]:
        stages = [stage.module for stage in find_stages(teacher)]
        if teacher_preactivations(teacher, stages) is None:
            return [f"ReviewKD: {type(teacher).__name__} has no pre-activation reachable by hooks: the teacher's "
                    "stage outputs are used instead"]
        return ["ReviewKD: the teacher's pre-ReLU stage outputs come from hooks on each stage's last relu"]

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        self.teacher_forward(images)
        # levels shallow -> deep: the stages, then the pooled feature as a 1x1 map
        student_feats = [*(self.student_tap[name] for name in self.student_layers), self.student_pooled()[..., None, None]]
        teacher_feats = [*(self.teacher_tap[name] for name in self.teacher_layers), self.teacher_pooled()[..., None, None]]
        reviewed, deeper = [], None
        for abf, feature, target in zip(reversed(self.abfs), reversed(student_feats), reversed(teacher_feats)):
            output, deeper = abf(feature, deeper, target.shape[-2:])
            reviewed.insert(0, output)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_reviewkd": self.beta * self.warmup * hcl_loss(reviewed, teacher_feats),
        }


register(Method(
    "ReviewKD", ReviewKD, {"ce_weight": NON_NEGATIVE, "beta": NON_NEGATIVE, "warmup_epochs": WARMUP_RULE},
    idea="Chen et al. (CVPR 2021): attention-based fusion modules combine each student stage with the deeper "
         "ones and match the result to the teacher's same stage.",
    **WARMUP_DECLARATION,
    search_space={"beta": Range(0.5, 50.0, log=True)},
    # --kd-loss-weight of the ReviewKD repository's CIFAR-100/script/reviewKD.sh (5, the default, elsewhere)
    table_pairs={("resnet56", "resnet20"): {"beta": 0.6}, ("resnet110", "resnet32"): {"beta": 1.0},
                 ("resnet32x4", "ShuffleV2"): {"beta": 8.0}}))

"""SP: Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019).

Samples that the teacher finds alike (similar activations) should look alike to the student: the student
matches the teacher's batch similarity matrix of the last stage, whatever the two models' widths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.registry import Method, register
from kd.rules import NON_NEGATIVE
from kd.space import Range
from models import find_stages


def _similarity(feature: torch.Tensor) -> torch.Tensor:
    """The batch's b x b Gram matrix of flattened activations, each row L2-normalised."""
    flat = feature.float().reshape(feature.shape[0], -1)
    return F.normalize(flat @ flat.T, p=2, dim=1)


def sp_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
    """Sum over map pairs of ||G_t - G_s||_F^2 / b^2; channel and spatial sizes may differ."""
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for fs, ft in zip(student_feats, teacher_feats, strict=True):
        total = total + (_similarity(ft.detach()) - _similarity(fs)).pow(2).sum() / fs.shape[0] ** 2
    return total


class SP(Distiller):
    """SP on the last stage of both models (layer4 of a ResNet), as RepDistiller and mdistiller do."""
    needs_teacher = True
    needs_stages = ("student", "teacher")

    def __init__(self, student: nn.Module, teacher: nn.Module, *, ce_weight: float, beta: float):
        super().__init__(student, teacher)
        self.ce_weight, self.beta = ce_weight, beta
        self.student_layer, self.teacher_layer = find_stages(student)[-1].module, find_stages(teacher)[-1].module
        self.student_tap = self.tap(student, [self.student_layer])
        self.teacher_tap = self.tap(teacher, [self.teacher_layer])

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        self.teacher_forward(images)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_sp": self.beta * sp_loss([self.student_tap[self.student_layer]],
                                           [self.teacher_tap[self.teacher_layer]]),
        }


register(Method(
    "SP", SP, {"ce_weight": NON_NEGATIVE, "beta": NON_NEGATIVE},
    idea="Tung & Mori (ICCV 2019): the student matches the teacher's sample-to-sample similarities of the last "
         "stage's features within a batch.",
    search_space={"beta": Range(100.0, 100000.0, log=True)}))

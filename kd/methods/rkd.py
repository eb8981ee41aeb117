"""RKD: Park, Kim, Lu & Cho, "Relational Knowledge Distillation" (CVPR 2019).

The student keeps the teacher's geometry of a batch: the distances between the samples' pooled features
(each model's normalised by its mean distance) and the angles they form in triples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.registry import Method, register
from kd.rules import NON_NEGATIVE
from kd.space import Range


def _distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances, divided by their mean over the pairs at a positive distance."""
    squared = x.pow(2).sum(dim=1)
    d = (squared[:, None] + squared[None, :] - 2 * x @ x.T).clamp(min=1e-12).sqrt()
    d = d * (1 - torch.eye(len(x), device=x.device, dtype=x.dtype))  # d_ii = 0 exactly, not sqrt(1e-12)
    return d / d[d > 0].mean()


def _angles(x: torch.Tensor) -> torch.Tensor:
    """A[i, j, k] = cos of the angle at i between j and k: e_ij . e_ik, e_ij the unit vector from i to j."""
    e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)
    return e @ e.transpose(1, 2)


def rkd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    """distance_weight * smoothL1(d_s, d_t) + angle_weight * smoothL1(A_s, A_t), means over all N^2 / N^3
    entries; features (N, D) flattened, the teacher's relations computed without gradient."""
    student = student_feat.float().flatten(1)
    with torch.no_grad():
        teacher = teacher_feat.detach().float().flatten(1)
        d_teacher, a_teacher = _distances(teacher), _angles(teacher)
    return (distance_weight * F.smooth_l1_loss(_distances(student), d_teacher)
            + angle_weight * F.smooth_l1_loss(_angles(student), a_teacher))


class RKD(Distiller):
    """RKD on the pooled features (what each classifier sees): works with any teacher, ViTs included."""
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, ce_weight: float, beta: float,
                 distance_weight: float, angle_weight: float):
        super().__init__(student, teacher)
        self.ce_weight, self.beta = ce_weight, beta
        self.distance_weight, self.angle_weight = distance_weight, angle_weight
        self.student_pooled, self.teacher_pooled = self.tap_pooled(student), self.tap_pooled(teacher)

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        self.teacher_forward(images)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_rkd": self.beta * rkd_loss(self.student_pooled(), self.teacher_pooled(), self.distance_weight,
                                             self.angle_weight),
        }


register(Method(
    "RKD", RKD, {"ce_weight": NON_NEGATIVE, "beta": NON_NEGATIVE, "distance_weight": NON_NEGATIVE,
                 "angle_weight": NON_NEGATIVE},
    idea="Park et al. (CVPR 2019): the student matches the teacher's distances and angles between the pooled "
         "features of the samples in a batch.",
    search_space={"distance_weight": Range(2.5, 250.0, log=True), "angle_weight": Range(5.0, 500.0, log=True)}))

"""DIST: Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022).

Instead of matching the teacher's probabilities exactly (KL), the student matches their relations: the
Pearson correlation of each sample's class probabilities (inter-class) and of each class's probabilities
over the batch (intra-class). A much stronger teacher's sharper outputs then need not be copied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.registry import Method, register
from kd.rules import NON_NEGATIVE, POSITIVE
from kd.space import Range


def _mean_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The mean over rows of the Pearson correlation of a's and b's rows (eps added to the norms' product)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return ((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, gamma: float,
              temperature: float) -> torch.Tensor:
    """T^2 * (beta * (1 - inter) + gamma * (1 - intra)) on softmax(z/T): inter the mean correlation per
    sample over the classes, intra per class over the batch this process sees."""
    p_student = F.softmax(student_logits.float() / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    inter = 1 - _mean_pearson(p_student, p_teacher)
    intra = 1 - _mean_pearson(p_student.T, p_teacher.T)
    return temperature ** 2 * (beta * inter + gamma * intra)


class DIST(Distiller):
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, ce_weight: float, beta: float, gamma: float,
                 temperature: float):
        super().__init__(student, teacher)
        self.ce_weight, self.beta, self.gamma, self.temperature = ce_weight, beta, gamma, temperature

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_dist": dist_loss(logits, teacher_logits, self.beta, self.gamma, self.temperature),
        }


register(Method(
    "DIST", DIST, {"ce_weight": NON_NEGATIVE, "beta": NON_NEGATIVE, "gamma": NON_NEGATIVE, "temperature": POSITIVE},
    idea="Huang et al. (NeurIPS 2022): the student matches the correlation of its softened predictions with the "
         "teacher's, per sample across classes and per class across the batch.",
    search_space={"beta": Range(0.5, 8.0, log=True), "gamma": Range(0.5, 8.0, log=True),
                  "temperature": Range(1.0, 8.0)}))

"""KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.base import Distiller


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), averaged over the batch.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature ** 2


class KD(Distiller):
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, temperature: float, ce_weight: float,
                 kd_weight: float):
        super().__init__(student, teacher)
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_kd": self.kd_weight * kd_loss(logits, teacher_logits, self.temperature),
        }

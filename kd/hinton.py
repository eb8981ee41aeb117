"""KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015), with the option of
logit standardization (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.base import Distiller


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each sample's logits as z-scores over the classes: (z - mean) / (eps + std), std unbiased.

    Sun et al.: the teacher's and the student's logits then differ in shape only, not in scale, so the
    student need not match the teacher's logit range (its gradient flows through its mean and std).
    """
    return (logits - logits.mean(dim=1, keepdim=True)) / (eps + logits.std(dim=1, keepdim=True))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            standardize: bool = False) -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), averaged over the batch (on standardized logits with
    `standardize`).

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones.
    """
    student, teacher = student_logits.float(), teacher_logits.detach().float()
    if standardize:
        student, teacher = standardize_logits(student), standardize_logits(teacher)
    log_p_student = F.log_softmax(student / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature ** 2


class KD(Distiller):
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, temperature: float, ce_weight: float,
                 kd_weight: float, standardize: bool):
        super().__init__(student, teacher)
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight
        self.standardize = standardize

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_kd": self.kd_weight * kd_loss(logits, teacher_logits, self.temperature, self.standardize),
        }

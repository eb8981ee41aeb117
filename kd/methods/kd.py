"""KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.common import kd_loss
from kd.methods.registry import Method, register
from kd.rules import BOOL, NON_NEGATIVE, POSITIVE
from kd.space import Range


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


KD_SETTINGS = {"temperature": POSITIVE, "ce_weight": NON_NEGATIVE, "kd_weight": NON_NEGATIVE, "standardize": BOOL}

register(Method("KD", KD, KD_SETTINGS,
                idea="Hinton et al. (2015): the student matches the teacher's temperature-softened class "
                     "probabilities.",
                search_space={"temperature": Range(1.0, 8.0), "kd_weight": Range(0.1, 10.0, log=True)}))

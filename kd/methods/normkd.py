"""NormKD: Chi et al., "NormKD: Normalized Logits for Knowledge Distillation" (arXiv 2023).

One temperature cannot soften every sample's logits to the same degree, since their spread differs from sample
to sample. NormKD gives each sample of each model its own temperature, the standard deviation of its logits
times T_norm: every row is then softened as a normalised (unit-spread) logit vector would be at T_norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.registry import Method, register
from kd.rules import NON_NEGATIVE, POSITIVE
from kd.space import Range


def normkd_temperature(logits: torch.Tensor, t_norm: float) -> torch.Tensor:
    """Each sample's temperature, shape (N, 1): t_norm times the unbiased std of its logits over the classes."""
    return logits.std(dim=1, keepdim=True) * t_norm


def normkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t_norm: float) -> torch.Tensor:
    """mean_i T_t,i^2 * KL(softmax(z_t,i / T_t,i) || softmax(z_s,i / T_s,i)), each model's T_i from its own logits.

    As the authors' kd_loss_normal (mdistiller/distillers/NormKD.py): the T^2 factor is per sample and uses the
    teacher's temperature; the student's temperature is not detached, so its gradient flows through the std.
    """
    student, teacher = student_logits.float(), teacher_logits.detach().float()
    teacher_temperature = normkd_temperature(teacher, t_norm)
    log_p_student = F.log_softmax(student / normkd_temperature(student, t_norm), dim=1)
    log_p_teacher = F.log_softmax(teacher / teacher_temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1, keepdim=True)
    return (kl * teacher_temperature ** 2).mean()


class NormKD(Distiller):
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, t_norm: float, ce_weight: float,
                 kd_weight: float):
        super().__init__(student, teacher)
        self.t_norm, self.ce_weight, self.kd_weight = t_norm, ce_weight, kd_weight

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_normkd": self.kd_weight * normkd_loss(logits, teacher_logits, self.t_norm),
        }


# Defaults t_norm 2, ce_weight 0.1, kd_weight 0.9: the authors' mdistiller/engine/cfg.py (CFG.NormKD), which
# configs/cifar100/NormKD/res32x4_res8x4.yaml (and every other CIFAR-100 pair's file) leaves unchanged.
NORMKD_SETTINGS = {"t_norm": POSITIVE, "ce_weight": NON_NEGATIVE, "kd_weight": NON_NEGATIVE}

register(Method("NormKD", NormKD, NORMKD_SETTINGS,
                idea="Chi et al. (arXiv 2023): KD with a temperature per sample and model, the standard deviation "
                     "of its logits times T_norm, so that every sample is softened to the same degree.",
                search_space={"t_norm": Range(0.5, 4.0), "kd_weight": Range(0.1, 10.0, log=True)}))

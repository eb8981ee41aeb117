"""WTTM: Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher Matching" (ICLR 2024).

TTM drops the temperature on the student's side: the student's plain softmax matches the teacher's
distribution at temperature T, which is the power transform p_t^gamma / sum_k p_t,k^gamma with gamma = 1/T
(softmax(z/T) is proportional to softmax(z)^(1/T)); the paper shows that its objective is KD's plus a
Rényi-entropy term, which regularises. WTTM weights each sample by the power sum U = sum_k p_t,k^gamma, which
for gamma < 1 grows from 1 (a one-hot teacher) to K^(1 - gamma) (a uniform one): smoother targets count more.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.registry import Method, register
from kd.rules import NON_NEGATIVE, POSITIVE
from kd.space import Range


def wttm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """mean_i U_i * KL(q_i || softmax(z_s,i)), q_i = p_t,i^gamma / U_i, U_i = sum_k p_t,ik^gamma, p_t = softmax(z_t).

    As the authors' distiller_zoo/wttm.py: no temperature on the student and no T^2 factor.
    """
    log_p_student = F.log_softmax(student_logits.float(), dim=1)
    # gamma * log p_t in log space: p_t^gamma of a confident teacher would underflow in float32
    log_powered = gamma * F.log_softmax(teacher_logits.detach().float(), dim=1)
    log_power_sum = log_powered.logsumexp(dim=1)  # log U_i
    log_q = log_powered - log_power_sum[:, None]  # log of the transformed (normalised) teacher distribution
    kl = (log_q.exp() * (log_q - log_p_student)).sum(dim=1)
    return (log_power_sum.exp() * kl).mean()


class WTTM(Distiller):
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, gamma: float, ce_weight: float,
                 wttm_weight: float):
        super().__init__(student, teacher)
        self.gamma, self.ce_weight, self.wttm_weight = gamma, ce_weight, wttm_weight

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_wttm": self.wttm_weight * wttm_loss(logits, teacher_logits, self.gamma),
        }


# Defaults from the authors' repository (github.com/zkxufo/TTM), which ships no per-pair CIFAR-100 scripts (the
# paper's appendix A.4 lists them): gamma 0.2 and weight 4 are its README.md's WTTM command (`--add wttm
# --ttm_l 0.2 -a 4`, there added to CRD); ce_weight 1 is train_student.py's `-r` default (helper/loops.py sums
# `gamma * loss_cls + alpha * loss_div + beta * loss_kd`).
WTTM_SETTINGS = {"gamma": POSITIVE, "ce_weight": NON_NEGATIVE, "wttm_weight": NON_NEGATIVE}

register(Method("WTTM", WTTM, WTTM_SETTINGS,
                idea="Zheng & Yang (ICLR 2024): the student's plain softmax matches the teacher's power-transformed "
                     "(temperature-softened) probabilities, each sample weighted by the power sum of the teacher's "
                     "probabilities.",
                # gamma = 1/T for T from 1 to 10, searched by its ratio like a temperature
                search_space={"gamma": Range(0.1, 1.0, log=True), "wttm_weight": Range(0.5, 16.0, log=True)}))

"""DKD: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022).

KD's loss splits into a target-class term (TCKD: the binary target vs. non-target probabilities) and a
non-target term (NCKD: the distribution among the other classes); DKD weights them independently.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.common import (
    WARMUP_DECLARATION,
    WARMUP_RULE,
    LossWarmup,
    standardize_logits,
)
from kd.methods.registry import Method, register
from kd.rules import BOOL, NON_NEGATIVE, POSITIVE
from kd.space import Range


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, alpha: float,
             beta: float, temperature: float, standardize: bool = False) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD, each T^2 * KL(teacher || student) summed over classes, averaged over the batch.

    TCKD compares the binary distributions [p_target, 1 - p_target]; NCKD compares the softmax over the
    non-target classes alone (the target column dropped, the rest renormalised).
    """
    student, teacher = student_logits.float(), teacher_logits.detach().float()
    if standardize:
        student, teacher = standardize_logits(student), standardize_logits(teacher)
    student, teacher = student / temperature, teacher / temperature
    target = F.one_hot(targets, student.shape[1]).bool()

    def binary_log_probs(logits: torch.Tensor) -> torch.Tensor:
        # log p_target and log(sum of the others), each as a log-sum-exp over its classes
        log_z = logits.logsumexp(dim=1)
        return torch.stack([logits.masked_fill(~target, float("-inf")).logsumexp(dim=1) - log_z,
                            logits.masked_fill(target, float("-inf")).logsumexp(dim=1) - log_z], dim=1)

    def non_target_log_probs(logits: torch.Tensor) -> torch.Tensor:
        # the target column is dropped: its log-probability is set to 0 in both models, so that column adds
        # exp(0) * (0 - 0) = 0 to the KL below, with finite values and gradients
        return F.log_softmax(logits.masked_fill(target, float("-inf")), dim=1).masked_fill(target, 0.0)

    def kl(log_p_teacher: torch.Tensor, log_p_student: torch.Tensor) -> torch.Tensor:
        return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum() / student.shape[0]

    tckd = kl(binary_log_probs(teacher), binary_log_probs(student))
    nckd = kl(non_target_log_probs(teacher), non_target_log_probs(student))
    return (alpha * tckd + beta * nckd) * temperature ** 2


class DKD(LossWarmup, Distiller):
    warmup_name = "dkd"
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, ce_weight: float, tckd_weight: float,
                 nckd_weight: float, temperature: float, warmup_epochs: int, standardize: bool):
        super().__init__(student, teacher)
        self.ce_weight, self.tckd_weight, self.nckd_weight = ce_weight, tckd_weight, nckd_weight
        self.temperature, self.warmup_epochs, self.standardize = temperature, warmup_epochs, standardize

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_dkd": self.warmup * dkd_loss(logits, teacher_logits, targets, self.tckd_weight, self.nckd_weight,
                                               self.temperature, self.standardize),
        }


DKD_SETTINGS = {"ce_weight": NON_NEGATIVE, "tckd_weight": NON_NEGATIVE, "nckd_weight": NON_NEGATIVE,
                "temperature": POSITIVE, "warmup_epochs": WARMUP_RULE, "standardize": BOOL}
register(Method("DKD", DKD, DKD_SETTINGS,
                idea="Zhao et al. (CVPR 2022): KD split into a target-class and a non-target-class term, weighted "
                     "separately, with a warm-up of the distillation weight.", **WARMUP_DECLARATION,
                search_space={"nckd_weight": Range(1.0, 64.0, log=True), "temperature": Range(1.0, 8.0)},
                # beta of mdistiller's configs/cifar100/dkd/<pair>.yaml (8, the default, for the other pairs)
                table_pairs={("resnet56", "resnet20"): {"nckd_weight": 2.0},
                             ("resnet110", "resnet32"): {"nckd_weight": 2.0},
                             ("wrn_40_2", "wrn_16_2"): {"nckd_weight": 6.0},
                             ("wrn_40_2", "wrn_40_1"): {"nckd_weight": 6.0},
                             ("vgg13", "vgg8"): {"nckd_weight": 6.0},
                             ("vgg13", "MobileNetV2"): {"nckd_weight": 6.0}}))

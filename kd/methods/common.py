"""Helpers several methods share: the softened KL of KD, logit standardization and the loss warm-up."""
from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F

from kd.methods.registry import EpochShare
from kd.rules import NON_NEGATIVE_INT, Rule

# DKD's and ReviewKD's loss warm-up: 20 of the 240 epochs of mdistiller's CIFAR-100 recipes
# (configs/cifar100/dkd/ and reviewkd/: WARMUP 20, SOLVER.EPOCHS 240), the same share of a run of any length
WARMUP_SHARE = EpochShare(Fraction(20, 240), "unset: the references' 20 of 240 epochs")
WARMUP_RULE = Rule("null (the references' share of the epochs) or an integer >= 0",
                   lambda value: value is None or NON_NEGATIVE_INT.check(value))
# how a method with a loss warm-up declares it (Method's keyword arguments)
WARMUP_DECLARATION = {"record_fields": {"warmup_epochs": "Loss warm-up epochs"},
                      "epoch_shares": {"warmup_epochs": WARMUP_SHARE}}


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each sample's logits as z-scores over the classes: (z - mean) / (eps + std), std unbiased.

    Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024): the teacher's and the
    student's logits then differ in shape only, not in scale, so the student need not match the teacher's
    logit range (its gradient flows through its mean and std).
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


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """Linear loss warm-up per epoch, min((e + 1) / warmup_epochs, 1) for the 0-based epoch e (so the first
    epoch already has 1/warmup_epochs, as in mdistiller); 1 without warm-up."""
    return 1.0 if warmup_epochs == 0 else min((epoch + 1) / warmup_epochs, 1.0)


class LossWarmup:
    """A Distiller mixin: the distillation term's weight `self.warmup` rises linearly over `warmup_epochs`
    (DKD, ReviewKD, CTKD_DKD; CE is not warmed up). The weight goes to the history and TensorBoard under
    `warmup_name`, the warm-up's length to the record (the value used, also when METHODS_CONFIG left it unset).
    Each hook adds to the next class's in the method resolution order, so the warm-up combines with another
    per-epoch schedule (CTKD_DKD's temperature curriculum)."""
    warmup_name: str
    warmup_epochs: int
    warmup: float = 1.0

    def start_epoch(self, epoch: int, epochs: int) -> None:
        super().start_epoch(epoch, epochs)
        self.warmup = warmup_factor(epoch, self.warmup_epochs)

    def loss_weights(self) -> dict[str, float]:
        return {self.warmup_name: self.warmup, **super().loss_weights()}

    def record_extras(self, history: list[dict], best_epoch: int) -> dict:
        return {"warmup_epochs": self.warmup_epochs, **super().record_extras(history, best_epoch)}

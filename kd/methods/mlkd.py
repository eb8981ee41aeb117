"""MLKD: Jin, Wang & Lin, "Multi-Level Logit Distillation" (CVPR 2023).

The student's predictions are aligned with the teacher's at three levels: each sample's (KD's KL), the class
level (the C x C Gram matrix of the batch's predictions, how classes co-occur) and the batch level (the B x B
Gram matrix, how samples resemble each other), each at several temperatures ("prediction augmentation"). It
trains on two views of each image: the weak one every method sees and a strong one (kd/data/strong_view.py),
and the teacher's confidence on the weak view weighs the weak-view terms.

The loss is the authors' released one (github.com/Jin-Ying/Multi-Level-Logit-Distillation,
mdistiller/distillers/KD_ours.py), which produced the paper's numbers and differs from the paper's text in
three ways kept here: (1) each confidence mask multiplies a term already averaged over the batch, so it weighs
the term by the share of samples (classes) at or below the median confidence instead of selecting them;
(2) the strong view's instance term at temperatures 2 and 6 reads the weak view's logits; (3) only the weak
view has class- and batch-level terms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.common import kd_loss
from kd.methods.registry import Method, register
from kd.rules import NON_NEGATIVE, POSITIVE
from kd.space import Range

# KD_ours.py's temperatures besides the configured one, in its order; its strong-view instance term reads the
# weak view at the last two
EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)
WEAK_IN_STRONG_TERM = 2


def class_level_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
                     ) -> torch.Tensor:
    """||Q_t^T Q_t - Q_s^T Q_s||_F^2 / C, with Q = softmax(z / T) of the batch (B x C): the class correlation."""
    student = F.softmax(student_logits.float() / temperature, dim=1)
    teacher = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    return (teacher.T @ teacher - student.T @ student).pow(2).sum() / student.shape[1]


def batch_level_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
                     ) -> torch.Tensor:
    """||Q_t Q_t^T - Q_s Q_s^T||_F^2 / B: how alike the batch's samples are, by their predictions."""
    student = F.softmax(student_logits.float() / temperature, dim=1)
    teacher = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    return (teacher @ teacher.T - student @ student.T).pow(2).sum() / student.shape[0]


def confidence_shares(teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' masks as the weights they act as: the share of samples whose teacher confidence (top
    probability) is at or below the batch's median, and the share of classes whose summed probability is at or
    below the classes' median (medians interpolated, as numpy.percentile's 50)."""
    probs = F.softmax(teacher_logits.detach().float(), dim=1)
    confidence, class_confidence = probs.max(dim=1).values, probs.sum(dim=0)
    sample_share = (confidence <= confidence.quantile(0.5)).float().mean()
    class_share = (class_confidence <= class_confidence.quantile(0.5)).float().mean()
    return sample_share, class_share


def mlkd_loss(weak_student: torch.Tensor, weak_teacher: torch.Tensor, strong_student: torch.Tensor,
              strong_teacher: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """The instance-, class- and batch-level terms (unweighted), summed over the temperatures."""
    temperatures = (temperature, *EXTRA_TEMPERATURES)
    sample_share, class_share = confidence_shares(weak_teacher)
    split = len(temperatures) - WEAK_IN_STRONG_TERM
    strong_pairs = [(strong_student, strong_teacher, t) for t in temperatures[:split]] + \
                   [(weak_student, weak_teacher, t) for t in temperatures[split:]]
    return {
        "instance": sample_share * sum(kd_loss(weak_student, weak_teacher, t) for t in temperatures)
        + sum(kd_loss(student, teacher, t) for student, teacher, t in strong_pairs),
        "class": class_share * sum(class_level_loss(weak_student, weak_teacher, t) for t in temperatures),
        "batch": sample_share * sum(batch_level_loss(weak_student, weak_teacher, t) for t in temperatures),
    }


class MLKD(Distiller):
    needs_teacher = True
    needs_strong_view = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, temperature: float, ce_weight: float,
                 kd_weight: float):
        super().__init__(student, teacher)
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor, strong_images: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # two forwards, as the authors': each view's BatchNorm statistics are its own
        logits, strong_logits = self.student(images), self.student(strong_images)
        teacher_logits = self.teacher_forward(images)
        strong_teacher_logits = self.teacher_forward(strong_images)
        terms = mlkd_loss(logits, teacher_logits, strong_logits, strong_teacher_logits, self.temperature)
        return logits, {
            "loss_ce": self.ce_weight * (F.cross_entropy(logits, targets) + F.cross_entropy(strong_logits, targets)),
            "loss_kd": self.kd_weight * terms["instance"],
            "loss_cc": self.kd_weight * terms["class"],
            "loss_bc": self.kd_weight * terms["batch"],
        }

    @staticmethod
    def plan_notes(student: nn.Module, teacher: nn.Module) -> list[str]:
        return ["MLKD trains on two views of each image: the weak view every method sees and a strong one (a crop "
                "and flip of its own, RandAugment of 2 operations, Cutout), so each of its steps runs the student "
                "and the teacher twice"]


# Defaults from the authors' repository: KD_ours reads cfg.KD (mdistiller/engine/cfg.py: TEMPERATURE 4,
# CE_WEIGHT 0.1, KD_WEIGHT 0.9; configs/cifar100/ours/*.yaml set no KD keys). Their CIFAR-100 configs also lower
# the lr to 0.025 at batch 64 (0.01 for the ShuffleNet/MobileNet students), a recipe change the common protocol
# does not make for one method.
MLKD_SETTINGS = {"temperature": POSITIVE, "ce_weight": NON_NEGATIVE, "kd_weight": NON_NEGATIVE}

register(Method("MLKD", MLKD, MLKD_SETTINGS,
                idea="Jin et al. (CVPR 2023): the student matches the teacher's predictions at the instance, "
                     "class and batch levels at several temperatures; it trains on two views of each image (the "
                     "common one and a strongly augmented one), so it sees more augmented images than the others.",
                cost=lambda settings: 2.0,  # a student step on each view
                search_space={"temperature": Range(1.0, 8.0), "kd_weight": Range(0.1, 10.0, log=True)}))

"""PKT: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer" (ECCV 2018).

Each model's pooled features define, per sample, a probability distribution over the other samples of
the batch (cosine similarity made a kernel); the student matches the teacher's distributions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.registry import Method, register
from kd.rules import NON_NEGATIVE
from kd.space import Range


def _conditional_probabilities(feature: torch.Tensor, eps: float) -> torch.Tensor:
    x = feature / (feature.norm(dim=1, keepdim=True) + eps)
    x = torch.nan_to_num(x, nan=0.0)
    similarity = (x @ x.T + 1) / 2  # cosine similarity mapped to [0, 1]
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mean over all N^2 entries of P_t * log((P_t + eps) / (P_s + eps)) (a mean, as the references take it,
    not a per-row KL)."""
    p_student = _conditional_probabilities(student_feat.float().flatten(1), eps)
    p_teacher = _conditional_probabilities(teacher_feat.detach().float().flatten(1), eps)
    return (p_teacher * torch.log((p_teacher + eps) / (p_student + eps))).mean()


class PKT(Distiller):
    """PKT on the pooled features (what each classifier sees): works with any teacher, ViTs included."""
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, ce_weight: float, beta: float):
        super().__init__(student, teacher)
        self.ce_weight, self.beta = ce_weight, beta
        self.student_pooled, self.teacher_pooled = self.tap_pooled(student), self.tap_pooled(teacher)

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        self.teacher_forward(images)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_pkt": self.beta * pkt_loss(self.student_pooled(), self.teacher_pooled()),
        }


register(Method(
    "PKT", PKT, {"ce_weight": NON_NEGATIVE, "beta": NON_NEGATIVE},
    idea="Passalis & Tefas (ECCV 2018): the student matches the teacher's distribution of cosine similarities "
         "between the pooled features of a batch.",
    search_space={"beta": Range(1000.0, 1000000.0, log=True)}))

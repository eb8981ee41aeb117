"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.registry import Method, register
from kd.rules import NON_NEGATIVE, POSITIVE
from kd.space import Range
from models import find_stages, pair_stages


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """L2-normalised spatial attention: mean over channels of |f|^p, flattened per image."""
    return F.normalize(feature.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], p: float = 2.0) -> torch.Tensor:
    """Sum over layer pairs of mean((a(f_s) - a(f_t))^2); channel counts may differ.

    When a pair's spatial sizes differ, the larger map is average-pooled to the smaller size first.
    """
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for fs, ft in zip(student_feats, teacher_feats, strict=True):
        size = min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1])
        fs = fs if fs.shape[-2:] == size else F.adaptive_avg_pool2d(fs, size)
        ft = ft if ft.shape[-2:] == size else F.adaptive_avg_pool2d(ft, size)
        total = total + (attention_map(fs, p) - attention_map(ft.detach(), p)).pow(2).mean()
    return total


class AT(Distiller):
    """Attention transfer at every stage pair (stage k with stage k; by stride when the counts differ)."""
    needs_teacher = True
    needs_stages = ("student", "teacher")

    def __init__(self, student: nn.Module, teacher: nn.Module, *, p: float, ce_weight: float, beta: float):
        super().__init__(student, teacher)
        self.p, self.ce_weight, self.beta = p, ce_weight, beta
        student_stages, teacher_stages = find_stages(student), find_stages(teacher)
        pairs = pair_stages(student_stages, teacher_stages)
        self.student_layers = [student_stages[i].module for i, _ in pairs]
        self.teacher_layers = [teacher_stages[j].module for _, j in pairs]
        self.student_tap = self.tap(student, self.student_layers)
        self.teacher_tap = self.tap(teacher, self.teacher_layers)

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        self.teacher_forward(images)
        student_feats = [self.student_tap[name] for name in self.student_layers]
        teacher_feats = [self.teacher_tap[name] for name in self.teacher_layers]
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_at": self.beta * at_loss(student_feats, teacher_feats, self.p),
        }


register(Method("AT", AT, {"p": POSITIVE, "ce_weight": NON_NEGATIVE, "beta": NON_NEGATIVE},
                idea="Zagoruyko & Komodakis (ICLR 2017): the student matches the teacher's spatial attention maps "
                     "after each stage.",
                search_space={"beta": Range(10.0, 10000.0, log=True)}))

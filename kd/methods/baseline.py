"""Baseline: the student trained alone with cross-entropy (also how the teacher is trained)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.methods.base import Distiller
from kd.methods.registry import Method, register


class Baseline(Distiller):
    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        return logits, {"loss_ce": F.cross_entropy(logits, targets)}


register(Method("Baseline", Baseline, settings={},
                idea="the student trained alone with cross-entropy: the reference every gain is measured against."))

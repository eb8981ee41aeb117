"""FitNets: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.common import kd_loss
from kd.methods.registry import Method, register
from kd.rules import BOOL, NON_EMPTY_TEXT, NON_NEGATIVE, POSITIVE_INT, Rule
from kd.space import Range
from models import ModelError, Stage, find_stages, matching_stage

# The paper's second stage is plain KD, with the settings README's "Methods" gives for FitNets.
STAGE2_TEMPERATURE, STAGE2_CE_WEIGHT, STAGE2_KD_WEIGHT = 4.0, 0.1, 0.9


def hint_loss(student_regressed: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the regressed student hint and the teacher's guided layer."""
    return F.mse_loss(student_regressed.float(), teacher_feat.detach().float())


class Regressor(nn.Module):
    """1x1 conv + BN + ReLU from the student's channels to the teacher's (resized if sizes differ)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return F.relu(self.bn(self.conv(x)))


def hint_stages(student: nn.Module, teacher: nn.Module, hint_layer: int | str) -> tuple[Stage, Stage]:
    """The student's hint stage (a stage number from 1, or a stage's module path) and the teacher stage
    paired with it (the guided layer)."""
    student_stages, teacher_stages = find_stages(student), find_stages(teacher)
    names = [stage.module for stage in student_stages]
    if isinstance(hint_layer, int) and hint_layer <= len(student_stages):
        index = hint_layer - 1
    elif hint_layer in names:
        index = names.index(hint_layer)
    else:
        raise ModelError(f"FitNets' hint_layer {hint_layer!r} is not a stage of the student: use a stage number "
                         f"1-{len(names)} or one of {', '.join(names)}")
    return student_stages[index], teacher_stages[matching_stage(student_stages, index, teacher_stages)]


class FitNets(Distiller):
    needs_teacher = True
    needs_stages = ("student", "teacher")

    def __init__(self, student: nn.Module, teacher: nn.Module, *, hint_layer: int | str, ce_weight: float,
                 beta: float, two_stage: bool, hint_epochs: int | None):
        super().__init__(student, teacher)
        self.ce_weight, self.beta = ce_weight, beta
        self.two_stage, self.hint_epochs = two_stage, hint_epochs
        self.skips_parameters = two_stage  # the hint stage leaves the layers after the hint untrained
        hint, guided = hint_stages(student, teacher, hint_layer)
        self.hint_layer, self.guided_layer = hint.module, guided.module
        self.regressor = Regressor(hint.channels, guided.channels)
        self.student_tap = self.tap(student, [self.hint_layer])
        self.teacher_tap = self.tap(teacher, [self.guided_layer])
        self.hint_stage = False

    def start_epoch(self, epoch: int, epochs: int) -> None:
        stage1_epochs = self.hint_epochs or max(1, round(0.1 * epochs))
        self.hint_stage = self.two_stage and epoch < stage1_epochs

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        if self.two_stage and not self.hint_stage:
            return logits, {
                "loss_ce": STAGE2_CE_WEIGHT * F.cross_entropy(logits, targets),
                "loss_kd": STAGE2_KD_WEIGHT * kd_loss(logits, teacher_logits, STAGE2_TEMPERATURE),
            }
        guided = self.teacher_tap[self.guided_layer]
        hint = hint_loss(self.regressor(self.student_tap[self.hint_layer], guided.shape[-2:]), guided)
        if self.hint_stage:  # stage 1 trains only the layers up to the hint (and the regressor)
            return logits, {"loss_hint": hint}
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
                        "loss_hint": self.beta * hint}


register(Method(
    "FitNets", FitNets,
    {"hint_layer": Rule("a stage number >= 1 or the module path of a student stage (e.g. layer2)",
                        lambda v: POSITIVE_INT.check(v) or NON_EMPTY_TEXT.check(v)),
     "ce_weight": NON_NEGATIVE, "beta": NON_NEGATIVE, "two_stage": BOOL,
     "hint_epochs": Rule("null or an integer >= 1", lambda v: v is None or POSITIVE_INT.check(v))},
    idea="Romero et al. (ICLR 2015): a regressor maps the student's features at one stage (the hint) onto the "
         "teacher's.",
    search_space={"beta": Range(1.0, 1000.0, log=True)}))

"""OFA-KD: Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation"
(NeurIPS 2023).

Features of different architectures (CNN, ViT, MLP) live in different spaces, so OFA compares none of them
directly: a projector on each chosen student stage maps it to class logits (the space every architecture
shares), and each of those branches, like the student's own logits, learns the teacher's prediction. Its loss
enhances the target class adaptively: with the one-hot label y the target weight is (p_t + y)^eps - y, so for
eps > 1 the target's share grows most where the teacher is least sure of it. Only the teacher's logits are
read, so any teacher works; the projectors (kd/methods/ofa_projectors.py) train with the student and are never
saved with it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.ofa_projectors import build_projector, stage_modules, token_layout
from kd.methods.registry import Method, register
from kd.rules import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Rule
from kd.space import Range
from models import ModelError, find_stages, num_outputs


def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, eps: float,
             temperature: float = 1.0) -> torch.Tensor:
    """mean_i sum_k -((p_t,ik + y_ik)^eps - y_ik) * log p_s,ik, p = softmax(z / T), y the one-hot target.

    As the authors' ofa_loss (distillers/ofa.py): no T^2 factor; at eps = 1 the weights are p_t itself, so it is
    the cross-entropy with the teacher's soft target. log p_s comes from log_softmax, which stays finite where the
    authors' log(softmax) would underflow to -inf.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    one_hot = F.one_hot(targets, log_p_student.shape[1]).float()
    weights = (p_teacher + one_hot).pow(eps) - one_hot
    return -(weights * log_p_student).sum(dim=1).mean()


class OFA(Distiller):
    """The student's CE, OFA's loss on its logits, and OFA's loss on the projected logits of each chosen stage.

    `needs_stages` stays empty: a ViT student has no feature-map stages but OFA reads its blocks' tokens; a student
    with neither is refused here, in the constructor (which the setup check runs once), in one line.
    """
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, ce_weight: float, kd_weight: float,
                 ofa_weight: float, eps: float, temperature: float, stages: list[int] | None):
        super().__init__(student, teacher)
        self.ce_weight, self.kd_weight, self.ofa_weight = ce_weight, kd_weight, ofa_weight
        self.eps, self.temperature = eps, temperature
        modules = stage_modules(student)
        self.stages = list(range(1, len(modules) + 1)) if stages is None else sorted(stages)
        if self.stages[-1] > len(modules):
            raise ModelError(f"OFA's stages {stages} are not all stages of the student {type(student).__name__}: it "
                             f"has stages 1-{len(modules)} ({', '.join(modules)}); set methods.OFA.stages to some "
                             "of those, or null for all")
        self.stage_modules = [modules[k - 1] for k in self.stages]
        num_classes = num_outputs(student)
        # keys are stage numbers (a ModuleDict needs strings); none of them is part of the saved student
        self.projectors = nn.ModuleDict({str(k): build_projector(student, teacher, k, num_classes)
                                         for k in self.stages})
        self.student_tap = self.tap(student, list(dict.fromkeys(self.stage_modules)))  # a shallow ViT may repeat

    @staticmethod
    def plan_notes(student: nn.Module, teacher: nn.Module) -> list[str]:
        try:
            modules = stage_modules(student)
        except ModelError:  # the setup check has refused such a student already
            return []
        if find_stages(student):
            where = f"the student's stages 1-{len(modules)} ({', '.join(modules)})"
        else:
            blocks = token_layout(student).blocks
            numbers = ", ".join(str(blocks.index(m) + 1) for m in modules)
            where = (f"the ViT student's stages 1-{len(modules)}, the tokens after its blocks {numbers} of "
                     f"{len(blocks)} ({', '.join(modules)})")
        return [f"OFA: projectors on {where}, unless methods.OFA.stages picks some"]

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        branches = [self.projectors[str(k)](self.student_tap[module])
                    for k, module in zip(self.stages, self.stage_modules)]
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_kd": self.kd_weight * ofa_loss(logits, teacher_logits, targets, self.eps, self.temperature),
            "loss_ofa": self.ofa_weight * sum(ofa_loss(branch, teacher_logits, targets, self.eps, self.temperature)
                                              for branch in branches),
        }


STAGES_RULE = Rule("null (all the student's stages) or a non-empty list of distinct stage numbers >= 1, e.g. [1, 2]",
                   lambda value: value is None or (isinstance(value, list) and len(value) > 0
                                                   and all(POSITIVE_INT.check(k) for k in value)
                                                   and len(set(value)) == len(value)))
# Defaults from the authors' repository (github.com/Hao840/OFAKD): train.py's argparse defaults --gt-loss-weight 1,
# --kd-loss-weight 1, --ofa-loss-weight 1, --ofa-temperature 1 and --ofa-stage 1 2 3 4 (all stages: null here);
# eps 1.0 is README.md's CIFAR-100 command (`--ofa-eps 1.0`, also train.py's default; its ImageNet command uses
# 1.5). Their gt loss smooths the labels by 0.1 (configs/cifar/cnn.yaml `smoothing: 0.1`), part of their training
# recipe; here CE is plain, as for every method, so that the comparison stays fair.
OFA_SETTINGS = {"ce_weight": NON_NEGATIVE, "kd_weight": NON_NEGATIVE, "ofa_weight": NON_NEGATIVE, "eps": POSITIVE,
                "temperature": POSITIVE, "stages": STAGES_RULE}

register(Method(
    "OFA", OFA, OFA_SETTINGS,
    idea="Hao et al. (NeurIPS 2023): projectors map the student's intermediate stages (a CNN's feature maps or a "
         "ViT's tokens) to class logits, and each, like the student's own logits, learns the teacher's prediction "
         "with the target class adaptively enhanced; works across architectures.",
    # eps: from 1 (plain soft-target cross-entropy; the README's CIFAR-100 value) past the README's ImageNet 1.5
    # to 2, a linear range since its effect (p + 1)^eps grows smoothly; ofa_weight: the authors' 1 in the middle
    # of a decade each side, on a log scale like every loss weight
    search_space={"eps": Range(1.0, 2.0), "ofa_weight": Range(0.1, 10.0, log=True)}))

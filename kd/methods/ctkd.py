"""CTKD: Li et al., "Curriculum Temperature for Knowledge Distillation" (AAAI 2023).

The temperature is one learnable parameter trained adversarially: a gradient-reversal layer makes it climb the
distillation loss while the student descends it, with the reversal strength λ raised from 0 to `reversal_max`
over the first epochs by a cosine curriculum (easy to hard). Two entries share this (`CurriculumTemperature`):
CTKD over KD's loss, CTKD_DKD over DKD's, as the authors plug it into both. KD_LS/DKD_LS reuse KD's and DKD's
classes with a flag; that would put the learnable temperature into kd.py and dkd.py, so each variant writes its
short forward_train here, with the project's `kd_loss`/`dkd_loss` (they take the temperature as a tensor) and
its base's settings less `temperature`: at a fixed temperature each loss is exactly its base's.

Defaults, from github.com/zhengli97/CTKD:
- T = temperature_min + temperature_span · sigmoid(θ): helper/loops.py (train_distill), `--t_start 1 --t_end 20`
  (train_student.py's defaults); θ starts at 1 (models/temp_global.py, Global_T), so T starts at 15.62.
- λ(i) = λ_min + (λ_max - λ_min) · (1 - cos(π · min(i, N) / N)) / 2 at the 1-based epoch i: train_student.py's
  CosineDecay with `--decay_max 0 --decay_min -1 --decay_loops 10` (scripts/run_cifar_distill.sh): λ_min = 0,
  λ_max = 1, N = 10 of 240 epochs; models/temp_global.py multiplies θ's gradient by that value, negated.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.common import WARMUP_DECLARATION, LossWarmup, kd_loss
from kd.methods.dkd import DKD_SETTINGS, dkd_loss
from kd.methods.kd import KD_SETTINGS
from kd.methods.registry import METHODS, EpochShare, Method, register
from kd.rules import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Rule
from kd.space import Range

# the authors' 10 of 240 epochs (`--decay_loops 10`, `--epochs 240`), the same share of a run of any length
REVERSAL_SHARE = EpochShare(Fraction(10, 240), "unset: the authors' 10 of 240 epochs")
CURRICULUM_SETTINGS = {
    "temperature_min": POSITIVE, "temperature_span": POSITIVE, "reversal_max": NON_NEGATIVE,
    "reversal_epochs": Rule("null (the authors' share of the epochs) or an integer >= 1",
                            lambda value: value is None or POSITIVE_INT.check(value))}
CURRICULUM_RECORD = {"reversal_epochs": "Temperature curriculum epochs",
                     "final_temperature": "Learned temperature after the last epoch"}


def reversal_strength(epoch: int, reversal_epochs: int, reversal_max: float) -> float:
    """λ for the 0-based `epoch`: cosine from 0 to `reversal_max` over `reversal_epochs`, then constant.
    The authors evaluate it at the 1-based epoch, so the first epoch already reverses a little."""
    progress = min(epoch + 1, reversal_epochs) / reversal_epochs
    return reversal_max * (1.0 - math.cos(math.pi * progress)) / 2.0


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient times -strength backward (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.strength * grad, None


class CurriculumTemperature(Distiller):
    """The learnable global temperature and its reversal curriculum. θ is a parameter of the distiller, not of
    the student: the student's SGD trains it (weight decay included, as in the authors' optimizer) and
    `deployable_models` never saves it."""
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature_min: float, temperature_span: float,
                 reversal_max: float, reversal_epochs: int):
        super().__init__(student, teacher)
        self.temperature_min, self.temperature_span = temperature_min, temperature_span
        self.reversal_max, self.reversal_epochs = reversal_max, reversal_epochs
        self.raw_temperature = nn.Parameter(torch.tensor(1.0))
        self.reversal = reversal_strength(0, reversal_epochs, reversal_max)

    def temperature(self) -> torch.Tensor:
        """T for this step; the reversal sits on θ, so θ ascends the distillation loss while the student
        descends it (dT/dθ > 0: reversing θ's gradient reverses T's)."""
        raw = GradientReversal.apply(self.raw_temperature, self.reversal)
        return self.temperature_min + self.temperature_span * torch.sigmoid(raw)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        super().start_epoch(epoch, epochs)
        self.reversal = reversal_strength(epoch, self.reversal_epochs, self.reversal_max)

    def loss_weights(self) -> dict[str, float]:
        # the trainer asks at the epoch's start: the history and TensorBoard get the temperature each epoch
        # starts with (that of the previous epoch's end; the first entry is the initial T)
        with torch.no_grad():
            return {**super().loss_weights(), "temperature": self.temperature().item(), "reversal": self.reversal}

    def record_extras(self, history: list[dict], best_epoch: int) -> dict:
        return {**super().record_extras(history, best_epoch), "reversal_epochs": self.reversal_epochs,
                "final_temperature": self.loss_weights()["temperature"]}


class CTKD(CurriculumTemperature):
    def __init__(self, student: nn.Module, teacher: nn.Module, *, ce_weight: float, kd_weight: float,
                 standardize: bool, temperature_min: float, temperature_span: float, reversal_max: float,
                 reversal_epochs: int):
        super().__init__(student, teacher, temperature_min, temperature_span, reversal_max, reversal_epochs)
        self.ce_weight, self.kd_weight, self.standardize = ce_weight, kd_weight, standardize

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_kd": self.kd_weight * kd_loss(logits, teacher_logits, self.temperature(), self.standardize),
        }


class CTKD_DKD(LossWarmup, CurriculumTemperature):
    """DKD with the curriculum temperature, DKD's loss warm-up kept: against DKD only the temperature differs
    (the authors' DKD runs have no warm-up: `warmup_epochs=0`)."""
    warmup_name = "dkd"

    def __init__(self, student: nn.Module, teacher: nn.Module, *, ce_weight: float, tckd_weight: float,
                 nckd_weight: float, warmup_epochs: int, standardize: bool, temperature_min: float,
                 temperature_span: float, reversal_max: float, reversal_epochs: int):
        super().__init__(student, teacher, temperature_min, temperature_span, reversal_max, reversal_epochs)
        self.ce_weight, self.tckd_weight, self.nckd_weight = ce_weight, tckd_weight, nckd_weight
        self.warmup_epochs, self.standardize = warmup_epochs, standardize

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_dkd": self.warmup * dkd_loss(logits, teacher_logits, targets, self.tckd_weight, self.nckd_weight,
                                               self.temperature(), self.standardize),
        }


# each base's settings but its fixed temperature
KD_BASE_SETTINGS = {name: rule for name, rule in KD_SETTINGS.items() if name != "temperature"}
DKD_BASE_SETTINGS = {name: rule for name, rule in DKD_SETTINGS.items() if name != "temperature"}
register(Method("CTKD", CTKD, {**KD_BASE_SETTINGS, **CURRICULUM_SETTINGS},
                idea="Li et al. (AAAI 2023): KD with a learnable temperature trained adversarially through a "
                     "gradient-reversal layer, its strength raised by a cosine curriculum (easy to hard).",
                record_fields=CURRICULUM_RECORD, epoch_shares={"reversal_epochs": REVERSAL_SHARE},
                search_space={"kd_weight": Range(0.1, 10.0, log=True), "reversal_max": Range(0.1, 10.0, log=True)}))
register(Method("CTKD_DKD", CTKD_DKD, {**DKD_BASE_SETTINGS, **CURRICULUM_SETTINGS},
                idea="Li et al. (AAAI 2023): DKD with CTKD's learnable, adversarially trained temperature and its "
                     "curriculum.",
                record_fields={**WARMUP_DECLARATION["record_fields"], **CURRICULUM_RECORD},
                epoch_shares={**WARMUP_DECLARATION["epoch_shares"], "reversal_epochs": REVERSAL_SHARE},
                search_space={"nckd_weight": Range(1.0, 64.0, log=True), "reversal_max": Range(0.1, 10.0, log=True)},
                # DKD's per-pair weights: its resnet56 -> resnet20 value (nckd 2) is also the authors' CTKD+DKD run
                table_pairs=METHODS["DKD"].table_pairs))

"""BYOT: Zhang et al., "Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks
via Self Distillation" (ICCV 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.common import kd_loss
from kd.methods.registry import Method, register
from kd.rules import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL
from kd.space import Range
from models import ExitHead, classifier_name, find_stages


def byot_loss_terms(exit_logits: list[torch.Tensor], exit_feats: list[torch.Tensor], targets: torch.Tensor,
                    alpha: float = 0.1, temperature: float = 3.0, feat_weight: float = 1e-6
                    ) -> dict[str, torch.Tensor]:
    """The three weighted terms of `byot_loss`; the deepest exit (last) teaches the shallow ones."""
    *shallow_logits, deepest_logits = exit_logits
    *shallow_feats, deepest_feat = [f.float() for f in exit_feats]
    deepest_feat = deepest_feat.detach()
    loss_ce = sum(F.cross_entropy(z, targets) for z in exit_logits)
    loss_kd = sum(kd_loss(z, deepest_logits, temperature) for z in shallow_logits)
    loss_feat = sum((((f - deepest_feat) ** 2) * ((f > 0) | (deepest_feat > 0))).sum() for f in shallow_feats)
    return {"loss_ce": (1 - alpha) * loss_ce, "loss_kd": alpha * loss_kd, "loss_feat": feat_weight * loss_feat}


def byot_loss(exit_logits: list[torch.Tensor], exit_feats: list[torch.Tensor], targets: torch.Tensor,
              alpha: float = 0.1, temperature: float = 3.0, feat_weight: float = 1e-6) -> torch.Tensor:
    """BYOT's loss, exits ordered shallow -> deepest (C):

    (1-a)·Σ_all CE(z_i, y) + a·Σ_shallow T²·KL(σ_T(z_C)‖σ_T(z_i))
    + w·Σ_shallow Σ_elements (F_i-F_C)²·1{F_i>0 or F_C>0}
    """
    return sum(byot_loss_terms(exit_logits, exit_feats, targets, alpha, temperature, feat_weight).values())


class BYOT(Distiller):
    """The student with an auxiliary exit after every stage but the deepest (layer1-3 of a ResNet); each
    exit downsamples its stage to the deepest stage's stride and widens it to the student's pooled
    feature. The deepest exit is the student itself. The heads are dropped when saving."""
    teacher_column = "None (self)"
    needs_stages = ("student",)

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, alpha: float,
                 temperature: float, feat_weight: float):
        super().__init__(student, None)
        self.alpha, self.temperature, self.feat_weight = alpha, temperature, feat_weight
        *exits, deepest = find_stages(student)
        classifier = student.get_submodule(classifier_name(student))
        num_classes, width = classifier.out_features, classifier.in_features
        self.exit_layers = [stage.module for stage in exits]
        # ModuleDict keys cannot hold dots: "features.3" -> "features_3" ("layer1" stays "layer1")
        self.exit_keys = [name.replace(".", "_") for name in self.exit_layers]
        self.heads = nn.ModuleDict({key: ExitHead(s.channels, deepest.stride // s.stride, out_channels=width)
                                    for key, s in zip(self.exit_keys, exits)})
        self.classifiers = nn.ModuleDict({key: nn.Linear(width, num_classes) for key in self.exit_keys})
        self.features = self.tap(student, self.exit_layers)
        self.pooled = self.tap_pooled(student)  # F_C: what the classifier sees

    def _exits(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Logits and pooled features of every exit, shallow -> deepest (the student's own classifier)."""
        deepest_logits = self.student(images)
        feats = [self.heads[key](self.features[name]) for key, name in zip(self.exit_keys, self.exit_layers)]
        logits = [self.classifiers[key](f) for key, f in zip(self.exit_keys, feats)]
        return logits + [deepest_logits], feats + [self.pooled()]

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, feats = self._exits(images)
        return logits[-1], byot_loss_terms(logits, feats, targets, self.alpha, self.temperature,
                                           self.feat_weight)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, _ = self._exits(images)
        ensemble = torch.stack([z.float().softmax(dim=1) for z in logits]).mean(dim=0).log()
        exits = {f"exit{i + 1}": z for i, z in enumerate(logits[:-1])}
        return {"student": logits[-1], **exits, "ensemble": ensemble}

    def record_extras(self, history: list[dict], best_epoch: int) -> dict:
        val = history[best_epoch - 1]["val"]
        return {"exit_accuracies": [val[f"exit{i + 1}"] for i in range(len(self.exit_layers))] + [val["student"]],
                "ensemble_accuracy": val["ensemble"]}


register(Method(
    "BYOT", BYOT, {"alpha": UNIT_INTERVAL, "temperature": POSITIVE, "feat_weight": NON_NEGATIVE},
    idea="Zhang et al. (ICCV 2019): the network's deepest exit teaches three auxiliary exits (self-distillation); "
         "the accuracy is the deepest exit's.",
    record_fields={"exit_accuracies": "Exit accuracies (shallow → deepest)",
                   "ensemble_accuracy": "Ensemble accuracy"},
    search_space={"alpha": Range(0.0, 0.9), "temperature": Range(1.0, 8.0),
                  "feat_weight": Range(1e-8, 1e-4, log=True)}))

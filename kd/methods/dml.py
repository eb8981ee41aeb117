"""DML: Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning" (CVPR 2018)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.methods.base import Distiller
from kd.methods.common import kd_loss
from kd.methods.registry import Method, register
from kd.rules import NON_NEGATIVE, POSITIVE, int_at_least
from kd.space import Range
from models import fresh_copy


def dml_loss(logits: torch.Tensor, peer_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(z_peer/T).detach() || softmax(z/T)): the peer is a fixed target in this step."""
    return kd_loss(logits, peer_logits, temperature)


class DML(Distiller):
    """K peers trained together from one forward pass each; peer 0 is the common student init.

    Every peer's loss depends only on its own parameters (peer targets are detached), so one
    optimizer step over the summed loss is the simultaneous update of all peers.
    """
    teacher_column = "None (mutual)"

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, num_peers: int,
                 kl_weight: float, temperature: float):
        super().__init__(student, None)
        self.kl_weight, self.temperature = kl_weight, temperature
        # The extra peers draw fresh weights from the global RNG, which the experiment seeds per seed.
        self.other_peers = nn.ModuleList(fresh_copy(student) for _ in range(num_peers - 1))

    @property
    def peers(self) -> list[nn.Module]:
        return [self.student, *self.other_peers]

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = [peer(images) for peer in self.peers]
        loss_ce = sum(F.cross_entropy(z, targets) for z in logits)
        loss_kl = sum(
            self.kl_weight * torch.stack([dml_loss(z_k, z_j, self.temperature)
                                          for j, z_j in enumerate(logits) if j != k]).mean()
            for k, z_k in enumerate(logits))
        return logits[0], {"loss_ce": loss_ce, "loss_kl": loss_kl}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = {f"peer{k}": peer(images) for k, peer in enumerate(self.peers)}
        return {"student": outputs["peer0"], **outputs}

    def selection_score(self, accuracies: dict[str, float]) -> float:
        # The method's accuracy is the mean over peers: taking the best peer would reward luck.
        return sum(accuracies[f"peer{k}"] for k in range(len(self.peers))) / len(self.peers)

    def record_extras(self, history: list[dict], best_epoch: int) -> dict:
        return {"peer_accuracies": [max(epoch["val"][f"peer{k}"] for epoch in history)
                                    for k in range(len(self.peers))]}

    def deployable_models(self) -> dict[str, nn.Module]:
        return {f"_peer{k}": peer for k, peer in enumerate(self.peers)}


register(Method(
    "DML", DML, {"num_peers": int_at_least(2), "kl_weight": NON_NEGATIVE, "temperature": POSITIVE},
    idea="Zhang et al. (CVPR 2018): two students learn from the labels and from each other, no teacher; the "
         "accuracy is the mean over peers.",
    record_fields={"peer_accuracies": "Peer accuracies (best per peer)"},
    cost=lambda settings: settings["num_peers"],  # every peer trains a step per batch
    search_space={"kl_weight": Range(0.1, 10.0, log=True), "temperature": Range(1.0, 8.0)}))

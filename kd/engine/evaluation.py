"""Evaluation of a Distiller on a whole split: top-1 accuracy of every named output, over all processes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kd.data.batches import ImageData
from kd.engine import distributed
from kd.engine.runtime import Runtime
from kd.methods.base import Distiller


@dataclass
class Evaluation:
    """Top-1 accuracy of every named output of `predict`, and the "student" output's probabilities."""
    accuracies: dict[str, float]
    probs: torch.Tensor   # (N, K) softmax of the "student" output, on the CPU
    labels: torch.Tensor  # (N,)


@torch.no_grad()
def evaluate(distiller: Distiller, data: ImageData, split: str, batch_size: int, runtime: Runtime) -> Evaluation:
    """Evaluate every named output of `predict` on a whole split (each process its share of it).

    Evaluation runs in float32 whatever the training precision: the recorded accuracy, NLL, ECE and
    agreement are those of the saved checkpoint loaded in float32.
    """
    distiller.eval()
    correct: dict[str, torch.Tensor] = {}
    probs, labels_seen = [], []
    for images, labels in data.eval_batches(split, batch_size, runtime.device, runtime.channels_last):
        outputs = distiller.predict(images)
        for name, logits in outputs.items():
            correct[name] = correct.get(name, 0) + (logits.float().argmax(dim=1) == labels).sum()
        probs.append(outputs["student"].float().softmax(dim=1))
        labels_seen.append(labels)
    classes = len(data.class_names)
    share = {"indices": data.eval_indices(split), "correct": {name: int(count) for name, count in correct.items()},
             "probs": torch.cat(probs).cpu() if probs else torch.empty(0, classes),
             "labels": torch.cat(labels_seen).cpu() if labels_seen else torch.empty(0, dtype=torch.long)}
    # One collective, whatever each process holds: a process whose share is empty (a split with fewer
    # images than processes) still answers, and learns the output names from the others.
    shares = distributed.gather_objects(share)
    total = len(data.splits[split])
    names = dict.fromkeys(name for part in shares for name in part["correct"])
    accuracies = {name: sum(part["correct"].get(name, 0) for part in shares) / total for name in names}
    order = torch.cat([part["indices"] for part in shares]).argsort()  # back to the split's order
    return Evaluation(accuracies, torch.cat([part["probs"] for part in shares])[order],
                      torch.cat([part["labels"] for part in shares])[order])

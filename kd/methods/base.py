"""The one `Distiller` interface the trainer knows; each method is a subclass in its own file."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from models import FeatureTap, classifier_name


class Distiller(nn.Module):
    """A student (plus whatever a method trains with it) and, optionally, a frozen teacher.

    The teacher is kept in eval mode with gradients off for the whole run: its BatchNorm statistics
    never move and no gradient reaches it, whatever the trainer does with `train()`/`eval()`.
    Subclasses take their loss settings as keyword-only constructor arguments; those names are the
    keys of the method's entry in METHODS_CONFIG. Each writes its `forward_train` out in full (student
    forward, teacher forward, its weighted terms), as mdistiller's distillers do: the few lines that
    several share are the price of reading each method's loss in one place.
    """

    needs_teacher = False  # teacher-based methods get the trained teacher; their column names its arch
    needs_stages: tuple[str, ...] = ()  # "student"/"teacher": models whose feature maps the method reads
    teacher_column = "None"  # the `teacher` column of methods without an external teacher
    needs_index = False  # the trainer passes each batch's positions in the train split as `indices` (CRD)
    # the trainer passes a strongly augmented second view of each batch as `strong_images` (MLKD;
    # kd/data/strong_view.py), drawn apart from the first view, which stays what every other method sees
    needs_strong_view = False
    skips_parameters = False  # some epochs leave parameters untrained (FitNets' hint stage): DDP looks for them

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self._taps: list[FeatureTap] = []
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def tap(self, model: nn.Module, names: list[str] | tuple[str, ...], inputs: bool = False) -> FeatureTap:
        """Forward hooks on `model` (often the shared teacher) that keep the named modules' outputs (or,
        with `inputs`, their inputs), removed again by `close()`."""
        self._taps.append(FeatureTap(model, names, inputs))
        return self._taps[-1]

    def tap_pooled(self, model: nn.Module) -> Callable[[], torch.Tensor]:
        """The pooled feature of `model` after each forward: its classifier's input, flattened (what `fc`
        sees in a ResNet; the pre-logits of any model)."""
        name = classifier_name(model)
        feature_tap = self.tap(model, [name], inputs=True)
        return lambda: feature_tap[name].flatten(1)

    def close(self) -> None:
        """Remove this method's hooks, so the teacher is clean for the next method."""
        for feature_tap in self._taps:
            feature_tap.remove()
        self._taps.clear()
        if self.teacher is not None:  # nor does the cached forward outlive the method
            self.teacher.__dict__.pop("cached_forward", None)

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student logits and the weighted loss terms (keys `loss_*`); the trainer sums the terms."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, targets: torch.Tensor, **batch: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The trainer calls the module (so that DDP can wrap it); the work is in forward_train.
        return self.forward_train(images, targets, **batch)

    def teacher_forward(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits for `images`, computed once per batch.

        The teacher is shared by every teacher-based method, and methods trained together see the very
        same batch tensor: the first call runs the teacher (filling every method's hooks on it), later
        calls with the same tensor reuse that forward, which gives exactly the same values.
        """
        cached_images, cached_logits = getattr(self.teacher, "cached_forward", (None, None))
        if cached_images is not images:
            with torch.no_grad():
                cached_logits = self.teacher(images)
            self.teacher.cached_forward = (images, cached_logits)
        return cached_logits

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named logits for evaluation; "student" is the deployable model's output."""
        return {"student": self.student(images)}

    def selection_score(self, accuracies: dict[str, float]) -> float:
        """The val accuracy the best epoch is chosen on and reported as `best_accuracy`."""
        return accuracies["student"]

    def record_extras(self, history: list[dict], best_epoch: int) -> dict:
        """Method-specific fields for the results record (e.g. DML's per-peer accuracies): exactly the keys its
        Method declares in `record_fields`."""
        return {}

    @staticmethod
    def plan_notes(student: nn.Module, teacher: nn.Module) -> list[str]:
        """Lines for the plan on how the method applies to these models (e.g. a fallback it takes)."""
        return []

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called before each training epoch (0-based); FitNets' two-stage mode switches stage here, DKD and
        ReviewKD set their warm-up weight."""

    def loss_weights(self) -> dict[str, float]:
        """This epoch's loss weights that change over training (warm-ups), for TensorBoard and the history."""
        return {}

    def attach_data(self, train_labels: torch.Tensor, seed: int) -> None:
        """Called once before training with the train split's labels and the run's seed, for methods that
        draw from the whole training set (CRD's negatives and memory)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def deployable_models(self) -> dict[str, nn.Module]:
        """Plain torchvision models to save, by checkpoint-name suffix (DML saves one per peer)."""
        return {"": self.student}

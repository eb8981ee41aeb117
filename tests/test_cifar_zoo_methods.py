"""Every method on the CIFAR-100 tables' teacher/student pairs of the zoo (models/cifar): one training step with
a finite loss that reaches the student, and a student that stays the zoo's plain model (its state_dict loads
strictly into a fresh one). Also a regression test for models/stages.py: a stage map made by a functional op."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import final
from kd.methods import METHODS
from models import build_model, find_stages, model_spec
from models.cifar import CIFAR_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")  # batches of 4 images of 32 px

# the tables' pairs: homogeneous, then heterogeneous (CRD, ReviewKD, DKD)
PAIRS = [("resnet56", "resnet20"), ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8"),
         ("vgg13", "MobileNetV2"), ("resnet32x4", "ShuffleV1"), ("wrn_40_2", "ShuffleV2")]
CASES = [pytest.param(t, s, m, id=f"{t}->{s}-{m}") for t, s in PAIRS for m in METHODS]
NUM_CLASSES, BATCH, SIZE = 10, 4, 32
TRAIN_LABELS = torch.arange(40) % NUM_CLASSES  # the training set CRD's memory and negatives come from
INDICES = torch.tensor([0, 1, 12, 23])  # the batch's positions in it (labels 0, 1, 2, 3)
CRD_NCE_K = 16  # of the 36 images of other classes
# the classifier of each student, as RepDistiller names it
CLASSIFIER = {"resnet20": "fc", "resnet8x4": "fc", "wrn_16_2": "fc", "vgg8": "classifier",
              "MobileNetV2": "classifier.0", "ShuffleV1": "linear", "ShuffleV2": "linear"}


def _build(name: str) -> nn.Module:
    """The zoo model as a run builds it (build_model: the plain model, with the spec DML's peers are made from);
    `cifar/` because bare vgg13 and vgg8 would be torchvision's."""
    spec = model_spec({"model": f"cifar/{name}", "weights": None}, SIZE, "auto")
    assert (spec.source, spec.builder) == ("cifar", name)
    return build_model(spec, NUM_CLASSES)


@pytest.fixture(scope="module")
def teachers():
    """One randomly initialised 10-class teacher per name, built once for the module (resnet32x4 and vgg13
    have 7-9M parameters); each method's hooks on it are removed by Distiller.close()."""
    built: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in built:
            rng = torch.get_rng_state()
            torch.manual_seed(100)
            built[name] = _build(name)
            torch.set_rng_state(rng)
        return built[name]
    return get


def test_the_pairs_are_zoo_models_and_every_method_is_covered():
    assert all(t in CIFAR_MODELS and s in CIFAR_MODELS for t, s in PAIRS)
    assert len(CASES) == 7 * 21 == len(PAIRS) * len(METHODS)
    assert set(CLASSIFIER) == {s for _, s in PAIRS}


@pytest.mark.parametrize("teacher_name, student_name, method", CASES)
def test_one_step_on_a_zoo_pair(teachers, method_inputs, teacher_name, student_name, method):
    teacher = teachers(teacher_name)
    torch.manual_seed(1)
    student = _build(student_name)
    keys = list(student.state_dict())
    distiller_cls = METHODS[method].distiller
    settings = METHODS[method].resolve(final.METHODS_CONFIG[method], 1)  # as a run of 1 epoch resolves them
    if method == "CRD":
        settings["nce_k"] = CRD_NCE_K
    torch.manual_seed(2)
    distiller = distiller_cls(student, teacher if distiller_cls.needs_teacher else None, **settings)
    distiller.attach_data(TRAIN_LABELS, 0)
    g = torch.Generator().manual_seed(0)
    images, targets = torch.randn(BATCH, 3, SIZE, SIZE, generator=g), TRAIN_LABELS[INDICES]
    batch = method_inputs(distiller, images, INDICES)
    try:
        distiller.train()
        logits, losses = distiller.forward_train(images, targets, **batch)
        assert tuple(logits.shape) == (BATCH, NUM_CLASSES)
        assert losses and all(key.startswith("loss_") and value.dim() == 0 for key, value in losses.items())
        loss = sum(losses.values())
        assert torch.isfinite(loss), losses
        loss.backward()
    finally:
        distiller.close()
    # every method has a cross-entropy term on the student's logits: every student parameter gets a gradient
    missing = [name for name, p in student.named_parameters() if p.grad is None]
    assert missing == [], missing
    classifier = student.get_submodule(CLASSIFIER[student_name])
    assert isinstance(classifier, nn.Linear) and classifier.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())
    if distiller_cls.needs_teacher:  # frozen: no gradient reached it
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # the method added nothing to the student (no regressor, head or memory bank inside it)
    assert list(student.state_dict()) == keys
    deployable = distiller.deployable_models()
    assert sorted(deployable) == (["_peer0", "_peer1"] if method == "DML" else [""])
    assert deployable["_peer0" if method == "DML" else ""] is student
    for model in deployable.values():  # DML: each peer
        fresh = CIFAR_MODELS[student_name](num_classes=NUM_CLASSES)
        fresh.load_state_dict(model.state_dict(), strict=True)
        assert type(model) is type(fresh)


# --- models/stages.py: a stage map made by a functional op -------------------------------------------------------

class FunctionalStem(nn.Module):
    """Stage 1's map (stride 1) is F.relu's output, which no module returns; a stride-2 conv starts stage 2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.down(x)
        return self.fc(x.mean(dim=(2, 3)))


def test_a_stage_map_made_by_a_functional_op_is_named_after_the_module_before_it():
    # The rule (models/stages.py): stage 1 is the input of the first module that takes a stride-1 map to stride 2
    # (`down`, fed F.relu's output); no module returned that tensor, so the stage is named after the last module
    # whose output had its shape before `down` ran: conv1. The deepest stage is the last map: down's output.
    stages = find_stages(FunctionalStem())
    assert [(s.module, s.channels, s.stride) for s in stages] == [("conv1", 8, 1), ("down", 16, 2)]

"""The CIFAR model zoo (models/cifar): sizes, the state_dict layout of CRD's released checkpoints, logits.

The layouts below are written out by hand from CRD's models (github.com/HobbitLong/RepDistiller, models/),
not read from this project's code: a checkpoint of theirs loads only if every key and shape is the same.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from models import ModelError, resolve_name
from models.cifar import CIFAR_MODELS

# Batches of one or two small images: one intra-op thread is faster than two (conftest).
pytestmark = pytest.mark.usefixtures("one_thread")

# name: (exact parameter count at 100 classes, state_dict entries). Both were measured on these models and found
# equal to those of RepDistiller's model of the same name, built with num_classes=100.
LAYOUT = {
    "resnet8": (83_892, 56),
    "resnet14": (181_108, 92),
    "resnet20": (278_324, 128),
    "resnet32": (472_756, 200),
    "resnet44": (667_188, 272),
    "resnet56": (861_620, 344),
    "resnet110": (1_736_564, 668),
    "resnet8x4": (1_233_540, 62),
    "resnet32x4": (7_433_860, 206),
    "wrn_16_1": (180_916, 82),
    "wrn_16_2": (703_284, 83),
    "wrn_40_1": (569_780, 226),
    "wrn_40_2": (2_255_156, 227),
    "vgg8": (3_965_028, 37),
    "vgg11": (9_277_284, 58),
    "vgg13": (9_462_180, 72),
    "vgg16": (14_774_436, 93),
    "vgg19": (20_086_692, 114),
    "MobileNetV2": (812_836, 320),
    "ShuffleV1": (949_258, 296),
    "ShuffleV2": (1_355_528, 338),
}

# Published sizes at 100 classes, in millions; the exact count rounded to 0.01M must give them.
PUBLISHED_CIFAR100 = {
    # Heo et al. 2019, "A Comprehensive Overhaul of Feature Distillation": CIFAR-100 settings (c) and (d), as
    # listed in the table of its official code release (clovaai/overhaul-distillation, README).
    "wrn_16_2": 0.70,
    "resnet56": 0.86,
    # The sizes commonly quoted for CRD's x4 ResNets; we did not locate the paper table they come from.
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
}
# No published 100-class size found for the others (the MobileNetV2 and ShuffleNet papers give ImageNet sizes
# only; CRD, ReviewKD and DKD list no sizes): for them only the exact count above is checked.

# Published CIFAR-10 sizes (10 classes), in millions, rounded as the papers print them.
# He et al. 2016, Table 6: zero-padding identity shortcuts (option A), so the 1x1 projections are left out.
HE_2016_TABLE6 = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85, "resnet110": 1.7}
# Zagoruyko & Komodakis 2016, CIFAR results of WRN-40-k: WRN-40-2 has 2.2M parameters.
WRN_2016 = {"wrn_40_2": 2.2}

# A few keys per model with their shapes: the first conv, a shortcut / downsample (or another key that pins the
# layout where there is none), and the classifier weight.
SPOT_KEYS: dict[str, dict[str, tuple[int, ...]]] = {
    **{name: {"conv1.weight": (16, 3, 3, 3), "layer2.0.downsample.0.weight": (32, 16, 1, 1),
              "layer3.0.downsample.1.running_mean": (64,), "fc.weight": (100, 64)}
       for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")},
    **{name: {"conv1.weight": (32, 3, 3, 3), "layer1.0.downsample.0.weight": (64, 32, 1, 1),
              "layer3.0.downsample.0.weight": (256, 128, 1, 1), "fc.weight": (100, 256)}
       for name in ("resnet8x4", "resnet32x4")},
    **{name: {"conv1.weight": (16, 3, 3, 3), "block2.layer.0.convShortcut.weight": (32, 16, 1, 1),
              "block3.layer.0.bn1.weight": (32,), "bn1.running_var": (64,), "fc.weight": (100, 64)}
       for name in ("wrn_16_1", "wrn_40_1")},
    **{name: {"conv1.weight": (16, 3, 3, 3), "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
              "block3.layer.0.convShortcut.weight": (128, 64, 1, 1), "bn1.running_var": (128,),
              "fc.weight": (100, 128)}
       for name in ("wrn_16_2", "wrn_40_2")},
    "vgg8": {"block0.0.weight": (64, 3, 3, 3), "block0.0.bias": (64,), "block4.1.running_mean": (512,),
             "classifier.weight": (100, 512)},
    "vgg11": {"block0.0.weight": (64, 3, 3, 3), "block2.3.weight": (256, 256, 3, 3), "block4.4.bias": (512,),
              "classifier.weight": (100, 512)},
    "vgg13": {"block0.0.weight": (64, 3, 3, 3), "block1.3.weight": (128, 128, 3, 3), "block4.4.bias": (512,),
              "classifier.weight": (100, 512)},
    "vgg16": {"block0.0.weight": (64, 3, 3, 3), "block2.6.weight": (256, 256, 3, 3), "block4.7.bias": (512,),
              "classifier.weight": (100, 512)},
    "vgg19": {"block0.0.weight": (64, 3, 3, 3), "block2.9.weight": (256, 256, 3, 3), "block4.10.bias": (512,),
              "classifier.weight": (100, 512)},
    "MobileNetV2": {"conv1.0.weight": (16, 3, 3, 3), "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
                    "blocks.2.0.conv.3.weight": (72, 1, 3, 3), "blocks.6.0.conv.6.weight": (160, 480, 1, 1),
                    "conv2.0.weight": (1280, 160, 1, 1), "classifier.0.weight": (100, 1280)},
    "ShuffleV1": {"conv1.weight": (24, 3, 1, 1), "layer1.0.conv1.weight": (54, 24, 1, 1),
                  "layer2.0.conv1.weight": (60, 80, 1, 1), "layer3.3.conv3.weight": (960, 80, 1, 1),
                  "linear.weight": (100, 960)},
    "ShuffleV2": {"conv1.weight": (24, 3, 1, 1), "layer1.0.conv1.weight": (24, 1, 3, 3),
                  "layer1.1.conv1.weight": (58, 58, 1, 1), "layer3.0.conv5.weight": (232, 232, 1, 1),
                  "conv2.weight": (1024, 464, 1, 1), "linear.weight": (100, 1024)},
}
CLASSIFIER = {**{n: "fc" for n in LAYOUT if n.startswith(("resnet", "wrn"))},
              **{n: "classifier" for n in LAYOUT if n.startswith("vgg")},
              "MobileNetV2": "classifier.0", "ShuffleV1": "linear", "ShuffleV2": "linear"}


@functools.cache
def _model(name: str) -> nn.Module:
    """One 100-class model per name for the whole module (vgg19 alone has 20M parameters)."""
    torch.manual_seed(0)
    return CIFAR_MODELS[name](num_classes=100).eval()


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_zoo_names_are_crds():
    assert list(CIFAR_MODELS) == list(LAYOUT)


@pytest.mark.parametrize("name", list(LAYOUT))
def test_parameter_count(name):
    assert _count(_model(name)) == LAYOUT[name][0]


@pytest.mark.parametrize("name", list(PUBLISHED_CIFAR100))
def test_published_cifar100_size(name):
    assert round(LAYOUT[name][0] / 1e6, 2) == PUBLISHED_CIFAR100[name]


@pytest.mark.parametrize("name", list(HE_2016_TABLE6) + list(WRN_2016))
def test_published_cifar10_size(name):
    model = CIFAR_MODELS[name](num_classes=10)
    projections = sum(_count(m) for n, m in model.named_modules() if n.endswith(".downsample"))
    published = {**HE_2016_TABLE6, **WRN_2016}[name]
    digits = len(str(published).split(".")[1])
    # He et al.'s Table 6 counts option A shortcuts, which have no parameters; CRD's ResNets project instead.
    count = _count(model) - (projections if name in HE_2016_TABLE6 else 0)
    assert round(count / 1e6, digits) == published


@pytest.mark.parametrize("name", list(LAYOUT))
def test_state_dict_layout(name):
    state = _model(name).state_dict()
    assert len(state) == LAYOUT[name][1]
    assert {key: tuple(state[key].shape) for key in SPOT_KEYS[name]} == SPOT_KEYS[name]
    assert next(iter(state)) == next(iter(SPOT_KEYS[name]))  # the first conv comes first, as in CRD's files
    if name in ("wrn_16_1", "wrn_40_1"):  # 16 -> 16 channels: an identity shortcut, no weights
        assert "block1.layer.0.convShortcut.weight" not in state


@pytest.mark.parametrize("name", list(LAYOUT))
def test_classifier_is_the_last_linear(name):
    linears = [n for n, m in _model(name).named_modules() if isinstance(m, nn.Linear)]
    assert linears == [CLASSIFIER[name]]


@pytest.mark.parametrize("name", list(LAYOUT))
def test_logits(name):
    torch.manual_seed(0)
    with torch.no_grad():
        logits = _model(name)(torch.randn(2, 3, 32, 32))
        # Pooling is global, so larger inputs work too.
        assert _model(name)(torch.randn(1, 3, 64, 64)).shape == (1, 100)
    assert logits.shape == (2, 100) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(LAYOUT))
def test_ten_classes(name):
    torch.manual_seed(0)
    model = CIFAR_MODELS[name](num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", list(LAYOUT))
def test_module_outputs_are_not_modified_in_place(name):
    """Feature losses keep module outputs from forward hooks: no later op may write into them."""
    model, kept = _model(name), []
    handles = [m.register_forward_hook(lambda _m, _args, out: kept.append((out, out._version)))
               for n, m in model.named_modules() if n]
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    finally:
        for handle in handles:
            handle.remove()
    assert kept and all(out._version == version for out, version in kept)


# --- the zoo's names beside torchvision's and timm's ------------------------------------------------------------------------------------------

def test_unknown_zoo_names_list_the_closest():
    with pytest.raises(ModelError, match="resnet8x5") as err:
        resolve_name("resnet8x5")
    assert "resnet8x4" in str(err.value)
    with pytest.raises(ModelError, match="cifar/vgg14") as err:
        resolve_name("cifar/vgg14")
    assert "vgg13" in str(err.value)


@pytest.mark.parametrize("name, expected", [
    ("VGG13", ("torchvision", "vgg13")),
    ("vgg13", ("torchvision", "vgg13")),
    ("cifar/vgg13", ("cifar", "vgg13")),
    ("CIFAR/VGG13", ("cifar", "vgg13")),
    ("mobilenetv2", ("cifar", "MobileNetV2")),
    ("shufflev1", ("cifar", "ShuffleV1")),
    ("resnet8x4", ("cifar", "resnet8x4")),
    ("WRN_40_2", ("cifar", "wrn_40_2")),
    ("cifar/resnet56", ("cifar", "resnet56")),
    ("resnet18", ("torchvision", "resnet18")),
])
def test_zoo_names_resolve(name, expected):
    assert resolve_name(name) == expected

"""Feature stages found on unmodified torchvision/timm models, image-size checks, stage pairing, names.

The expected stages are written out here by hand (module, channels, stride), and every one is also checked
with this file's own forward hooks, so a test passes only if the stage finder, the hand-written values and
the model's real forward pass all agree. Everything runs at 64 px or less with 3 classes to stay fast on CPU.
"""
from __future__ import annotations

import re

import pytest
import timm
import timm.models.convnext
import timm.models.efficientnet
import timm.models.resnet
import timm.models.vision_transformer
import torch
import torchvision

import models
import models.stages
from models import ModelError, ModelSpec, Stage

NUM_CLASSES = 3

# name, stem, library class, [(module, channels, stride), ...] -- as measured for this library version.
CNN_CASES = [
    ("resnet18", "cifar", torchvision.models.ResNet,
     [("layer1", 64, 1), ("layer2", 128, 2), ("layer3", 256, 4), ("layer4", 512, 8)]),
    ("resnet50", "imagenet", torchvision.models.ResNet,
     [("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16), ("layer4", 2048, 32)]),
    ("mobilenet_v2", "auto", torchvision.models.MobileNetV2,
     [("features.3", 24, 4), ("features.6", 32, 8), ("features.13", 96, 16), ("features.18", 1280, 32)]),
    ("mobilenet_v3_small", "auto", torchvision.models.MobileNetV3,
     [("features.1", 16, 4), ("features.3", 24, 8), ("features.8", 48, 16), ("features.12", 576, 32)]),
    ("efficientnet_b0", "auto", torchvision.models.EfficientNet,
     [("features.2", 24, 4), ("features.3", 40, 8), ("features.5", 112, 16), ("features.8", 1280, 32)]),
    ("regnet_x_400mf", "auto", torchvision.models.RegNet,
     [("trunk_output.block1", 32, 4), ("trunk_output.block2", 64, 8), ("trunk_output.block3", 160, 16),
      ("trunk_output.block4", 400, 32)]),
    ("convnext_tiny", "auto", torchvision.models.ConvNeXt,
     [("features.1", 96, 4), ("features.3", 192, 8), ("features.5", 384, 16), ("features.7", 768, 32)]),
    ("shufflenet_v2_x0_5", "auto", torchvision.models.ShuffleNetV2,
     [("maxpool", 24, 4), ("stage2", 48, 8), ("stage3", 96, 16), ("conv5", 1024, 32)]),
    ("densenet121", "auto", torchvision.models.DenseNet,
     [("features.denseblock1", 256, 4), ("features.denseblock2", 512, 8), ("features.denseblock3", 1024, 16),
      ("features.norm5", 1024, 32)]),
    ("mnasnet0_5", "auto", torchvision.models.MNASNet,
     [("layers.8", 16, 4), ("layers.9", 24, 8), ("layers.11", 48, 16), ("layers.16", 1280, 32)]),
    ("timm/resnet10t", "auto", timm.models.resnet.ResNet,
     [("layer1", 64, 4), ("layer2", 128, 8), ("layer3", 256, 16), ("layer4", 512, 32)]),
    ("timm/test_efficientnet", "auto", timm.models.efficientnet.EfficientNet,
     [("blocks.1", 24, 4), ("blocks.2", 32, 8), ("blocks.3", 48, 16), ("blocks.4", 64, 32)]),
    ("timm/test_convnext", "auto", timm.models.convnext.ConvNeXt,
     [("stages.0", 24, 4), ("stages.1", 32, 8), ("stages.2", 48, 16), ("stages.3", 64, 32)]),
]


def build(name, image_size=64, stem="auto"):
    """A model built through the project's own path (config dict -> ModelSpec -> build_model), from scratch."""
    spec = models.model_spec({"model": name, "weights": None, "zero_init_residual": False}, image_size, stem=stem)
    return spec, models.build_model(spec, NUM_CLASSES)


def plain_library_model(spec):
    """The same architecture made straight from the library, as a user loading a checkpoint would make it."""
    if spec.source == "timm":
        return timm.create_model(spec.builder, pretrained=False, num_classes=NUM_CLASSES)
    model = getattr(torchvision.models, spec.builder)(weights=None, num_classes=NUM_CLASSES)
    if spec.resnet_family:
        models.apply_stem(model, spec.stem)  # the one documented change: the CIFAR stem
    return model


def is_map(tensor):
    return isinstance(tensor, torch.Tensor) and tensor.dim() == 4 and tensor.shape[-1] == tensor.shape[-2]


@torch.no_grad()
def record_forward(model, size, names=None):
    """This test's own hooks: (name, first input, output) for each module call, in the order calls finish."""
    events = []
    handles = []
    for name, module in model.named_modules():
        if name and (names is None or name in names):
            def hook(_module, args, output, name=name):
                events.append((name, args[0] if args and isinstance(args[0], torch.Tensor) else None, output))
            handles.append(module.register_forward_hook(hook))
    try:
        model.eval()
        logits = model(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
    finally:
        for handle in handles:
            handle.remove()
    return events, logits


def has_hooks(model):
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.fixture
def fresh_stage_cache(monkeypatch):
    """find_stages remembers stages per ModelSpec; start empty so the probe really runs in this test."""
    monkeypatch.setattr(models.stages, "_found_by_spec", {})


# --- 1. the stages of each CNN family -------------------------------------------------------------------

@pytest.mark.parametrize("name,stem,library_class,expected", CNN_CASES, ids=[c[0] for c in CNN_CASES])
def test_cnn_stages(name, stem, library_class, expected, fresh_stage_cache):
    spec, model = build(name, stem=stem)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    stages = models.find_stages(model)
    assert [(s.module, s.channels, s.stride) for s in stages] == expected

    # the probe leaves the model as it was: training mode, no hooks behind, weights and BN statistics untouched
    assert model.training and not has_hooks(model)
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())

    # Independent check with our own hooks at 64 px: each named module returns a map of the stated channels
    # and side 64/stride; every stage but the deepest is the map the next downsampling module starts from.
    events, _ = record_forward(model, 64)
    outputs = {n: out for n, _, out in events}
    for module, channels, stride in expected:
        assert tuple(outputs[module].shape) == (1, channels, 64 // stride, 64 // stride), module
    for module, _, stride in expected[:-1]:
        assert any(inp is outputs[module] and is_map(out) and out.shape[-1] == 64 // stride // 2
                   for _, inp, out in events), f"{module} does not feed a downsampling step"
    if spec.source == "torchvision":
        # torchvision's deepest stage is the last map (side > 1) before pooling; timm declares its own
        # (e.g. its EfficientNet's blocks.4, before conv_head)
        last_map = [out for _, _, out in events if is_map(out) and out.shape[-1] > 1][-1]
        assert last_map is outputs[expected[-1][0]]

    # still the plain library model: its class, and a state_dict that loads strictly into one built directly
    assert type(model) is library_class
    plain = plain_library_model(spec)
    assert type(plain) is library_class
    plain.load_state_dict(model.state_dict(), strict=True)


def test_stage_is_a_frozen_record():
    stage = Stage("layer1", 64, 4)
    assert (stage.module, stage.channels, stage.stride) == ("layer1", 64, 4)
    with pytest.raises(AttributeError):
        stage.stride = 8


# --- 2. transformers have no stages ---------------------------------------------------------------------

def test_torchvision_vit_has_no_stages():
    # torchvision's ViT takes exactly its image_size: 32 keeps it small (4 patches)
    spec = ModelSpec("vit_b_16", "torchvision", "vit_b_16", None, "library", False, 32)
    model = models.build_model(spec, NUM_CLASSES)
    assert type(model) is torchvision.models.VisionTransformer
    assert models.find_stages(model) == []
    assert models.check_image_size(model, "vit_b_16", 32) == []  # it runs at its own size: nothing to check


def test_timm_vit_has_no_stages(fresh_stage_cache):
    spec, model = build("timm/test_vit", image_size=32)
    assert spec.source == "timm" and type(model) is timm.models.vision_transformer.VisionTransformer
    assert models.find_stages(model) == []


# --- 3. image size checks -------------------------------------------------------------------------------

def test_check_image_size_resnet_cifar():
    spec, model = build("resnet18", image_size=12)
    assert spec.stem == "cifar"  # "auto" picks the CIFAR stem for a small image
    assert models.check_image_size(model, "resnet18", 12) == [12, 6, 3, 2]  # odd sides round up
    assert models.check_image_size(model, "resnet18", 32) == [32, 16, 8, 4]


def test_check_image_size_mobilenet():
    _, model = build("mobilenet_v3_small", image_size=32)
    with pytest.raises(ModelError, match="use image_size >= 32") as err:
        models.check_image_size(model, "mobilenet_v3_small", 16)
    assert "image_size 16 is too small for mobilenet_v3_small" in str(err.value)
    assert "features.12" in str(err.value)  # names the stage that would vanish
    assert models.check_image_size(model, "mobilenet_v3_small", 32) == [8, 4, 2, 1]


def test_check_image_size_convnext_names_a_size_that_works():
    _, model = build("convnext_tiny", image_size=32)
    with pytest.raises(ModelError, match="too small for convnext_tiny") as err:
        models.check_image_size(model, "convnext_tiny", 16)
    found = re.search(r"use image_size >= (\d+)", str(err.value))
    assert found, str(err.value)
    smallest = int(found.group(1))
    assert smallest >= 32  # the deepest stride
    # the size it names does work, and the step below it (the search goes in steps of 8) does not
    assert models.check_image_size(model, "convnext_tiny", smallest) == [smallest // s for s in (4, 8, 16, 32)]
    with pytest.raises(ModelError):
        models.check_image_size(model, "convnext_tiny", smallest - 8)


# --- 4. stage pairing -----------------------------------------------------------------------------------

def stages_at(*strides, channels=8):
    return [Stage(f"s{i}", channels, stride) for i, stride in enumerate(strides)]


def test_pair_stages_equal_counts_by_position():
    assert models.pair_stages(stages_at(4, 8, 16, 32), stages_at(4, 8, 16, 32)) == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_pair_stages_by_relative_stride():
    # fewer teacher stages: each teacher stage meets the student stage at its stride relative to the deepest
    assert models.pair_stages(stages_at(4, 8, 16, 32), stages_at(16, 32)) == [(2, 0), (3, 1)]
    # fewer student stages: the same rule the other way round
    assert models.pair_stages(stages_at(8, 32), stages_at(4, 8, 16, 32)) == [(0, 1), (1, 3)]
    # relative, not absolute: a CIFAR ResNet's strides 2, 4, 8 meet 8, 16, 32
    assert models.pair_stages(stages_at(2, 4, 8), stages_at(4, 8, 16, 32)) == [(0, 1), (1, 2), (2, 3)]
    assert models.matching_stage(stages_at(2, 4, 8), 2, stages_at(4, 8, 16, 32)) == 3
    # a model without stages pairs with nothing
    assert models.pair_stages([], stages_at(4, 8, 16, 32)) == []
    assert models.pair_stages(stages_at(4, 8, 16, 32), []) == []


def test_pair_stages_cifar_resnet_with_mobilenet():
    _, resnet = build("resnet18", image_size=32)
    _, mobilenet = build("mobilenet_v3_small", image_size=32)
    student, teacher = models.find_stages(resnet), models.find_stages(mobilenet)
    assert [s.stride for s in student] == [1, 2, 4, 8] and [s.stride for s in teacher] == [4, 8, 16, 32]
    assert models.pair_stages(student, teacher) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert models.pair_stages(teacher, student) == [(0, 0), (1, 1), (2, 2), (3, 3)]


# --- 5. model names -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("ResNet50", ("torchvision", "resnet50")),
    ("MobileNet_V3_Small", ("torchvision", "mobilenet_v3_small")),
    (" resnet18 ", ("torchvision", "resnet18")),
    ("timm/resnet10t", ("timm", "resnet10t")),
    ("TIMM/ResNet10T", ("timm", "resnet10t")),
])
def test_resolve_name(name, expected):
    assert models.resolve_name(name) == expected


def test_resolve_name_typo_lists_close_torchvision_names():
    with pytest.raises(ModelError, match="resnet50") as err:
        models.resolve_name("resnet5O")  # letter O for zero
    assert "resnet5O" in str(err.value) and "timm/<name>" in str(err.value)


def test_resolve_name_timm_typo_lists_close_timm_names():
    with pytest.raises(ModelError, match=re.escape("timm/resnet10t")) as err:
        models.resolve_name("timm/resnet10")
    assert "unknown timm model 'resnet10'" in str(err.value)


# --- 6. the classifier's input --------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_classifier_input_tap_is_the_pooled_feature(source):
    if source == "torchvision":
        model, pool_name = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES), "avgpool"
    else:
        model, pool_name = timm.create_model("resnet10t", pretrained=False, num_classes=NUM_CLASSES), "global_pool"
    model.eval()
    key = models.classifier_name(model)
    tap = models.FeatureTap(model, [key], inputs=True)  # BYOT's F_C: the classifier's input
    assert key == "fc"
    pooled = {}
    handle = model.get_submodule(pool_name).register_forward_hook(
        lambda _m, _args, output: pooled.__setitem__("out", output))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    handle.remove()
    tap.remove()
    assert not has_hooks(model)
    expected = torch.flatten(pooled["out"], 1)
    assert tuple(tap[key].shape) == (2, 512)
    assert torch.equal(tap[key], expected)
    torch.testing.assert_close(model.fc(tap[key]), logits)

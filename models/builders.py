"""Model names and builders: any torchvision classification model or timm model, and the CIFAR tables' models
(`models.cifar`), unmodified.

A model is named by its library builder, case-insensitive: `resnet50` (also the seed's "ResNet50"),
`mobilenet_v3_small`, `timm/<name>`, or a CIFAR model as RepDistiller names it (`resnet8x4`, `wrn_40_2`,
`ShuffleV1`; `cifar/<name>` for the VGGs, whose bare names are torchvision's). The only change ever made to a
library model is its
classifier (for the user's classes) and, for torchvision's ResNet family on small images, the CIFAR
stem; both are repeated by a user who loads a saved checkpoint into the plain library model.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from models.cifar import CIFAR_MODELS
from models.errors import ModelError

TIMM_PREFIX = "timm/"
CIFAR_PREFIX = "cifar/"
SMALL_IMAGE_MAX = 64  # at or below this size a ResNet's ImageNet stem would shrink the image 4x too early
RESNET_FAMILY = ("resnet", "resnext", "wide_resnet")  # the torchvision builders that take `stem`
AUX_LOGITS = ("googlenet", "inception_v3")  # torchvision builders with auxiliary classifiers by default


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build one model the same way again."""
    name: str                      # as configured: "ResNet50", "mobilenet_v3_small", "timm/resnet10t"
    source: str                    # "torchvision", "timm" or "cifar"
    builder: str                   # the library's own name: "resnet50", "resnet10t"
    weights: str | bool | None     # None: from scratch; a weights name, True (timm's tag) or a file path
    stem: str                      # "cifar" or "imagenet" for the ResNet family, else "library"
    zero_init_residual: bool
    image_size: int

    @property
    def resnet_family(self) -> bool:
        return self.source == "torchvision" and self.builder.startswith(RESNET_FAMILY)



@functools.cache
def torchvision_names() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


@functools.cache
def timm_names() -> tuple[str, ...]:
    import timm
    return tuple(timm.list_models())


def _cifar_builder(name: str) -> str | None:
    """The CIFAR zoo's own spelling of `name`, matched case-insensitively (MobileNetV2, resnet8x4)."""
    return next((known for known in CIFAR_MODELS if known.lower() == name.lower()), None)


def resolve_name(name: str) -> tuple[str, str]:
    """(source, builder) of a configured model name; an unknown name lists the closest known ones."""
    text = str(name).strip()
    if text.lower().startswith(CIFAR_PREFIX):
        builder = _cifar_builder(text[len(CIFAR_PREFIX):])
        if builder is None:
            close = difflib.get_close_matches(text[len(CIFAR_PREFIX):], list(CIFAR_MODELS), n=5, cutoff=0.4)
            raise ModelError(f"unknown CIFAR model '{text}': closest are "
                             f"{', '.join(close or list(CIFAR_MODELS)[:5])} (README lists them all)")
        return "cifar", builder
    if text.lower().startswith(TIMM_PREFIX):
        import timm
        builder = text[len(TIMM_PREFIX):]
        base = builder.split(".", 1)[0]  # "resnet10t.c3_in1k": a pretrained tag may follow the dot
        for candidate in (builder, builder.lower()):
            if timm.is_model(candidate.split(".", 1)[0]):
                return "timm", candidate
        close = difflib.get_close_matches(base.lower(), timm_names(), n=5, cutoff=0.5) or timm_names()[:5]
        raise ModelError(f"unknown timm model '{builder}': closest are "
                         f"{', '.join(TIMM_PREFIX + n for n in close)} (timm.list_models() lists them all)")
    if text.lower() in torchvision_names():
        return "torchvision", text.lower()
    builder = _cifar_builder(text)
    if builder is not None:
        return "cifar", builder
    spelled = {model.lower(): model for model in (*torchvision_names(), *CIFAR_MODELS)}
    close = [spelled[n] for n in difflib.get_close_matches(text.lower(), list(spelled), n=5, cutoff=0.5)]
    raise ModelError(f"unknown model '{text}': closest torchvision and CIFAR names are "
                     f"{', '.join(close) or ', '.join(torchvision_names()[:5])}; timm models are named "
                     "timm/<name>")


def resolve_stem(stem: str, image_size: int, resnet_family: bool = True, pretrained: bool = False) -> str:
    """The stem a model gets: "auto" picks the CIFAR stem for a ResNet on small images (unless its
    pretrained weights expect the ImageNet one); models outside the ResNet family keep their own."""
    if not resnet_family:
        return "library"
    if stem != "auto":
        return stem
    return "cifar" if image_size <= SMALL_IMAGE_MAX and not pretrained else "imagenet"


def model_spec(model_cfg: dict, image_size: int, stem: str) -> ModelSpec:
    """The ModelSpec of a teacher or student config section (keys model, weights, zero_init_residual)."""
    source, builder = resolve_name(model_cfg["model"])
    weights = model_cfg.get("weights")
    resnet_family = source == "torchvision" and builder.startswith(RESNET_FAMILY)
    if source == "cifar" and weights is not None and not isinstance(weights, str):
        raise ModelError(f"{model_cfg['model']} has no library weights (weights: {weights}): set weights to a "
                         "checkpoint file (RepDistiller's or mdistiller's {\"model\": ...} files load) or null")
    if model_cfg.get("zero_init_residual") and not resnet_family:
        raise ModelError(f"zero_init_residual applies to torchvision's ResNet family only, not to "
                         f"{model_cfg['model']}: set it to false")
    return ModelSpec(str(model_cfg["model"]), source, builder, weights,
                     resolve_stem(stem, image_size, resnet_family, pretrained=weights is not None),
                     bool(model_cfg.get("zero_init_residual")), image_size)


def apply_stem(model: nn.Module, stem: str) -> nn.Module:
    """Give a torchvision ResNet the CIFAR stem (3x3 stride-1 conv, no max-pool) when asked.

    This is what a user repeats to load a saved checkpoint into a plain `torchvision.models.resnetXX`.
    """
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif stem not in ("imagenet", "library"):
        raise ValueError(f"unknown stem {stem!r}")
    return model


def classifier_name(model: nn.Module) -> str:
    """The Linear that gives the logits: timm names it; in torchvision models it is the last Linear.
    Models with another kind of classifier (a convolution, two distilled heads) are refused."""
    if hasattr(model, "pretrained_cfg") and model.pretrained_cfg.get("classifier"):
        name = model.pretrained_cfg["classifier"]
    else:
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        name = linears[-1] if linears else None
    if not isinstance(name, str) or not isinstance(model.get_submodule(name), nn.Linear):
        raise ModelError(f"{type(model).__name__} has no single Linear classifier (it has {name or 'none'}), which "
                         "this project replaces for your classes and distils from: choose another model")
    return name


def num_outputs(model: nn.Module) -> int:
    return model.get_submodule(classifier_name(model)).out_features


def set_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """A new classifier for `num_classes` (library default init, drawn from the global RNG)."""
    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(num_classes)
        return model
    name = classifier_name(model)
    old = model.get_submodule(name)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return model


def library_model(spec: ModelSpec, num_classes: int) -> nn.Module:
    """The library's own model with random weights (its init scheme, from the global RNG)."""
    if spec.source == "timm":
        import timm
        return timm.create_model(spec.builder, pretrained=False, num_classes=num_classes, **timm_size_kwargs(spec))
    if spec.source == "cifar":
        return CIFAR_MODELS[spec.builder](num_classes=num_classes)
    kwargs = {"num_classes": num_classes}
    if spec.builder in AUX_LOGITS:  # one output in training mode, like every other model
        kwargs.update(aux_logits=False, init_weights=spec.weights is None,
                      transform_input=spec.weights is not None)  # their weights expect the transform
    if spec.resnet_family:
        kwargs["zero_init_residual"] = spec.zero_init_residual
    if spec.builder.startswith("vit_"):
        kwargs["image_size"] = spec.image_size  # torchvision's ViT takes exactly its image_size
    return torchvision.models.get_model(spec.builder, weights=None, **kwargs)


def timm_size_kwargs(spec: ModelSpec) -> dict:
    """timm's transformers are built for the run's image size (their position embedding resized);
    its CNNs take any size as they are."""
    import timm
    cfg = timm.models.get_pretrained_cfg(spec.builder)
    return {"img_size": spec.image_size} if cfg is not None and cfg.fixed_input_size else {}


def state_dict_outputs(state: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    """How many classes a state_dict for `model` predicts (its classifier's rows), if it has that key."""
    weight = state.get(f"{classifier_name(model)}.weight")
    return None if weight is None else int(weight.shape[0])

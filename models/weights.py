"""Building a model with its starting weights: torchvision's weights through its cache (TORCH_HOME), timm's
pretrained tags through the Hugging Face cache, or a file (this project's checkpoint, a plain state_dict, a
library weights file).

Files are read with `weights_only=True` (or as safetensors). When a library file is missing and cannot be
downloaded, the error names the file and the folder to put it in.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import urllib.parse
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from models.builders import (AUX_LOGITS, ModelSpec, apply_stem, library_model, num_outputs, set_classifier,
                             state_dict_outputs, timm_size_kwargs)
from models.errors import ModelError, error_reason

log = logging.getLogger("kd.models")

@dataclass(frozen=True)
class InputStats:
    """How a model's starting weights expect their input: normalisation and recommended sizes."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int | None       # the size the weights were evaluated at (their transforms' crop)
    min_size: int          # below this the library refuses the model (e.g. torchvision's ViT: 224)
    origin: str            # where the numbers come from, for the plan


def torchvision_weights(spec: ModelSpec) -> torchvision.models.WeightsEnum | None:
    """The torchvision weights `spec.weights` names ("DEFAULT", "IMAGENET1K_V2", True), or None for a file."""
    if spec.source != "torchvision" or spec.weights is None:
        return None
    enum = torchvision.models.get_model_weights(spec.builder)
    if spec.weights is True:
        return enum.DEFAULT
    members = {name.upper(): member for name, member in enum.__members__.items()}
    weights = members.get(str(spec.weights).upper().removeprefix(f"{enum.__name__.upper()}."))
    if weights is None and not Path(str(spec.weights)).suffix and "/" not in str(spec.weights):
        raise ModelError(f"unknown weights '{spec.weights}' for {spec.builder}: choose one of "
                         f"{', '.join(enum.__members__)} or a file path")
    return weights


def weights_file(spec: ModelSpec) -> Path | None:
    """The user's file, when `spec.weights` is a path rather than a library weights name or tag."""
    if spec.weights is None or spec.weights is True or torchvision_weights(spec) is not None:
        return None
    path = Path(os.path.expanduser(str(spec.weights)))
    if not path.is_file():
        raise ModelError(f"weights file '{path}' for {spec.name} does not exist: give an existing file, "
                         "a torchvision weights name (DEFAULT) or true for timm's pretrained tag")
    return path


def read_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state_dict, this project's meta or None) of a checkpoint, state_dict or library weights file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path)), None
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for foreign or damaged files; all mean the same here
        raise ModelError(f"'{path}' is not a readable weights file ({error_reason(err)}): give a checkpoint or "
                         "state_dict saved with torch.save") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict) and isinstance(loaded.get("meta"), dict):
        return loaded["model"], loaded["meta"]
    # training scripts save {"state_dict": ...}; the CIFAR tables' teachers (RepDistiller, mdistiller) {"model": ...}
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            return loaded[key], None
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelError(f"'{path}' holds no state_dict (a dict of tensors): save model.state_dict()")
    return loaded, None


def load_state_strictly(model: nn.Module, state: dict[str, torch.Tensor], source: str, name: str) -> None:
    """load_state_dict(strict=True), with a mismatch told in one line (another architecture, most often)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [f"{k} {tuple(state[k].shape)} there, {tuple(own[k].shape)} here"
               for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or resized:
        problems = [f"{len(missing)} missing key(s) (e.g. {missing[0]})" if missing else "",
                    f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[0]})" if unexpected else "",
                    f"shape of {resized[0]}" if resized else ""]
        raise ModelError(f"{source} does not fit {name}: {'; '.join(p for p in problems if p)} - it was saved "
                         "from another architecture or stem")
    model.load_state_dict(state)


def _download_reason(err: BaseException) -> str:
    return re.sub(r"\s+", " ", str(getattr(err, "reason", None) or err))[:100] or type(err).__name__


def _torchvision_pretrained(spec: ModelSpec, weights: torchvision.models.WeightsEnum) -> dict:
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
    cached = (folder / filename).is_file()
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            state = weights.get_state_dict(progress=False, check_hash=True)  # torch's own notices: said below
        if not cached:
            log.info("Downloaded %s into %s", weights.url, folder)
        return state
    except Exception as err:  # urllib/socket/http errors: no network, proxy, server; all mean "not here"
        if (folder / filename).is_file():
            raise ModelError(f"'{folder / filename}' is not a readable weights file ({_download_reason(err)}): "
                             f"delete it, or replace it with {weights.url}") from None
        raise ModelError(f"pretrained weights {weights} for {spec.name} are not in the torchvision cache and "
                         f"cannot be downloaded ({_download_reason(err)}): put {filename} (from {weights.url}) "
                         f"into {folder}, or give weights as a file path") from None


def _timm_pretrained(spec: ModelSpec, num_classes: int) -> nn.Module:
    import timm
    from huggingface_hub import constants
    cfg = timm.models.get_pretrained_cfg(spec.builder)
    repo = getattr(cfg, "hf_hub_id", None) or spec.builder
    try:
        return timm.create_model(spec.builder, pretrained=True, num_classes=num_classes, **timm_size_kwargs(spec))
    except Exception as err:  # huggingface_hub/http errors when offline and the file is not cached
        raise ModelError(f"pretrained weights of timm/{spec.builder} are not in the Hugging Face cache "
                         f"{constants.HF_HUB_CACHE} and cannot be downloaded ({_download_reason(err)}): copy "
                         f"model.safetensors from https://huggingface.co/{repo} to this machine and set weights to "
                         "its path, or fill that cache on a machine with network") from None


def pretrained_model(spec: ModelSpec, num_classes: int) -> nn.Module:
    """The library model with `spec.weights` loaded and a new classifier for `num_classes`."""
    if spec.source == "timm" and spec.weights is True:
        return _timm_pretrained(spec, num_classes)
    library = torchvision_weights(spec)
    if library is not None:
        state, source = _torchvision_pretrained(spec, library), f"weights {library}"
    else:
        path = weights_file(spec)
        state, _ = read_weights_file(path)
        source = f"weights file '{path}'"
    if spec.builder in AUX_LOGITS:  # built without the auxiliary classifiers
        state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2.", "AuxLogits."))}
    model = library_model(spec, num_classes)
    if spec.resnet_family and library is None:
        apply_stem(model, spec.stem)  # a file saved with the CIFAR stem loads into the CIFAR stem
    outputs = state_dict_outputs(state, model)
    if outputs is not None and outputs != num_classes:
        set_classifier(model, outputs)
    load_state_strictly(model, state, source, spec.name)
    if outputs != num_classes:
        set_classifier(model, num_classes)
    if spec.resnet_family and library is not None:
        apply_stem(model, spec.stem)  # asked for the CIFAR stem: ImageNet weights keep all but the first conv
    return model


def ensure_available(spec: ModelSpec) -> None:
    """Check (downloading through the library's cache if needed) that the starting weights can be read,
    so that a missing file stops the experiment before anything is trained or written."""
    if spec.weights is not None:
        pretrained_model(spec, 2)


@functools.lru_cache(maxsize=16)
def _file_meta(path: str, modified_ns: int) -> dict | None:
    """A weights file's project meta, read once per version of the file (the plan asks for it several times)."""
    return read_weights_file(path)[1]


def input_stats(spec: ModelSpec, meta: dict | None = None) -> InputStats | None:
    """The normalisation and sizes the starting weights expect (`meta`: a checkpoint's own); None for a model
    trained from scratch."""
    path = weights_file(spec) if meta is None else None
    if path is not None:
        meta = _file_meta(str(path), path.stat().st_mtime_ns)
    if meta is not None and meta.get("mean") is not None:
        return InputStats(tuple(meta["mean"]), tuple(meta["std"]), meta.get("image_size"), 1,
                          "the checkpoint's own meta")
    if spec.weights is None or spec.source == "cifar":
        return None  # the CIFAR tables' files carry no normalisation: the data's own, as theirs was computed
    if spec.source == "timm":
        import timm
        cfg = timm.models.get_pretrained_cfg(spec.builder)
        if cfg is None:
            return None
        origin = f"timm's pretrained_cfg of {spec.builder}" + (" (assumed for the file)" if spec.weights is not True
                                                                 else "")
        return InputStats(tuple(cfg.mean), tuple(cfg.std), cfg.input_size[-1],
                          (cfg.min_input_size or (3, 1, 1))[-1], origin)
    weights = torchvision_weights(spec)
    origin = f"the transforms of {weights}"
    if weights is None:
        weights = torchvision.models.get_model_weights(spec.builder).DEFAULT
        origin = f"the transforms of {weights} (assumed for the file)"
    transforms = weights.transforms()
    return InputStats(tuple(transforms.mean), tuple(transforms.std), transforms.crop_size[0],
                      weights.meta.get("min_size", (1, 1))[0], origin)


def build_model(spec: ModelSpec, num_classes: int, with_weights: bool = True) -> nn.Module:
    """The unmodified library model for `spec`, with `num_classes` outputs and the ResNet stem asked for.

    `with_weights` loads the starting weights (`spec.weights`); without it the weights are random, as for
    a model that will load a saved state next.
    """
    if with_weights and spec.weights is not None:
        model = pretrained_model(spec, num_classes)  # the stem as the weights need it
    else:
        model = library_model(spec, num_classes)
        if spec.resnet_family:
            apply_stem(model, spec.stem)
    model.build_spec = spec  # a plain attribute: not in the state_dict; lets fresh_copy build another
    return model


def fresh_copy(model: nn.Module) -> nn.Module:
    """Another model like `model` (made by build_model) with a different start, from the global RNG (DML's
    extra peers): a model from scratch gets the library's random initialisation again; a pretrained one
    keeps its starting weights and gets a new classifier."""
    spec = model.build_spec
    if spec.weights is None:
        return build_model(spec, num_outputs(model), with_weights=False)
    return set_classifier(copy.deepcopy(model), num_outputs(model))


def build_resnet(arch: str, num_classes: int, stem: str, zero_init_residual: bool = False) -> nn.Module:
    """A torchvision ResNet ("ResNet18", "ResNet50", ...) with random weights and the given stem."""
    spec = ModelSpec(arch, "torchvision", arch.lower(), None, stem, zero_init_residual, 0)
    return build_model(spec, num_classes)

"""Feature stages found on unmodified models, and the forward hooks that read them during training.

Stage k is the last feature map at each downsampling step, the deepest four: strides 4, 8, 16, 32 with
an ImageNet stem (1, 2, 4, 8 with the ResNet CIFAR stem). timm declares its stages (`feature_info`);
for torchvision models one rule, checked per family in tests/test_stages.py, finds them with a shape
probe: run the model once with a hook on every module, take the input of the first module called on a
stride-s map that returns a map at the next stride (the next stage starts there), and name it by the
outermost module that returned that very tensor. The deepest stage is the last map before pooling.
Transformers of torchvision (vit_*, swin_*) and timm models whose features are not maps at growing
strides (ViTs) have no stages: feature methods refuse them.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from models.errors import ModelError

MAX_STAGES = 4
PROBE_SIZES = (64, 224)  # multiples of 32, so that strides come out exact; 224 for models fixed to it
TOKEN_MODELS = (torchvision.models.VisionTransformer, torchvision.models.SwinTransformer)
_found: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_found_by_spec: dict = {}


@dataclass(frozen=True)
class Stage:
    module: str    # the module whose output is the stage's map (a forward-hook point)
    channels: int
    stride: int    # input size / map size


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _run_probe(model: nn.Module, size: int, watch: list[str] | None = None) -> list[tuple]:
    """Forward one random image; return (call index, name, input, output) per module call, in the order the
    calls finished (`watch`: only these modules)."""
    modules = [(n, m) for n, m in model.named_modules() if n and (watch is None or n in watch)]
    started: dict[str, list[int]] = {}
    events: list[tuple] = []
    counter = iter(range(10 ** 9))

    def pre_hook(name: str):
        def hook(_module, _args):
            started.setdefault(name, []).append(next(counter))
        return hook

    def post_hook(name: str):
        def hook(_module, args, output):
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            events.append((started[name].pop(), name, first, output))
        return hook

    handles = [h for n, m in modules for h in (m.register_forward_pre_hook(pre_hook(n)),
                                                 m.register_forward_hook(post_hook(n)))]
    was_training = model.training
    try:
        model.eval()
        model(torch.randn(1, 3, size, size, device=_device(model)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return events


def _stride(tensor, size: int) -> int | None:
    """The stride of an NCHW map at probe size `size` (None: not a map, e.g. tokens or a pooled vector)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or tensor.shape[-1] != tensor.shape[-2]:
        return None
    side = tensor.shape[-1]
    return size // side if side > 1 and size % side == 0 else None


def _probe_stages(model: nn.Module, size: int) -> list[Stage]:
    events = _run_probe(model, size)
    maps = [(index, name, output) for index, name, _, output in events if _stride(output, size)]
    if not maps:
        return []
    levels = sorted({_stride(output, size) for _, _, output in maps})
    levels = [s for s in levels if s >= levels[-1] // 2 ** (MAX_STAGES - 1)][-MAX_STAGES:]
    stage_maps = []
    for level, next_level in zip(levels, levels[1:]):
        steps = sorted((index, inputs) for index, _, inputs, output in events
                       if _stride(inputs, size) == level and _stride(output, size) == next_level)
        if steps:
            stage_maps.append((steps[0][0], steps[0][1]))  # the first module to start the next stage
    stage_maps.append((math.inf, maps[-1][2]))  # the deepest: the last map of the forward pass
    stages: list[Stage] = []
    for before, tensor in stage_maps:
        producers = [name for index, name, _, output in events if output is tensor]
        if not producers:  # made by a functional op: the last module map of that shape before the step
            producers = [name for index, name, output in maps if index < before and output.shape == tensor.shape]
        producers = [n for n in producers if not any(s.module.startswith(n + ".") for s in stages)] or producers
        if producers:
            stages.append(Stage(producers[-1], tensor.shape[1], size // tensor.shape[-1]))
    return stages


def _timm_stages(model: nn.Module) -> list[Stage]:
    info = model.feature_info
    entries = [(entry["module"], entry["num_chs"], entry["reduction"]) for entry in
               (info.get_dicts() if hasattr(info, "get_dicts") else info)]
    reductions = [r for _, _, r in entries]
    if any(b <= a for a, b in zip(reductions, reductions[1:])) or getattr(model, "output_fmt", "NCHW") != "NCHW":
        return []  # a transformer: every block at one stride, or maps stored as NHWC
    deepest = reductions[-1]
    return [Stage(name, chs, r) for name, chs, r in entries if r >= deepest // 2 ** (MAX_STAGES - 1)][-MAX_STAGES:]


def find_stages(model: nn.Module) -> list[Stage]:
    """The model's stages, shallow to deep (empty for a transformer without feature maps); found once per
    model, and once per ModelSpec for the models that build_model made."""
    key = getattr(model, "build_spec", None)
    if key in _found_by_spec:
        return _found_by_spec[key]
    if model in _found:
        return _found[model]
    if isinstance(model, TOKEN_MODELS):
        stages = []
    elif type(model).__module__.startswith("timm.") and hasattr(model, "feature_info"):
        stages = _timm_stages(model)
    else:
        stages, failure = [], None
        for size in PROBE_SIZES:
            try:
                stages = _probe_stages(model, size)
                break
            except (RuntimeError, AssertionError, ValueError) as err:  # a model built for one input size only
                failure = err
        else:
            raise ModelError(f"cannot find the feature stages of {type(model).__name__}: it does not run at "
                             f"{' or '.join(map(str, PROBE_SIZES))} px ({str(failure).splitlines()[0][:100]})")
    _found[model] = stages
    if key is not None:
        _found_by_spec[key] = stages
    return stages


def stage_sizes(model: nn.Module, stages: list[Stage], image_size: int) -> list[int]:
    """Each stage's map side at `image_size` (raises RuntimeError where the model cannot run at that size)."""
    outputs = {name: output for _, name, _, output in _run_probe(model, image_size, [s.module for s in stages])}
    return [outputs[s.module].shape[-1] for s in stages]


def check_image_size(model: nn.Module, name: str, image_size: int) -> list[int]:
    """The stage sizes at `image_size`, or a ModelError with the smallest size that works: one where the model
    runs and no stage shrinks below 1x1 (image_size >= the deepest stride)."""
    stages = find_stages(model)

    def works(size: int) -> bool:
        if stages and size < stages[-1].stride:
            return False
        try:
            stage_sizes(model, stages, size)
            return True
        except (RuntimeError, AssertionError, ValueError):  # torch's errors, torchvision's size asserts
            return False

    if works(image_size):
        return stage_sizes(model, stages, image_size)
    smallest = next((size for size in range(8, 1025, 8) if works(size)), None)
    where = (f"its deepest stage {stages[-1].module} has stride {stages[-1].stride}, so its map would shrink "
             "below 1x1 (only padding would keep it)"
             if stages and image_size < stages[-1].stride else "it does not run at that size")
    fix = f"use image_size >= {smallest}" if smallest else "choose another model"
    raise ModelError(f"image_size {image_size} is too small for {name}: {where}; {fix}")


def matching_stage(stages: list[Stage], k: int, others: list[Stage]) -> int:
    """The index in `others` paired with stage k of `stages`: the same position when the counts agree, else
    the stage at the nearest stride relative to the deepest one (so a CIFAR-stem ResNet's stride 8 meets
    an ImageNet model's stride 32)."""
    if len(stages) == len(others):
        return k

    def relative(of: list[Stage], index: int) -> float:
        return math.log2(of[index].stride / of[-1].stride)

    return min(range(len(others)), key=lambda j: abs(relative(others, j) - relative(stages, k)))


def pair_stages(student: list[Stage], teacher: list[Stage]) -> list[tuple[int, int]]:
    """(student index, teacher index) pairs, one for each stage of the model with fewer stages."""
    if len(student) <= len(teacher):
        return [(k, matching_stage(student, k, teacher)) for k in range(len(student))]
    return [(matching_stage(teacher, k, student), k) for k in range(len(teacher))]


class FeatureTap:
    """Forward hooks that keep the latest outputs (or, with `inputs`, the first inputs) of named modules (of the
    module's last call, when it is called several times).

    The model itself stays the unmodified library model, so its state_dict loads anywhere.
    """

    def __init__(self, model: nn.Module, names: tuple[str, ...] | list[str], inputs: bool = False):
        self.outputs: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            raise ModelError(f"{type(model).__name__} has no module '{missing[0]}'")
        self._handles = [modules[name].register_forward_pre_hook(self._input_keeper(name)) if inputs
                         else modules[name].register_forward_hook(self._keeper(name)) for name in names]

    def _keeper(self, name: str):
        def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            self.outputs[name] = output
        return hook

    def _input_keeper(self, name: str):
        def hook(_module: nn.Module, inputs) -> None:
            self.outputs[name] = inputs[0].clone()  # an in-place module (a ResNet's ReLU) would overwrite it
        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.outputs[name]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

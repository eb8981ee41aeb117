"""OFA-KD's projectors: each chosen student stage gets a small trainable branch that ends in the class logits, so
that any stage of any architecture can be compared with the teacher's predictions (Hao et al., NeurIPS 2023,
section 3.2). Built after the authors' distillers/ofa.py and distillers/utils.py (github.com/Hao840/OFAKD),
generalized from their four fixed stages to what this project's models offer:

- a CNN student (stages from `find_stages`): stage k of n gets one stride-2 separable-conv block per later stage
  (the authors' `4 - stage` for four stages), the deepest stage a 1x1 conv; then pool and a Linear;
- a ViT student (torchvision's or a timm token ViT): its stages are the tokens after the blocks at 1/6, 1/3, 5/6
  and all of its depth (the authors' blocks 2, 4, 10, 12 of 12, custom_forward/vision_transformer.py); stage k
  gets patch merging toward a 7x7 grid, max(4 - k, 1) transformer blocks, its class token and a Linear.

The student itself stays the unmodified library model: its stages are read with forward hooks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torchvision
from timm.models.vision_transformer import Block
from torch import nn

from models import ModelError, classifier_name, find_stages

# custom_forward/vision_transformer.py's stage_info: stages 1-4 are the outputs of blocks 2, 4, 10 and 12 (from 1)
# of a 12-block ViT; the same fractions of any depth, rounded up to a whole block
VIT_STAGE_DEPTHS = (Fraction(1, 6), Fraction(1, 3), Fraction(5, 6), Fraction(1))
FINAL_GRID = 7    # distillers/ofa.py: patch tokens are merged until about 7x7 (its `final_patch_grid`)
VIT_HEADS = 4     # distillers/ofa.py: the projector's blocks have 4 heads whatever the student's


@dataclass(frozen=True)
class TokenLayout:
    """What OFA needs to know of a ViT student."""
    blocks: tuple[str, ...]     # module path of every transformer block, in order
    width: int                  # the token width (embedding dim)
    prefix: int                 # tokens before the patch tokens (class, distillation, register tokens)
    class_token: bool           # token 0 is a class token
    grid: tuple[int, int] | None  # the patch grid (rows, columns) at the run's image size, if known


def token_layout(model: nn.Module) -> TokenLayout | None:
    """The layout of a torchvision ViT or a timm token ViT (blocks of (batch, tokens, width) in sequence: ViT,
    DeiT, BEiT, EVA, relpos ViT); None for any other model."""
    if isinstance(model, torchvision.models.VisionTransformer):
        side = model.image_size // model.patch_size
        names = tuple(f"encoder.layers.{name}" for name, _ in model.encoder.layers.named_children())
        return TokenLayout(names, model.hidden_dim, 1, True, (side, side))
    blocks, patch_embed = getattr(model, "blocks", None), getattr(model, "patch_embed", None)
    if (type(model).__module__.startswith("timm.") and isinstance(blocks, (nn.Sequential, nn.ModuleList))
            and len(blocks) and isinstance(getattr(model, "embed_dim", None), int)
            and isinstance(getattr(model, "num_prefix_tokens", None), int) and patch_embed is not None):
        grid = getattr(patch_embed, "grid_size", None)
        return TokenLayout(tuple(f"blocks.{i}" for i in range(len(blocks))), model.embed_dim, model.num_prefix_tokens,
                           getattr(model, "cls_token", None) is not None, tuple(grid) if grid else None)
    return None


def stage_modules(student: nn.Module) -> list[str]:
    """The module whose output is each of the student's stages, shallow to deep (a CNN's stages; for a ViT the
    blocks at VIT_STAGE_DEPTHS, a shallow ViT's may repeat). A ModelError for a student that has neither."""
    stages = find_stages(student)
    if stages:
        return [stage.module for stage in stages]
    layout = token_layout(student)
    if layout is None:
        raise ModelError(f"OFA cannot serve the student {type(student).__name__}: it has neither feature-map stages "
                         "nor ViT blocks of tokens; use a CNN or a ViT student (torchvision vit_*, timm ViT/DeiT)")
    if layout.width % VIT_HEADS:
        raise ModelError(f"OFA's projector blocks have {VIT_HEADS} heads, which the student's token width "
                         f"{layout.width} does not divide: choose a ViT whose width is a multiple of {VIT_HEADS}")
    depth = len(layout.blocks)
    return [layout.blocks[math.ceil(depth * fraction) - 1] for fraction in VIT_STAGE_DEPTHS]


def pooled_width(model: nn.Module) -> int:
    """The size of the model's pooled feature: what its classifier takes."""
    return model.get_submodule(classifier_name(model)).in_features


class SepConv(nn.Sequential):
    """A stride-2 depthwise-separable block, two of them deep (utils.py's SepConv): dw3x3 s2, pw1x1, BN, ReLU,
    dw3x3, pw1x1, BN, ReLU. Padding 1 keeps a 1x1 map at 1x1, so small images never shrink it to nothing."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, in_channels, 1, bias=False), nn.BatchNorm2d(in_channels), nn.ReLU(),
            nn.Conv2d(in_channels, in_channels, 3, stride=1, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())


def cnn_projector(channels: int, later_stages: int, width: int, num_classes: int) -> nn.Sequential:
    """A CNN stage's projector: `later_stages` SepConv blocks, channels doubling and the last one to `width`
    (a stage as deep as the pooled feature); the deepest stage (none later) a 1x1 conv to `width`. Then the
    global average pool and a Linear to the classes."""
    if later_stages == 0:
        body: list[nn.Module] = [nn.Conv2d(channels, width, 1)]
    else:
        body = [SepConv(channels * 2 ** i, width if i == later_stages - 1 else channels * 2 ** (i + 1))
                for i in range(later_stages)]
    return nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class PatchMerging(nn.Module):
    """Each 2x2 group of patch tokens concatenated, normalized and mapped back to `width` (Swin's patch merging,
    as utils.py's PatchMerging): a (rows x cols) grid becomes (rows/2 x cols/2)."""

    def __init__(self, grid: tuple[int, int], width: int, activation: bool):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * width)
        self.reduction = nn.Linear(4 * width, width, bias=False)
        self.act = nn.GELU() if activation else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, _, width = tokens.shape
        rows, cols = self.grid
        groups = tokens.reshape(batch, rows // 2, 2, cols // 2, 2, width).permute(0, 1, 3, 2, 4, 5)
        return self.act(self.reduction(self.norm(groups.reshape(batch, rows * cols // 4, 4 * width))))


def merge_count(grid: tuple[int, int] | None) -> int:
    """How many times to merge: distillers/ofa.py's max(int(log2(grid / 7)), 0), and only while both sides stay
    even (a 15x15 grid cannot be halved; the authors' 14x14 and 56x56 can)."""
    if grid is None:
        return 0
    merges, (rows, cols) = max(int(math.log2(min(grid) / FINAL_GRID)), 0), grid
    done = 0
    while done < merges and rows % 2 == 0 and cols % 2 == 0:
        rows, cols, done = rows // 2, cols // 2, done + 1
    return done


class TokenProjector(nn.Module):
    """A ViT stage's projector: the patch tokens merged (the prefix tokens kept as they are), `depth` transformer
    blocks over all tokens, then the class token (the mean of the patch tokens, as timm's average pool, when the
    student has none) and a Linear to the classes."""

    def __init__(self, layout: TokenLayout, depth: int, num_classes: int):
        super().__init__()
        self.prefix, self.class_token = layout.prefix, layout.class_token
        grids, merges = [layout.grid], merge_count(layout.grid)
        for _ in range(merges):
            grids.append((grids[-1][0] // 2, grids[-1][1] // 2))
        # distillers/ofa.py: the first merge has a GELU, and of the later ones all but the last
        self.merges = nn.Sequential(*(PatchMerging(grids[i], layout.width, activation=i == 0 or i < merges - 1)
                                      for i in range(merges)))
        self.blocks = nn.Sequential(*(Block(dim=layout.width, num_heads=VIT_HEADS) for _ in range(depth)))
        self.head = nn.Linear(layout.width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([tokens[:, :self.prefix], self.merges(tokens[:, self.prefix:])], dim=1)
        tokens = self.blocks(tokens)
        feature = tokens[:, 0] if self.class_token else tokens[:, self.prefix:].mean(dim=1)
        return self.head(feature)


def init_projector(module: nn.Module) -> None:
    """utils.py's init_weights: conv weights kaiming normal (fan out, ReLU), BN weight 1 and bias 0, Linear
    truncated normal std 0.02 and bias 0 (LayerNorm keeps its 1 and 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # a bias (the deepest
            # stage's 1x1 conv has one) keeps PyTorch's default, as the authors leave it
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_projector(student: nn.Module, teacher: nn.Module, stage: int, num_classes: int) -> nn.Module:
    """The initialized projector of the student's stage `stage` (from 1) to `num_classes` logits."""
    stages = find_stages(student)
    if stages:
        width = max(pooled_width(student), pooled_width(teacher))
        projector: nn.Module = cnn_projector(stages[stage - 1].channels, len(stages) - stage, width, num_classes)
    else:
        layout = token_layout(student)
        projector = TokenProjector(layout, max(len(VIT_STAGE_DEPTHS) - stage, 1), num_classes)
    init_projector(projector)
    return projector

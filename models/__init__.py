"""Models: library builders (torchvision, timm), starting weights, feature stages and BYOT's heads."""
from models.builders import (ModelSpec, apply_stem, classifier_name, model_spec, num_outputs, resolve_name,
                             resolve_stem, set_classifier)
from models.errors import ModelError
from models.heads import ExitHead
from models.stages import FeatureTap, Stage, check_image_size, find_stages, matching_stage, pair_stages, stage_sizes
from models.weights import build_model, build_resnet, fresh_copy

__all__ = ["ModelSpec", "apply_stem", "build_model", "build_resnet", "classifier_name", "fresh_copy", "model_spec",
           "num_outputs", "resolve_name", "resolve_stem", "set_classifier", "ModelError", "ExitHead", "FeatureTap",
           "Stage", "check_image_size", "find_stages", "matching_stage", "pair_stages", "stage_sizes"]

"""DKD_LS: DKD on standardized logits, Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024).

The same Distiller as DKD with `standardize` on, under its own name, with the logit-standardization
repository's settings in METHODS_CONFIG.
"""
from kd.methods.common import WARMUP_DECLARATION
from kd.methods.dkd import DKD, DKD_SETTINGS
from kd.methods.registry import Method, register
from kd.space import Range

register(Method("DKD_LS", DKD, DKD_SETTINGS,
                idea="Sun et al. (CVPR 2024): DKD on logits standardized per sample (zero mean, unit std).",
                **WARMUP_DECLARATION,
                search_space={"temperature": Range(1.0, 8.0), "tckd_weight": Range(1.0, 81.0, log=True),
                  "nckd_weight": Range(8.0, 648.0, log=True)}))

"""KD_LS: KD on standardized logits, Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024).

The same Distiller as KD with `standardize` on (kd/methods/common.py's `standardize_logits`), under its own
name, with the logit-standardization repository's settings in METHODS_CONFIG.
"""
from kd.methods.kd import KD, KD_SETTINGS
from kd.methods.registry import Method, register
from kd.space import Range

register(Method("KD_LS", KD, KD_SETTINGS,
                idea="Sun et al. (CVPR 2024): KD on logits standardized per sample (zero mean, unit std), so the "
                     "student matches the shape of the teacher's logits rather than their scale.",
                search_space={"temperature": Range(1.0, 8.0), "kd_weight": Range(1.0, 100.0, log=True)}))

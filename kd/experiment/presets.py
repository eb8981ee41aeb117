"""What the published CIFAR-100 tables (CRD, Tian et al. 2020; ReviewKD, Chen et al. 2021; DKD, Zhao et al.
2022) changed for particular models and pairs. `--preset cifar100` gives a pair these settings wherever the
user leaves the key unset; the plan shows them."""
from __future__ import annotations

import copy

from kd.errors import UserError
from models import ModelError, resolve_name

# trained at lr 0.01 instead of 0.05, as teachers and as students (RepDistiller's train_teacher.py and
# train_student.py; mdistiller's configs/cifar100/dkd/*_shuv1.yaml, *_shuv2.yaml and *_mv2.yaml)
SMALL_LR_MODELS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
SMALL_LR = 0.01

# (teacher, student) -> the methods' settings the tables used for that pair. DKD's beta (nckd_weight): mdistiller's
# configs/cifar100/dkd/<pair>.yaml (8, the default, elsewhere); ReviewKD's loss weight (beta): the ReviewKD
# repository's CIFAR-100/script/reviewKD.sh (5, the default, elsewhere).
PAIR_SETTINGS: dict[tuple[str, str], dict[str, dict[str, float]]] = {
    ("resnet56", "resnet20"): {"DKD": {"nckd_weight": 2.0}, "ReviewKD": {"beta": 0.6}},
    ("resnet110", "resnet32"): {"DKD": {"nckd_weight": 2.0}, "ReviewKD": {"beta": 1.0}},
    ("wrn_40_2", "wrn_16_2"): {"DKD": {"nckd_weight": 6.0}},
    ("wrn_40_2", "wrn_40_1"): {"DKD": {"nckd_weight": 6.0}},
    ("vgg13", "vgg8"): {"DKD": {"nckd_weight": 6.0}},
    ("vgg13", "MobileNetV2"): {"DKD": {"nckd_weight": 6.0}},
    ("resnet32x4", "ShuffleV2"): {"ReviewKD": {"beta": 8.0}},
}


def table_pair_settings(config: dict) -> dict[str, dict]:
    """The tables' own settings for this config's teacher and student, by section, e.g.
    {"student": {"lr": 0.01}, "methods": {"DKD": {"nckd_weight": 6.0}}}; empty outside the CIFAR zoo."""
    try:
        (t_source, teacher), (s_source, student) = (resolve_name(config[r]["model"]) for r in ("teacher", "student"))
    except ModelError as err:
        raise UserError(str(err)) from None
    settings: dict[str, dict] = {}
    for role, source, builder in (("teacher", t_source, teacher), ("student", s_source, student)):
        if source == "cifar" and builder in SMALL_LR_MODELS:
            settings[role] = {"lr": SMALL_LR}
    if t_source == s_source == "cifar" and (teacher, student) in PAIR_SETTINGS:
        settings["methods"] = copy.deepcopy(PAIR_SETTINGS[teacher, student])
    return settings


def describe_pair_settings(config: dict) -> str | None:
    """The plan's line on the pair's settings under `--preset cifar100`: which are in effect, which the user
    changed."""
    settings = table_pair_settings(config)
    chosen = [(f"{section}.{key}", value, config[section][key]) for section in ("teacher", "student")
              for key, value in settings.get(section, {}).items()]
    chosen += [(f"methods.{method}.{key}", value, config["methods"][method][key])
               for method, keys in settings.get("methods", {}).items() for key, value in keys.items()]
    if not chosen:
        return None
    told = [f"{name} {value}" + ("" if current == value else f" (you set {current})")
            for name, value, current in chosen]
    return (f"preset cifar100: the tables' settings for {config['teacher']['model']} -> "
            f"{config['student']['model']}: {', '.join(told)}")

"""What the published CIFAR-100 tables (CRD, Tian et al. 2020; ReviewKD, Chen et al. 2021; DKD, Zhao et al.
2022) changed for particular models and pairs. `--preset cifar100` gives a pair these settings wherever the
user leaves the key unset (the plan shows them), and reads the VGGs' names as the tables' models."""
from __future__ import annotations

from kd.errors import UserError
from kd.methods import METHODS
from models import ModelError, resolve_name
from models.builders import CIFAR_PREFIX, torchvision_names
from models.cifar import CIFAR_MODELS

# trained at lr 0.01 instead of 0.05, as teachers and as students (RepDistiller's train_teacher.py and
# train_student.py; mdistiller's configs/cifar100/dkd/*_shuv1.yaml, *_shuv2.yaml and *_mv2.yaml)
SMALL_LR_MODELS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
SMALL_LR = 0.01


def table_model(name: str) -> str:
    """A model name as the tables mean it: a bare name both torchvision and the zoo have (the VGGs) is
    torchvision's ImageNet model elsewhere, the zoo's under the preset."""
    lowered = str(name).lower()
    shared = lowered in torchvision_names() and lowered in (model.lower() for model in CIFAR_MODELS)
    return f"{CIFAR_PREFIX}{name}" if shared else name


def use_table_models(config: dict) -> None:
    for role in ("teacher", "student"):
        config[role]["model"] = table_model(config[role]["model"])


def table_pair_settings(config: dict) -> dict[str, dict]:
    """The tables' own settings for this config's teacher and student, by section, e.g.
    {"student": {"lr": 0.01}, "methods": {method: {setting: value}}}; empty outside the CIFAR zoo."""
    try:
        (t_source, teacher), (s_source, student) = (resolve_name(table_model(config[r]["model"]))
                                                    for r in ("teacher", "student"))
    except ModelError as err:
        raise UserError(str(err)) from None
    settings: dict[str, dict] = {}
    for role, source, builder in (("teacher", t_source, teacher), ("student", s_source, student)):
        if source == "cifar" and builder in SMALL_LR_MODELS:
            settings[role] = {"lr": SMALL_LR}
    if t_source == s_source == "cifar":  # each method declares its pairs' settings in its own file
        methods = {name: dict(method.table_pairs[teacher, student]) for name, method in METHODS.items()
                   if (teacher, student) in method.table_pairs}
        if methods:
            settings["methods"] = methods
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

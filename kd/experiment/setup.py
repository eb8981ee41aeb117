"""What every run of an experiment shares (`Setup`): the validated config, the data, the device and
precision, and the two models, checked before anything is trained or written."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kd.data.batches import ImageData
from kd.data.cifar import cifar_name, load_cifar
from kd.data.holdout import hold_out
from kd.data.load import load_image_data
from kd.engine import distributed
from kd.engine.runtime import Runtime, resolve_compile, resolve_device, resolve_precision
from kd.errors import UserError
from kd.experiment.config import split_method_settings
from kd.methods import METHODS, REFERENCE
from kd.results.metrics import model_cost
from kd.results.record import DEFAULT, TUNED, ModelCost
from kd.tuning.outcome import Tuned
from models import ModelSpec, build_model, check_image_size, find_stages, model_spec, num_outputs
from models.weights import InputStats, ensure_available, input_stats, read_weights_file

log = logging.getLogger("kd")


@dataclass
class Setup:
    """What every run of an experiment shares, all known once `prepare` has checked the config and the data."""
    config: dict          # validated
    data: ImageData
    runtime: Runtime
    teacher_spec: ModelSpec
    student_spec: ModelSpec
    normalization: str    # where the input normalisation comes from, for the plan
    teacher_stats: InputStats | None = None  # what the teacher's weights expect, when they expect something
    teacher_file: tuple[dict, dict | None] | None = None  # (state_dict, meta) of teacher.checkpoint
    logs: Path = Path("logs")
    checkpoints: Path = Path("checkpoints")
    tuned: Tuned | None = None  # set once tuning has chosen (`with_tuned`): the final runs' settings
    _costs: dict = field(default_factory=dict, init=False, repr=False)
    _plain: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def stem(self) -> str:
        return self.student_spec.stem

    def cost(self, arch: str, model: torch.nn.Module) -> ModelCost:
        """Params, FLOPs and latency of an architecture, measured once per experiment."""
        if arch not in self._costs:
            self._costs[arch] = model_cost(model, self.data.image_size, self.runtime)
        return self._costs[arch]

    @property
    def common_student(self) -> dict:
        """The student config every method shares: STUDENT_CONFIG, with the tuned recipe once there is one."""
        return {**self.config["student"], **(self.tuned.recipe if self.tuned else {})}

    def variants(self) -> list[str]:
        """The variants the runs train in: "" without tuning; tuned and default after it."""
        return [TUNED, DEFAULT] if self.tuned else [""]

    def methods_in(self, variant: str) -> list[str]:
        """The methods that train in a variant: at their defaults only those whose tuning chose otherwise (the
        reference's defaults are your recipe)."""
        methods = self.config["experiment"]["methods"]
        if variant != DEFAULT:
            return methods
        return [m for m in methods if self.tuned.changed(m, self.config["methods"][m])
                or (m == REFERENCE and self.common_student != self.config["student"])]

    def method_entry(self, method: str, variant: str = "") -> dict:
        """A method's METHODS_CONFIG entry in a variant: the tuned one has its chosen settings."""
        chosen = self.tuned.settings.get(method, {}) if variant == TUNED else {}
        return {**self.config["methods"][method], **chosen}

    def student_settings(self, method: str, variant: str = "") -> tuple[dict, dict, ModelSpec]:
        """(loss settings as its Distiller gets them, student config, model spec) of a method: the common student
        unless its entry in METHODS_CONFIG overrides student keys; an unset epoch share is its epochs."""
        settings, overrides = split_method_settings(self.method_entry(method, variant), METHODS[method])
        # the reference has no settings of its own: at its defaults it trains with your recipe
        common = self.config["student"] if (method, variant) == (REFERENCE, DEFAULT) else self.common_student
        cfg = {**common, **overrides}
        spec = self.student_spec if cfg == common else self.spec(cfg)
        return METHODS[method].resolve(settings, cfg["epochs"]), cfg, spec

    def own_settings(self, method: str) -> dict:
        """The student keys a method sets to values other than the common student's (empty: common protocol)."""
        _, overrides = split_method_settings(self.config["methods"][method], METHODS[method])
        return {k: v for k, v in overrides.items() if v != self.common_student[k]}

    def spec(self, model_cfg: dict, stem: str | None = None) -> ModelSpec:
        return model_spec(model_cfg, self.data.image_size, stem or self.config["experiment"]["stem"])

    def build(self, spec: ModelSpec, with_weights: bool = True) -> torch.nn.Module:
        """A model of this experiment, for this data set's classes."""
        return build_model(spec, len(self.data.class_names), with_weights)

    def plain(self, spec: ModelSpec) -> torch.nn.Module:
        """One randomly initialised model per spec, kept while the plan is checked (probes, estimate)."""
        if spec not in self._plain:
            self._plain[spec] = self.build(spec, with_weights=False)
        return self._plain[spec]

    def with_tuned(self, tuned: Tuned) -> Setup:
        """This setup for the final runs of a tuned experiment."""
        return self._replace(tuned=tuned)

    def on(self, runtime: Runtime) -> Setup:
        """This setup computing on another runtime (a resumed experiment's precision), its checked models kept."""
        return self._replace(runtime=runtime)

    def _replace(self, **changes) -> Setup:
        moved = dataclasses.replace(self, **changes)
        moved._plain.update(self._plain)
        moved._costs.update(self._costs)
        return moved

    def planned(self) -> None:
        """The plan is checked: the models built for it are no longer needed."""
        self._plain.clear()


def prepare(config: dict, decode_all: bool = False) -> Setup:
    """Pick device and precision, check/load the data set and check both models for a validated config
    (`decode_all`: read every image once even when the set is too big to keep in memory, as --check does)."""
    exp, teacher_cfg, student_cfg = config["experiment"], config["teacher"], config["student"]
    device = resolve_device(distributed.init(exp["device"], exp["parallel"]))
    runtime = Runtime(device, resolve_precision(exp["precision"], device), channels_last=device.type != "mps",
                      compile=resolve_compile(exp["compile"]))
    if runtime.compile and distributed.world_size() > 1 and not distributed.spreads_runs():
        raise UserError("experiment.compile with --parallel data (DDP over several processes) is not tested yet: "
                        "use --parallel runs, or set experiment.compile to false")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed image and batch sizes: pick the fastest kernels
    teacher_file = read_weights_file(teacher_cfg["checkpoint"]) if teacher_cfg["checkpoint"] else None
    teacher_meta = teacher_file[1] if teacher_file else None
    # the weights' own expectations come before the data's: first the student's, then the teacher's
    provisional = exp["image_size"] if exp["image_size"] != "auto" else 0
    student_stats = input_stats(model_spec(student_cfg, provisional, exp["stem"]))
    teacher_stats = input_stats(model_spec(teacher_cfg, provisional, exp["stem"]), teacher_meta)
    expected = student_stats or teacher_stats
    image_size = exp["image_size"]
    if image_size == "auto" and expected is not None and expected.size:
        image_size = expected.size
    if cifar_name(exp["data_dir"]):
        data = load_cifar(exp["data_dir"], image_size, exp["hflip"], exp["cifar_val_images"])
    else:
        data = load_image_data(exp["data_dir"], image_size, exp["hflip"], exp["cache_max_gb"],
                               exp["num_workers"], exp["skip_bad_images"], decode_all)
    if exp["tune"] and "test" not in data.splits:  # a share of train/ selects, so that val/ can report
        data = hold_out(data, config["tune"]["holdout_fraction"], config["tune"]["holdout_seed"])
    processes = 1 if distributed.spreads_runs() else distributed.world_size()  # processes sharing a run
    if data.counts["train"] // processes < 2:  # BatchNorm trains on batches of at least 2 images
        raise UserError(f"the train split has {data.counts['train']} image(s), too few for {processes} "
                        "process(es): each needs at least 2; add images or start fewer processes")
    normalization = "computed on the train split"
    if expected is not None:
        data.mean, data.std = list(expected.mean), list(expected.std)
        normalization = f"from {expected.origin}"
    if data.keep_on(device):
        log.info("Decoded images kept on %s for the whole experiment", device)
    teacher_stem = teacher_meta.get("stem") if teacher_meta and teacher_meta.get("stem") in ("cifar", "imagenet") \
        else exp["stem"]
    setup = Setup(config, data, runtime, model_spec(teacher_cfg, data.image_size, teacher_stem),
                  model_spec(student_cfg, data.image_size, exp["stem"]), normalization, teacher_stats=teacher_stats,
                  teacher_file=teacher_file, logs=Path(exp["logs_dir"]), checkpoints=Path(exp["checkpoints_dir"]))
    check_models(setup)
    return setup


def check_models(setup: Setup) -> None:
    """Before anything is trained or written: starting weights at hand, image size, stages for the methods."""
    data, methods = setup.data, setup.config["experiment"]["methods"]
    student_specs = {setup.student_settings(m)[2] for m in methods}
    for spec in [setup.teacher_spec, *student_specs]:
        stats = input_stats(spec)
        if stats is not None and data.image_size < stats.min_size:
            raise UserError(f"{spec.name} with weights {spec.weights} needs image_size >= {stats.min_size} "
                            f"(now {data.image_size}): set experiment.image_size")
        if distributed.is_main():  # one download into the shared cache, then every process reads it
            ensure_available(spec)
        distributed.barrier()
        if not distributed.is_main():
            ensure_available(spec)
        num_outputs(setup.plain(spec))  # a model without a single Linear classifier is refused here
        check_image_size(setup.plain(spec), spec.name, data.image_size)
    teacher = setup.plain(setup.teacher_spec)
    for method in methods:
        settings, _, spec = setup.student_settings(method)
        distiller_cls, student = METHODS[method].distiller, setup.plain(spec)
        lacking = [(role, model_spec.name) for role, model_spec, model in
                   (("student", spec, student), ("teacher", setup.teacher_spec, teacher))
                   if role in distiller_cls.needs_stages and not find_stages(model)]
        if lacking:
            role, name = lacking[0]
            working = [name for name, other in METHODS.items() if role not in other.distiller.needs_stages]
            raise UserError(f"{method} needs feature maps of the {role}, which {name} does not have (a transformer's "
                            f"patch tokens, or maps the stage probe cannot size): run {', '.join(working)} with it "
                            f"(--methods), or choose a CNN {role}")
        # built once on the plain models, so that a setting that cannot work stops here (e.g. hint_layer)
        distiller_cls(student, teacher if distiller_cls.needs_teacher else None, **settings).close()

"""The steps of an experiment that final.main strings together: data, device and models, one method run."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kd import METHODS, distributed
from kd.batches import ImageData
from kd.config import UserError, method_keys, split_method_settings
from kd.data import load_image_data
from kd.metrics import model_cost, prediction_metrics
from kd.runtime import Runtime, resolve_device, resolve_precision
from kd.trainer import Evaluation, RunFailed, RunSpec, fit_together
from models import ModelSpec, build_model, check_image_size, find_stages, model_spec, num_outputs, pair_stages
from models.weights import InputStats, ensure_available, input_stats, read_weights_file

log = logging.getLogger("kd")


def file_tag(name: str) -> str:
    """A model name as it appears in file and run names ("timm/resnet10t" -> "timm-resnet10t")."""
    return name.replace("/", "-")


@dataclass
class Setup:
    """What every run of an experiment shares."""
    config: dict          # validated
    data: ImageData
    runtime: Runtime
    teacher_spec: ModelSpec
    student_spec: ModelSpec
    normalization: str    # where the input normalisation comes from, for the plan
    teacher_stats: InputStats | None = None  # what the teacher's weights expect, when they expect something
    teacher_file: tuple[dict, dict | None] | None = None  # (state_dict, meta) of teacher.checkpoint
    teacher_start: dict | None = None  # its state_dict, checked and fitted to this data's classes
    logs: Path = Path("logs")
    checkpoints: Path = Path("checkpoints")
    stamp: str = ""       # the experiment folder's timestamp, used in TensorBoard run names
    exp_dir: Path | None = None
    teacher_predictions: torch.Tensor | None = None  # the teacher's val top-1, for agreement
    _costs: dict = field(default_factory=dict, init=False, repr=False)
    _plain: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def stem(self) -> str:
        return self.student_spec.stem

    def resume_path(self, name: str, seed: int) -> Path:
        """Where a run keeps its state between epochs (removed once its record is written)."""
        return self.exp_dir / "resume" / f"{name}_seed{seed}.pt"

    def cost(self, arch: str, model: torch.nn.Module) -> dict:
        """Params, FLOPs and latency of an architecture, measured once per experiment."""
        if arch not in self._costs:
            self._costs[arch] = model_cost(model, self.data.image_size, self.runtime)
        return self._costs[arch]

    def student_settings(self, method: str) -> tuple[dict, dict, ModelSpec]:
        """(loss settings, student config, model spec) of a method: the common student unless its entry in
        METHODS_CONFIG overrides student keys."""
        settings, overrides = split_method_settings(self.config["methods"][method], method_keys(METHODS[method]))
        cfg = {**self.config["student"], **overrides}
        spec = self.student_spec if cfg == self.config["student"] else self.spec(cfg)
        return settings, cfg, spec

    def own_settings(self, method: str) -> dict:
        """The student keys a method sets to values other than the common student's (empty: common protocol)."""
        _, overrides = split_method_settings(self.config["methods"][method], method_keys(METHODS[method]))
        return {k: v for k, v in overrides.items() if v != self.config["student"][k]}

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

    def planned(self) -> None:
        """The plan is checked: the models built for it are no longer needed."""
        self._plain.clear()


def prepare(config: dict, decode_all: bool = False) -> Setup:
    """Pick device and precision, check/load the data set and check both models for a validated config
    (`decode_all`: read every image once even when the set is too big to keep in memory, as --check does)."""
    exp, teacher_cfg, student_cfg = config["experiment"], config["teacher"], config["student"]
    device = resolve_device(distributed.init(exp["device"], exp["parallel"]))
    runtime = Runtime(device, resolve_precision(exp["precision"], device), channels_last=device.type != "mps")
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
    data = load_image_data(exp["data_dir"], image_size, exp["hflip"], exp["cache_max_gb"],
                           exp["num_workers"], exp["skip_bad_images"], decode_all)
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
        distiller_cls, student = METHODS[method], setup.plain(spec)
        lacking = [(role, model_spec.name) for role, model_spec, model in
                   (("student", spec, student), ("teacher", setup.teacher_spec, teacher))
                   if role in distiller_cls.needs_stages and not find_stages(model)]
        if lacking:
            role, name = lacking[0]
            working = [m for m in METHODS if role not in METHODS[m].needs_stages]
            raise UserError(f"{method} needs feature maps of the {role}, which {name} does not have (a transformer's "
                            f"patch tokens, or maps the stage probe cannot size): run {', '.join(working)} with it "
                            f"(--methods), or choose a CNN {role}")
        # built once on the plain models, so that a setting that cannot work stops here (e.g. hint_layer)
        distiller_cls(student, teacher if distiller_cls.needs_teacher else None, **settings).close()


def _stage_lines(role: str, spec: ModelSpec, setup: Setup) -> tuple[list[str], list]:
    model = setup.plain(spec)
    stages = find_stages(model)
    if not stages:
        return [f"  {role} stages: none (no feature maps at growing strides, e.g. a transformer)"], stages
    sizes = check_image_size(model, spec.name, setup.data.image_size)
    described = ", ".join(f"{s.module} {s.channels}ch {size}x{size}" for s, size in zip(stages, sizes))
    return [f"  {role} stages at {setup.data.image_size} px: {described}"], stages


def _weights_text(spec: ModelSpec) -> str:
    return "from scratch" if spec.weights is None else f"weights {spec.weights}"


def describe_plan(setup: Setup) -> str:
    config, data, exp = setup.config, setup.data, setup.config["experiment"]
    teacher_cfg, student_cfg = config["teacher"], config["student"]
    t_spec, s_spec = setup.teacher_spec, setup.student_spec
    counts = ", ".join(f"{split} {n}" for split, n in data.counts.items())
    if teacher_cfg["checkpoint"]:
        teacher_start = (f"checkpoint {teacher_cfg['checkpoint']}, "
                         + ("used as it is" if teacher_cfg["epochs"] == 0 else f"fine-tuned {teacher_cfg['epochs']} epochs"))
    else:
        teacher_start = f"{_weights_text(t_spec)}, {teacher_cfg['epochs']} epochs"
    teacher_lines, teacher_stages = _stage_lines("teacher", t_spec, setup)
    student_lines, student_stages = _stage_lines("student", s_spec, setup)
    lines = [
        f"data: {data.root} - {len(data.class_names)} classes ({', '.join(data.class_names[:12])}"
        f"{', ...' if len(data.class_names) > 12 else ''}); images: {counts}; "
        f"{data.ignored_files} non-image file(s) ignored",
        f"images: {data.image_size}x{data.image_size} px, horizontal flip {'on' if exp['hflip'] else 'off'}; "
        f"normalisation {setup.normalization}",
        f"device: {setup.runtime.device}, precision {setup.runtime.precision}",
        f"teacher: {t_spec.name} ({t_spec.source} {t_spec.builder}, {t_spec.stem} stem), {teacher_start}",
        *teacher_lines,
        f"students: {s_spec.name} ({s_spec.source} {s_spec.builder}, {s_spec.stem} stem), {_weights_text(s_spec)}, "
        f"{student_cfg['epochs']} epochs, methods {', '.join(exp['methods'])}, seeds {', '.join(map(str, exp['seeds']))}",
        *student_lines,
    ]
    if teacher_stages and student_stages:
        how = "stage by stage" if len(teacher_stages) == len(student_stages) else "by stride"
        pairs = ", ".join(f"{student_stages[i].module}<-{teacher_stages[j].module}"
                          for i, j in pair_stages(student_stages, teacher_stages))
        lines.append(f"  feature pairs (student<-teacher, {how}): {pairs}")
    for spec in (t_spec, s_spec):
        stats = input_stats(spec)
        if stats is not None and stats.size and data.image_size < stats.size:
            lines.append(f"note: {spec.name}'s weights were evaluated at {stats.size} px; this run uses "
                         f"{data.image_size} px (experiment.image_size)")
    student, teacher = setup.plain(s_spec), setup.plain(t_spec)
    notes = dict.fromkeys(note for method in exp["methods"] for note in METHODS[method].plan_notes(student, teacher))
    lines += [f"note: {note}" for note in notes]
    for method in exp["methods"]:
        own = setup.own_settings(method)
        if own:
            lines.append(f"note: {method} trains its own student ({', '.join(f'{k}={v}' for k, v in own.items())}): "
                         "not under the common protocol, so its gain gets no p-value")
    return "\n".join(lines)


def model_meta(spec: ModelSpec, setup: Setup, stats: InputStats | None = None) -> dict:
    """What a checkpoint says about its model: enough to rebuild the plain library model and to check reuse."""
    data = setup.data
    mean, std = (list(stats.mean), list(stats.std)) if stats is not None else (data.mean, data.std)
    return {"arch": spec.name, "source": spec.source, "builder": spec.builder, "weights": spec.weights,
            "num_classes": len(data.class_names), "class_names": data.class_names, "image_size": data.image_size,
            "stem": spec.stem, "mean": mean, "std": std, "data_fingerprint": data.fingerprint,
            "torch_version": str(torch.__version__)}


def complete_record(record: dict, result: dict, evaluation: Evaluation, setup: Setup, model: torch.nn.Module
                    ) -> dict:
    """Add the run's results, its best epoch's prediction metrics and the model's cost to a record."""
    record.update(result)
    record.update(prediction_metrics(evaluation.probs, evaluation.labels, setup.teacher_predictions))
    record.update(setup.cost(record["model"], model))
    return record


def method_groups(methods: list[str], share_teacher: bool,
                  own_settings: Callable[[str], dict] = lambda method: {}) -> list[list[str]]:
    """The order runs are trained in: with `share_teacher`, all teacher-based methods on the common student
    form one group (trained together where the first of them stands); every other method trains alone."""
    teacher_based = ([m for m in methods if METHODS[m].needs_teacher and not own_settings(m)]
                     if share_teacher else [])
    groups: list[list[str]] = []
    for method in methods:
        if method not in teacher_based:
            groups.append([method])
        elif method == teacher_based[0]:
            groups.append(teacher_based)
    return groups


def groups_to_train(setup: Setup, records: Sequence[dict] = ()) -> list[tuple[int, list[str]]]:
    """Seed by seed, the methods trained together (`method_groups`) in training order, less the runs that
    `records` already hold (finished before an interruption)."""
    exp = setup.config["experiment"]
    finished = {(r["method"], r["seed"]) for r in records}
    todo = []
    for seed in exp["seeds"]:
        for group in method_groups(exp["methods"], exp["share_teacher"], setup.own_settings):
            group = [m for m in group if (m, seed) not in finished]
            if group:
                todo.append((seed, group))
    return todo


def run_methods(methods: list[str], seed: int, setup: Setup, teacher: torch.nn.Module) -> list[dict]:
    """Train one student per method (several in one pass over the data) and return their records.

    Every method of the group starts from the same weights: the student built from the seed (library
    init or starting weights, and a new classifier drawn from the seed).
    """
    config = setup.config
    seed_tag = f"_seed{seed}" if len(config["experiment"]["seeds"]) > 1 else ""
    _, first_cfg, first_spec = setup.student_settings(methods[0])
    torch.manual_seed(seed)
    init_state = setup.build(first_spec).state_dict()
    jobs, records = [], []
    for method in methods:
        settings, cfg, spec = setup.student_settings(method)
        distiller_cls, tag = METHODS[method], file_tag(spec.name)
        student = setup.build(spec, with_weights=False)
        student.load_state_dict(init_state)  # the same starting weights for every method in this seed
        torch.manual_seed(seed + 1)  # extra modules (regressor, heads, peers) also start alike per seed
        distiller = distiller_cls(student, teacher if distiller_cls.needs_teacher else None, **settings)
        run_spec = RunSpec(method, cfg, seed, setup.logs / method / f"{method}_{tag}_Final_{setup.stamp}{seed_tag}",
                           setup.checkpoints / "students" / f"{method}_{tag}{seed_tag}",
                           {**model_meta(spec, setup), "method": method, "seed": seed, "epochs": cfg["epochs"],
                            "config": {**cfg, **settings}}, setup.resume_path(method, seed))
        jobs.append((distiller, run_spec))
        column = setup.teacher_spec.name if distiller_cls.needs_teacher else distiller_cls.teacher_column
        own = setup.own_settings(method)
        records.append({"method": method, "model": spec.name, "teacher": column, "seed": seed, "status": "ok",
                        "protocol": "own: " + ", ".join(f"{k}={v}" for k, v in own.items()) if own else "common"})
        log.info("Training %s student %s with %s (seed %d)", spec.name, method, settings or "CE only", seed)
    if len(jobs) > 1:
        log.info("%s train together, sharing one teacher forward per batch (--no-share-teacher: one by one)",
                 ", ".join(methods))
    try:
        outcomes = fit_together(jobs, setup.data, setup.runtime)
    finally:
        for distiller, _ in jobs:
            distiller.close()
    for record, (distiller, _), outcome in zip(records, jobs, outcomes):
        if isinstance(outcome, RunFailed):
            log.error("%s failed: %s", record["method"], outcome)
            record.update(status="failed", reason=str(outcome))
        else:
            result, best_val = outcome
            complete_record(record, result, best_val, setup, distiller.student)
    return records


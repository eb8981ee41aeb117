"""The plan of an experiment: what it says before training (data, models, stages, notes), and the order in
which its runs train."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, NamedTuple

from kd.data.holdout import split_roles
from kd.experiment.presets import describe_pair_settings
from kd.experiment.setup import Setup
from kd.methods import METHODS
from kd.results.record import RunRecord
from models import ModelSpec, check_image_size, find_stages, pair_stages
from models.weights import input_stats


def _stage_lines(role: str, spec: ModelSpec, setup: Setup) -> tuple[list[str], list]:
    model = setup.plain(spec)
    stages = find_stages(model)
    if not stages:
        return [f"  {role} stages: none (no feature maps at growing strides, e.g. a transformer)"], stages
    sizes = check_image_size(model, spec.name, setup.data.image_size)
    described = ", ".join(f"{s.module} {s.channels}ch {size}x{size}" for s, size in zip(stages, sizes))
    return [f"  {role} stages at {setup.data.image_size} px: {described}"], stages


def _parameters(setup: Setup, spec: ModelSpec) -> str:
    """The model's size as the papers' tables give it (millions of parameters, with this run's classifier)."""
    return f"{sum(p.numel() for p in setup.plain(spec).parameters()) / 1e6:.2f}M parameters"


def _model_text(setup: Setup, spec: ModelSpec) -> str:
    return f"{spec.name} ({spec.source} {spec.builder}, {spec.stem} stem, {_parameters(setup, spec)})"


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
        f"device: {setup.runtime.device}, precision {setup.runtime.precision}"
        f"{', steps compiled (torch.compile)' if setup.runtime.compile else ''}",
        f"teacher: {_model_text(setup, t_spec)}, {teacher_start}",
        *teacher_lines,
        f"students: {_model_text(setup, s_spec)}, {_weights_text(s_spec)}, {student_cfg['epochs']} epochs, "
        f"methods {', '.join(exp['methods'])}, seeds {', '.join(map(str, exp['seeds']))}",
        *student_lines,
    ]
    if exp["tune"] or data.official is not None:
        lines.append(split_roles(data, tuning=exp["tune"]))
    for role in ("teacher", "student"):
        epochs, steps = config[role]["epochs"], config[role]["step_size"]
        if config[role]["scheduler"] == "step" and isinstance(steps, list) and 0 < epochs <= min(steps):
            lines.append(f"note: {role}.step_size {steps}: no lr step falls within its {epochs} epochs; give epochs "
                         "of this run (e.g. the same shares of it)")
    pair_line = describe_pair_settings(config) if exp["preset"] == "cifar100" else None
    if pair_line:
        lines.append(pair_line)
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
    notes = dict.fromkeys(note for method in exp["methods"]
                          for note in METHODS[method].distiller.plan_notes(student, teacher))
    lines += [f"note: {note}" for note in notes]
    for method in exp["methods"]:
        own = setup.own_settings(method)
        if own:
            size = f", {_parameters(setup, setup.student_settings(method)[2])}" if "model" in own else ""
            lines.append(f"note: {method} trains its own student ({', '.join(f'{k}={v}' for k, v in own.items())}"
                         f"{size}): not under the common protocol, so its gain gets no p-value")
        settings, student_cfg, _ = setup.student_settings(method)
        for key, share in METHODS[method].epoch_shares.items():
            if config["methods"][method][key] is None:
                lines.append(f"note: {method}: {key} {settings[key]} of its {student_cfg['epochs']} epochs "
                             f"({share.source}); set methods.{method}.{key} to choose")
    return "\n".join(lines)


def method_groups(methods: list[str], share_teacher: bool,
                  own_settings: Callable[[str], dict] = lambda method: {}) -> list[list[str]]:
    """The order runs are trained in: with `share_teacher`, all teacher-based methods on the common student
    form one group (trained together where the first of them stands); every other method trains alone."""
    teacher_based = ([m for m in methods if METHODS[m].distiller.needs_teacher and not own_settings(m)]
                     if share_teacher else [])
    groups: list[list[str]] = []
    for method in methods:
        if method not in teacher_based:
            groups.append([method])
        elif method == teacher_based[0]:
            groups.append(teacher_based)
    return groups


class RunGroup(NamedTuple):
    """Runs trained together: methods of one seed, in one variant of a tuned experiment ("" otherwise)."""
    seed: int
    methods: list[str]
    variant: str = ""


def groups_to_train(setup: Setup, records: Sequence[RunRecord] = ()) -> list[RunGroup]:
    """Seed by seed (and variant by variant), the methods trained together (`method_groups`) in training order,
    less the runs that `records` already hold (finished before an interruption)."""
    exp = setup.config["experiment"]
    finished = {(r.method, r.variant, r.seed) for r in records}
    todo = []
    for seed in exp["seeds"]:
        for variant in setup.variants():
            for group in method_groups(setup.methods_in(variant), exp["share_teacher"], setup.own_settings):
                group = [m for m in group if (m, variant, seed) not in finished]
                if group:
                    todo.append(RunGroup(seed, group, variant))
    return todo

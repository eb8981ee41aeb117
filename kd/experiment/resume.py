"""Finding an unfinished experiment and checking that it may be continued with the given settings."""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

from kd.engine.runtime import Runtime, trains_well_in
from kd.errors import UserError
from kd.results.files import read_experiment
from kd.results.record import RunRecord

log = logging.getLogger("kd")

# Settings that do not change results on the same machine; everything else must match to resume.
FREE_TO_CHANGE = {"device", "num_workers", "cache_max_gb", "logs_dir", "checkpoints_dir", "retrain_teacher",
                  "skip_bad_images", "share_teacher", "parallel"}


def find_unfinished(logs_dir: Path, which: str | None) -> tuple[Path, list[RunRecord], dict]:
    """The experiment folder to continue (`which`, or the newest unfinished one), its records and summary."""
    if which:
        exp_dir = Path(which)
        records, summary = read_experiment(exp_dir)
        if summary.get("finished"):
            raise UserError(f"experiment '{exp_dir}' already finished: nothing to resume (its results are there)")
        return exp_dir, records, summary
    for exp_dir in sorted(logs_dir.glob("final_experiment_*"), key=lambda p: p.stat().st_mtime, reverse=True):
        if (exp_dir / "experiment_summary.json").exists():
            records, summary = read_experiment(exp_dir)
            if not summary.get("finished"):
                return exp_dir, records, summary
    raise UserError(f"--resume: no unfinished experiment in '{logs_dir}'; start a new one without --resume "
                    "(or name the folder: --resume logs/final_experiment_...)")


def upgrade(stored: dict, defaults: dict) -> dict:
    """The config of an experiment begun by an earlier version (read back to --resume it), with the sections,
    keys and methods added since at their `defaults`, each of which keeps what that version did (no tuning, no
    preset, no compiling; a new method is not among its runs), so that it compares equal to the config that
    continues it."""
    config = copy.deepcopy(stored)
    for section, values in defaults.items():
        config.setdefault(section, {})
        for key, value in values.items():
            if section == "methods":  # a method registered since, or a setting a method gained since
                for setting, default in value.items():
                    config["methods"].setdefault(key, {}).setdefault(setting, default)
            else:
                config[section].setdefault(key, value)
    return config


def first_difference(stored: dict, current: dict, path: str = "") -> str | None:
    """The first setting that differs between two configs (ignoring FREE_TO_CHANGE), as words."""
    for key in sorted(set(stored) | set(current), key=str):
        if key in FREE_TO_CHANGE and path == "experiment":
            continue
        where = f"{path}.{key}" if path else str(key)
        old, new = stored.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            difference = first_difference(old, new, where)
            if difference:
                return difference
        elif old != new:
            return f"{where} was {old!r}, now {new!r}"
    return None


def kept_precision(runtime: Runtime, started_in: str, exp_dir: Path) -> Runtime:
    """The runtime to continue an experiment with: the precision it started in, also where "auto" now
    resolves to another one (another device), since a run must not change precision halfway through.
    A device that cannot train in that precision, or only emulates it (bf16 without native support), is
    refused."""
    if started_in == runtime.precision:
        return runtime
    if not trains_well_in(started_in, runtime.device):
        raise UserError(f"cannot resume {exp_dir}: it trains in {started_in}, which {runtime.device} cannot run "
                        "(or only emulates); resume it on a device like the one it started on, or start a new "
                        "experiment")
    log.info("Resuming in %s, the precision this experiment started in (auto would pick %s on %s)",
             started_in, runtime.precision, runtime.device)
    return dataclasses.replace(runtime, precision=started_in)

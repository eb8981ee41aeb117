"""Command line for the knowledge-distillation comparison (see README.md, or run with --help)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EPILOG = """examples:
  python run_experiment.py --demo                  # digits demo, offline (~15 min on a 2-core CPU)
  python run_experiment.py                         # your images in data/train/<class>/, data/val/<class>/
  python run_experiment.py --data ~/flowers --methods KD,AT --student-epochs 20
  python run_experiment.py --check                 # validate data and config, train nothing
  python run_experiment.py --resume                # continue the latest interrupted experiment
  python run_experiment.py --demo --seeds 0,1,2    # three seeds: mean ± std and paired tests
  python run_experiment.py --report logs/final_experiment_20260101_120000   # redraw its report
  python run_experiment.py --set student.lr=0.05 --set methods.KD.temperature=2
  python run_experiment.py --demo --tune --methods Baseline,KD,AT,DIST   # tuned fairly, reported on held-out data
  python run_experiment.py --preset cifar100 --data cifar100:~/cifar   # the published CIFAR-100 table
  torchrun --nproc_per_node=4 run_experiment.py --parallel runs --seeds 0,1,2   # one whole run per GPU

The settings themselves live in the dicts at the top of final.py.
Results: logs/final_experiment_YYYYMMDD_HHMMSS/; curves: tensorboard --logdir logs/
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit code 2, as for every other bad input
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Train (or load) a teacher, then students with Baseline and the distillation "
                            "methods (KD, AT, FitNets, DML, BYOT, DKD, DIST, CRD, ReviewKD ...) under the same "
                            "conditions, and compare them. Any torchvision or timm model.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true",
                   help="run on scikit-learn's bundled digits (exported to data/digits/), with a quick preset")
    p.add_argument("--preset", choices=["cifar100"],
                   help="cifar100: the published CIFAR-100 tables' recipe and pair (resnet32x4 -> resnet8x4, SGD lr "
                        "0.05, batch 64, 240 epochs, lr x 0.1 at 150/180/210, seeds 0,1,2) on cifar100:data/cifar100; "
                        "any key stays overridable (README, \"Reproducing the published CIFAR-100 table\")")
    p.add_argument("--data", metavar="DIR", help="data folder with train/ and val/ (optional test/); default: data")
    p.add_argument("--methods", metavar="A,B", help="comma-separated methods to run, case-insensitive, or all; "
                                                    "default: Baseline, KD, AT, FitNets, DML, BYOT")
    p.add_argument("--seeds", metavar="0,1,2", help="comma-separated seeds; every method runs once per seed")
    p.add_argument("--teacher-epochs", type=int, metavar="N", help="teacher training epochs")
    p.add_argument("--student-epochs", type=int, metavar="N", help="student training epochs (every method)")
    p.add_argument("--batch-size", type=int, metavar="N", help="batch size for teacher and students")
    p.add_argument("--device", metavar="NAME", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", metavar="P", help="auto, fp32, bf16 or fp16 (auto: the fastest safe choice)")
    p.add_argument("--resume", nargs="?", const="", metavar="EXPERIMENT_DIR",
                   help="continue the latest unfinished experiment (or the one named): finished runs are kept, "
                        "an interrupted run goes on from its last epoch")
    p.add_argument("--teacher-checkpoint", metavar="PATH",
                   help="your own teacher: a checkpoint of this project or a state_dict of teacher.model; with "
                        "--teacher-epochs 0 it is used as it is, else fine-tuned")
    p.add_argument("--retrain-teacher", action="store_true",
                   help="train a new teacher even if checkpoints/teachers/ holds one that fits")
    p.add_argument("--no-share-teacher", action="store_true",
                   help="train the teacher-based methods one by one, each with its own teacher forward")
    p.add_argument("--parallel", choices=["data", "runs"],
                   help="under torchrun: data (each run split over all processes, DDP) or runs (each process "
                        "trains whole runs, from a queue); default: data")
    p.add_argument("--tune", action="store_true",
                   help="tune the common recipe on Baseline, then each method's settings (Optuna, the same number "
                        "of trials each, chosen on val), then train every method at its chosen and at its default "
                        "settings with fresh seeds, reported on a split tuning never reads (TUNE_CONFIG, README)")
    p.add_argument("--skip-bad-images", action="store_true", help="warn about unreadable images and skip them")
    p.add_argument("--check", action="store_true", help="check data and config, print the plan, train nothing")
    p.add_argument("--report", metavar="EXPERIMENT_DIR",
                   help="rebuild the CSV, summary, plots and report.md of a finished experiment, train nothing")
    p.add_argument("--logs-dir", metavar="DIR", help="where experiment folders and TensorBoard runs go (logs)")
    p.add_argument("--checkpoints-dir", metavar="DIR", help="where checkpoints go (checkpoints)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. teacher.lr=0.05 or methods.AT.beta=500 (repeatable)")
    return p


def _int_list(text: str, flag: str) -> list[int]:
    from kd.errors import UserError
    try:
        return [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise UserError(f"{flag} '{text}' must be comma-separated integers, e.g. {flag} 0,1,2") from None


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> dict:
    """The final.py dicts (with the preset asked for) or `base`, then --set, then the dedicated flags."""
    import copy

    import final
    from kd.data.digits import export_digits_demo
    from kd.errors import UserError
    from kd.experiment.config import apply_overrides
    from kd.experiment.presets import table_pair_settings, use_table_models

    if args.demo and args.preset:
        raise UserError(f"--demo and --preset {args.preset} are two presets: choose one")
    preset = "demo" if args.demo else args.preset
    config = copy.deepcopy(base) if base is not None else final.default_config(preset)
    if base is None:  # the tables' settings for the pair (what --set asks for), where --set leaves them unset
        asked = copy.deepcopy(config)
        apply_overrides(asked, args.set)
        if asked["experiment"]["preset"] == "cifar100":
            final.merge(config, table_pair_settings(asked))
    apply_overrides(config, args.set)
    if config["experiment"]["preset"] == "cifar100":
        use_table_models(config)
    if args.seeds and (args.tune or config["experiment"]["tune"]):
        raise UserError("--seeds does not apply with --tune: trials train on tune.trial_seed and the final runs on "
                        "tune.final_seeds fresh seeds; set those (--set tune.final_seeds=5)")
    exp = config["experiment"]
    if args.demo:
        export_digits_demo(Path(exp["data_dir"]))
    flags = {("experiment", "data_dir"): args.data,
             ("experiment", "methods"): args.methods and [m for m in args.methods.split(",") if m.strip()],
             ("experiment", "seeds"): args.seeds and _int_list(args.seeds, "--seeds"),
             ("teacher", "epochs"): args.teacher_epochs, ("student", "epochs"): args.student_epochs,
             ("teacher", "checkpoint"): args.teacher_checkpoint,
             ("teacher", "batch_size"): args.batch_size, ("student", "batch_size"): args.batch_size,
             ("experiment", "device"): args.device, ("experiment", "precision"): args.precision,
             ("experiment", "logs_dir"): args.logs_dir, ("experiment", "checkpoints_dir"): args.checkpoints_dir,
             ("experiment", "retrain_teacher"): args.retrain_teacher or None,
             ("experiment", "skip_bad_images"): args.skip_bad_images or None,
             ("experiment", "share_teacher"): False if args.no_share_teacher else None,
             ("experiment", "parallel"): args.parallel, ("experiment", "tune"): args.tune or None}
    for (section, key), value in flags.items():
        if value is not None:
            config[section][key] = value
    return config


def cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kd.experiment.launch import exit_code
    return exit_code(lambda: _run(args))


def _run(args: argparse.Namespace) -> list[dict]:
    import final
    if args.report:
        from kd.results.files import rebuild
        from kd.results.table import format_table
        print(format_table(rebuild(args.report)))
        return []
    config = config_from_args(args)
    resume = None
    if args.resume is not None:  # continue with the stored settings; given flags must not change them
        from kd.experiment.resume import find_unfinished, upgrade
        resume = find_unfinished(Path(config["experiment"]["logs_dir"]), args.resume)
        # begun by an earlier version: the keys added since
        resume[2]["config"] = upgrade(resume[2]["config"], final.default_config())
        config = config_from_args(args, base=resume[2]["config"])
    return final.main(config, check_only=args.check, resume=resume)


# glibc's malloc returns freed memory to the system eagerly and serves big blocks with mmap, so every
# training step pays page faults for its activations again. Keeping the memory around made ResNet50
# training 1.6-1.8x faster on one 2-core CPU; on the Zen 1 machine of bench/RESULTS.md it cut the page
# faults but hardly the step time. Set GLIBC_TUNABLES yourself (even empty) to opt out.
MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296:"
                   "glibc.malloc.top_pad=268435456")


def with_malloc_tunables() -> None:
    """Re-execute this process with MALLOC_TUNABLES, once, where glibc reads them (Linux)."""
    if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES})


if __name__ == "__main__":
    with_malloc_tunables()
    sys.exit(cli())

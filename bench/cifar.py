"""The CIFAR-100 table's speed: KD resnet32x4 -> resnet8x4 under `--preset cifar100`, the project against the
plain loop, side by side on one device (the `cifar` step of bench/gpu_check.sh).

    python bench/cifar.py --device cuda           # the GPU check's step (a few minutes)
    python bench/cifar.py --device cpu --quick    # the same plumbing on a CPU, tiny

The data is a synthetic file in CIFAR-100's python format (random images, 100 classes): the real one is not
reachable from the GPU machines, and speed does not depend on the pixels. The teacher is a resnet32x4 with
random weights in the published checkpoints' layout ({"model": state_dict}), given as --teacher-checkpoint.
At batch 64 and at batch 128:
  project   run_experiment.py --preset cifar100 --methods KD, with 1, 2 and 4 runs sharing the device (torchrun
            --parallel runs); img/s of the runs' training steps, summed over the runs trained at once, after
            their first epoch (cuDNN's kernel search, compilation)
  compiled  the same with experiment.compile=true, one run (batch 64 only; not with --quick)
  plain     bench/plain_loop.py's KD step: torchvision's CIFAR100 dataset, per-sample transforms, a DataLoader,
            eager fp32
Projected from the best figures: one 240-epoch run (45,000 training images an epoch) and the whole table
(the preset's 10 methods x 3 seeds, each at KD's speed, and the teacher). The last line printed is a JSON
object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import final  # noqa: E402
from plain_loop import kd_step, measure_steps  # noqa: E402

TABLE_RUNS = len(final.CIFAR100_PRESET["experiment"]["methods"]) * len(final.CIFAR100_PRESET["experiment"]["seeds"])
EPOCH_IMAGES, EPOCHS = 45_000, 240  # the preset's training split (50,000 less 5,000 val) and schedule


def write_cifar100(root: Path, labels: dict[str, list[int]], image: Callable[[int], np.ndarray],
                   class_names: list[str]) -> Path:
    """A file set in CIFAR-100's python format under root/cifar-100-python: `labels` per split ("train",
    "test"), `image(label)` an HxWx3 uint8 array of 32 px."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, split_labels in labels.items():
        data = np.stack([image(k).transpose(2, 0, 1).reshape(-1) for k in split_labels])
        with open(folder / split, "wb") as file:
            pickle.dump({"data": data, "fine_labels": split_labels, "coarse_labels": [0] * len(split_labels)}, file)
    with open(folder / "meta", "wb") as file:
        pickle.dump({"fine_label_names": class_names, "coarse_label_names": ["all"]}, file)
    return root


def random_cifar100(root: Path, train_per_class: int, test_per_class: int) -> Path:
    rng = np.random.default_rng(0)
    labels = {split: [k for k in range(100) for _ in range(count)]
              for split, count in (("train", train_per_class), ("test", test_per_class))}
    return write_cifar100(root, labels, lambda _k: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                          [f"class{k}" for k in range(100)])


def teacher_file(path: Path) -> Path:
    from models.cifar import CIFAR_MODELS
    torch.manual_seed(0)
    torch.save({"epoch": 240, "model": CIFAR_MODELS["resnet32x4"](num_classes=100).state_dict()}, path)
    return path


def project(work: Path, args: argparse.Namespace, batch: int, runs: int, compiled: bool = False) -> float:
    """img/s of `runs` KD runs sharing the device, summed, after each run's first epoch."""
    logs = work / f"logs_{batch}_{runs}_{int(compiled)}"
    command = [str(REPO / "run_experiment.py"), "--preset", "cifar100", "--data", f"cifar100:{work}",
               "--methods", "KD", "--seeds", ",".join(map(str, range(runs))), "--device", args.device,
               "--batch-size", str(batch), "--teacher-checkpoint", str(work / "teacher.pth"), "--teacher-epochs", "0",
               "--student-epochs", str(args.epochs), "--logs-dir", str(logs), "--checkpoints-dir", str(work / "ckpt"),
               "--set", f"experiment.cifar_val_images={args.val_images}",
               "--set", f"experiment.compile={str(compiled).lower()}"]
    launcher = ([sys.executable] if runs == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={runs}"])
    threads = max(1, (os.cpu_count() or 2) // runs)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([*launcher, *command, *([] if runs == 1 else ["--parallel", "runs"])], env=env, cwd=work,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    (folder,) = logs.glob("final_experiment_*")
    records = [r for r in json.loads((folder / "comparison_results.json").read_text()) if r["method"] == "KD"]
    timed = lambda history: history[1:] or history  # noqa: E731 - after the first epoch, when there is one
    return sum(sum(e["images"] for e in timed(r["history"])) / sum(e["train_seconds"] for e in timed(r["history"]))
               for r in records)


def plain(work: Path, args: argparse.Namespace, batch: int) -> float:
    """img/s of bench/plain_loop.py's KD step on the same file, as the common CIFAR repositories load it."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from kd.data.cifar import unchecked
    from models.cifar import CIFAR_MODELS
    device = torch.device(args.device)
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(),
                                    transforms.Normalize((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))])
    dataset = unchecked(datasets.CIFAR100)(str(work), train=True, transform=transform)
    workers = min(8, os.cpu_count() or 2)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=True, pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    teacher = CIFAR_MODELS["resnet32x4"](num_classes=100).to(device)
    student = CIFAR_MODELS["resnet8x4"](num_classes=100).to(device)
    steps = max(2, len(loader) * (args.epochs - 1)) if args.epochs > 1 else len(loader)
    return measure_steps(kd_step(student, teacher), loader, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny file, 1 epoch, 1 and 2 runs (the CPU check)")
    parser.add_argument("--budget", type=float, default=float("inf"), metavar="S",
                        help="start no measurement after S seconds: report the figures measured by then")
    args = parser.parse_args()
    args.epochs, per_class, layouts, args.val_images = (1, 2, (1, 2), 100) if args.quick else (3, 100, (1, 2, 4), 500)
    work = Path(tempfile.mkdtemp(prefix="kd_bench_cifar_"))
    random_cifar100(work, per_class, max(1, per_class // 5))
    teacher_file(work / "teacher.pth")
    started, figures = time.perf_counter(), {"device": args.device, "batches": {}}
    for batch in (64, 128):
        measurements = {"plain": lambda: plain(work, args, batch), "runs_1": lambda: project(work, args, batch, 1)}
        if batch == 64 and not args.quick:  # on a CPU compiling takes minutes: the tests check it apart
            measurements["compiled_1"] = lambda: project(work, args, batch, 1, compiled=True)
        measurements.update({f"runs_{n}": lambda n=n: project(work, args, batch, n) for n in layouts[1:]})
        row = {key: round(measure(), 1) for key, measure in measurements.items()
               if time.perf_counter() - started < args.budget}
        if "runs_1" not in row:
            break
        row["vs_plain_1_run"] = round(row["runs_1"] / row["plain"], 2)
        figures["batches"][batch] = row
        print(f"batch {batch}: " + ", ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    if not figures["batches"]:
        sys.exit(f"no measurement started within --budget {args.budget} s")
    best = {batch: max(v for k, v in row.items() if k.startswith(("runs_", "compiled_")))
            for batch, row in figures["batches"].items()}
    one_run = max(row[key] for row in figures["batches"].values() for key in ("runs_1", "compiled_1") if key in row)
    shared = max(best.values())
    figures["projected_run_minutes"] = round(EPOCHS * EPOCH_IMAGES / one_run / 60, 1)
    figures["projected_table_hours"] = round((TABLE_RUNS + 1) * EPOCHS * EPOCH_IMAGES / shared / 3600, 2)
    figures["seconds"] = round(time.perf_counter() - started)
    print(f"one 240-epoch run: {figures['projected_run_minutes']} min; the table ({TABLE_RUNS} runs and the "
          f"teacher, at KD's speed): {figures['projected_table_hours']} h", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

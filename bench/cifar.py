"""The CIFAR-100 table's speed: KD resnet32x4 -> resnet8x4 under `--preset cifar100`, the project against the
plain loop, side by side on one device (the `cifar` step of bench/gpu_check.sh).

    python bench/cifar.py --device cuda --budget 150   # the GPU check's step
    python bench/cifar.py --device cpu --quick         # the same plumbing on a CPU, tiny

The data is a synthetic file in CIFAR-100's python format (random images, 100 classes): the real one is not
reachable from the GPU machines, and speed does not depend on the pixels. The teacher is a resnet32x4 with
random weights in the published checkpoints' layout ({"model": state_dict}), given as --teacher-checkpoint.
Measured, in this order, each in its own process(es), until the budget is spent:
  batch 64   plain, runs_1, runs_2, runs_4, then compiled_1 (not with --quick)
  batch 128  runs_1, runs_4, plain
where
  plain       bench/plain_loop.py's KD step: torchvision's CIFAR100 dataset, per-sample transforms, a DataLoader,
              eager fp32 (at most PLAIN_STEPS steps)
  runs_N      run_experiment.py --preset cifar100 --methods KD with N runs sharing the device (torchrun --parallel
              runs): the runs' own training-step img/s after their first epoch (cuDNN's kernel search,
              compilation), summed: torchrun starts the runs together, so they train side by side; and
              runs_N_wall, every image trained over the command's wall time (start-up and evaluation included)
  compiled_1  runs_1 with experiment.compile=true
A measurement that fails or runs past the budget is reported as such; the others stand. Projected from batch 64
(the preset's): one 240-epoch run (45,000 training images an epoch) at the best one-run speed, and the table
(the preset's 10 methods x 3 seeds, and the teacher, each at KD's speed) at the best shared speed; training
steps only, without evaluation and start-up. A JSON line with every figure so far follows each measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
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
from run_worker import launcher  # noqa: E402

TABLE_RUNS = len(final.CIFAR100_PRESET["experiment"]["methods"]) * len(final.CIFAR100_PRESET["experiment"]["seeds"])
EPOCH_IMAGES, EPOCHS = 45_000, 240  # the preset's training split (50,000 less 5,000 val) and schedule
PLAIN_STEPS = 150


class Failed(Exception):
    """A measurement that did not finish; its reason goes into the figures."""


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


def _run(command: list[str], env: dict[str, str], cwd: Path, timeout: float) -> None:
    """Run `command` in its own process group; past `timeout`, kill the whole group (torchrun's workers too)."""
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, err = process.communicate(timeout=None if timeout == float("inf") else max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise Failed(f"past the budget ({timeout:.0f} s left)") from None
    if process.returncode != 0:
        raise Failed(f"exit {process.returncode}: {(err.strip().splitlines() or ['?'])[-1][:150]}")


def project(work: Path, args: argparse.Namespace, batch: int, runs: int, compiled: bool = False,
            timeout: float = float("inf")) -> dict[str, float]:
    """{"steps": summed img/s of the runs' training steps after their first epoch, "wall": images / wall s}."""
    logs = work / f"logs_{batch}_{runs}_{int(compiled)}"
    command = [str(REPO / "run_experiment.py"), "--preset", "cifar100", "--data", f"cifar100:{work}",
               "--methods", "KD", "--seeds", ",".join(map(str, range(runs))), "--device", args.device,
               "--batch-size", str(batch), "--teacher-checkpoint", str(work / "teacher.pth"), "--teacher-epochs", "0",
               "--student-epochs", str(args.epochs), "--logs-dir", str(logs), "--checkpoints-dir", str(work / "ckpt"),
               "--set", f"experiment.cifar_val_images={args.val_images}",
               "--set", f"experiment.compile={str(compiled).lower()}", *([] if runs == 1 else ["--parallel", "runs"])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // runs))}
    started = time.perf_counter()
    _run([*launcher(runs), *command], env, work, timeout)
    wall = time.perf_counter() - started
    (folder,) = logs.glob("final_experiment_*")
    histories = [r["history"] for r in json.loads((folder / "comparison_results.json").read_text())
                 if r["method"] == "KD"]
    timed = [history[1:] or history for history in histories]  # after the first epoch, where there is one
    return {"steps": sum(sum(e["images"] for e in h) / sum(e["train_seconds"] for e in h) for h in timed),
            "wall": sum(e["images"] for h in histories for e in h) / wall}


def plain(work: Path, args: argparse.Namespace, batch: int) -> float:
    """img/s of bench/plain_loop.py's KD step on the same file, loaded as the common CIFAR repositories load it."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from kd.data.cifar import unchecked
    from models.cifar import CIFAR_MODELS
    device = torch.device(args.device)
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(),
                                    transforms.Normalize((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))])
    dataset = unchecked(datasets.CIFAR100)(str(work), train=True, transform=transform)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=min(8, os.cpu_count() or 2),
                        drop_last=True, persistent_workers=True, pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    teacher = CIFAR_MODELS["resnet32x4"](num_classes=100).to(device)
    student = CIFAR_MODELS["resnet8x4"](num_classes=100).to(device)
    return measure_steps(kd_step(student, teacher), loader, min(PLAIN_STEPS, len(loader) * args.epochs))


def measurements(work: Path, args: argparse.Namespace, batch: int) -> dict[str, Callable[[float], dict | float]]:
    """What to measure at `batch`, in order; each takes the seconds left."""
    run = lambda n, compiled=False: lambda left: project(work, args, batch, n, compiled, left)  # noqa: E731
    plain_side = {"plain": lambda _left: plain(work, args, batch)}
    layouts = (1, 2) if args.quick else (1, 2, 4) if batch == 64 else (1, 4)
    sides = {**(plain_side if batch == 64 else {}), **{f"runs_{n}": run(n) for n in layouts}}
    if batch == 64 and not args.quick:  # last: compiling may fail where a compiler is missing
        sides["compiled_1"] = run(1, compiled=True)
    return {**sides, **(plain_side if batch != 64 else {})}


def projections(row: dict) -> dict[str, float]:
    one_run = max(row.get(key, 0) for key in ("runs_1", "compiled_1") if isinstance(row.get(key), float))
    shared = max(v for k, v in row.items() if k.startswith(("runs_", "compiled_")) and not k.endswith("_wall")
                 and isinstance(v, float))
    return {"projected_run_minutes": round(EPOCHS * EPOCH_IMAGES / one_run / 60, 1),
            "projected_table_hours": round((TABLE_RUNS + 1) * EPOCHS * EPOCH_IMAGES / shared / 3600, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny file, 1 epoch, 1 and 2 runs (the CPU check)")
    parser.add_argument("--budget", type=float, default=float("inf"), metavar="S",
                        help="measure for at most about S seconds; the figures measured by then are reported")
    args = parser.parse_args()
    args.epochs, per_class, args.val_images = (1, 2, 100) if args.quick else (4, 200, 500)
    started, figures = time.perf_counter(), {"device": args.device, "batches": {}}
    with tempfile.TemporaryDirectory(prefix="kd_bench_cifar_") as scratch:
        work = Path(scratch)
        random_cifar100(work, per_class, max(1, per_class // 10))
        teacher_file(work / "teacher.pth")
        for batch in (64, 128):
            row = figures["batches"][str(batch)] = {}
            for name, measure in measurements(work, args, batch).items():
                left = args.budget - (time.perf_counter() - started)
                if left <= 0:
                    row[name] = "not measured: past the budget"
                    continue
                try:
                    value = measure(left)
                except Failed as failure:
                    row[name] = f"failed: {failure}"
                    continue
                if isinstance(value, dict):
                    row[name], row[f"{name}_wall"] = round(value["steps"], 1), round(value["wall"], 1)
                else:
                    row[name] = round(value, 1)
                print(f"batch {batch} {name}: {row[name]} img/s", flush=True)
                print(json.dumps(figures), flush=True)
    row = figures["batches"]["64"]
    if isinstance(row.get("runs_1"), float) and isinstance(row.get("plain"), float):
        figures["vs_plain_1_run"] = round(row["runs_1"] / row["plain"], 2)
    if isinstance(row.get("runs_1"), float):
        figures.update(projections(row))
        print(f"batch 64: one 240-epoch run {figures['projected_run_minutes']} min; the table ({TABLE_RUNS} runs "
              f"and the teacher, at KD's speed) {figures['projected_table_hours']} h; training steps only")
    figures["seconds"] = round(time.perf_counter() - started)
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()

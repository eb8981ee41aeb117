"""Side-by-side throughput: the plain reference loop (bench/plain_loop.py) against this project's trainer.

    python bench/throughput.py --quick        # a few minutes on a 2-core CPU
    python bench/throughput.py                # longer runs, steadier numbers

Both sides use the same models (ResNet50 teacher, ResNet18 student, CIFAR stem), the demo's digits, the
same image size and batch size 32, on the same machine in the same run; each side runs in its own
process, the plain one with the default allocator, the project's with the settings its entry point
applies (GLIBC_TUNABLES). Three figures per image size (the demo's, then 32 px):
  teacher  - ResNet50 training steps, img/s;
  kd       - one KD step (ResNet18 trained + ResNet50 teacher forward), img/s;
  distill  - one epoch each of KD, AT and FitNets, seconds (plain: one after the other, the teacher
             recomputed per method; project: its default, the three trained together).
The project's distillation epoch is also timed with --no-share-teacher (one method after the other), which
isolates what sharing the teacher forward saves. The last line printed is a JSON object with the ratios
(project / plain; for distill plain s / project s) and that saving.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from run_worker import run_worker  # noqa: E402

BATCH = 32
METHOD_NAMES = ("KD", "AT", "FitNets")


def _models(num_classes: int, device: torch.device):
    from models import build_resnet
    torch.manual_seed(0)
    teacher = build_resnet("ResNet50", num_classes, "cifar", zero_init_residual=True).to(device)
    student = build_resnet("ResNet18", num_classes, "cifar").to(device)
    return teacher, student


def _distillers(student_state: dict, teacher, num_classes: int, settings: dict):
    """KD, AT and FitNets on the teacher's device: students and extra modules (FitNets' regressor) too."""
    from kd.methods import METHODS
    from models import build_resnet
    distillers = []
    for name in METHOD_NAMES:
        student = build_resnet("ResNet18", num_classes, "cifar")
        student.load_state_dict(student_state)
        distiller = METHODS[name].distiller(student, teacher, **settings[name])
        distillers.append(distiller.to(next(teacher.parameters()).device))
    return distillers


def run_plain(data, size: int, steps: int, distill_images: int, device: torch.device) -> dict:
    from plain_loop import (
        distill_epoch,
        kd_step,
        measure_steps,
        plain_loader,
        teacher_step,
    )

    import final
    classes = len(data.class_names)
    loader = plain_loader(data.root, size, BATCH, data.mean, data.std, num_workers=2)
    teacher, student = _models(classes, device)
    result = {"teacher": measure_steps(teacher_step(teacher), loader, steps)}
    teacher.eval().requires_grad_(False)
    result["kd"] = measure_steps(kd_step(student, teacher), loader, steps)
    subset = plain_loader(data.root, size, BATCH, data.mean, data.std, num_workers=2, limit=distill_images)
    seconds = 0.0
    for distiller in _distillers(student.state_dict(), teacher, classes, final.default_config()["methods"]):
        seconds += distill_epoch(distiller, subset)[1]
        distiller.close()
    result["distill"] = seconds
    return result


def _limited(data, images: int):
    """The same data with only `images` training images (a fixed subset), so one epoch is short."""
    from dataclasses import replace

    from kd.data.batches import Split
    train = data.splits["train"]
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:images]
    subset = Split(train.files, train.labels[keep], train.images[keep])
    return replace(data, splits={**data.splits, "train": subset})


def run_project(data, size: int, steps: int, distill_images: int, device: torch.device, precision: str) -> dict:
    import final
    from kd.engine.run import RunSpec
    from kd.engine.runtime import Runtime, resolve_precision
    from kd.engine.trainer import fit, fit_together
    from kd.methods.baseline import Baseline
    from kd.methods.kd import KD
    runtime = Runtime(device, resolve_precision(precision, device), channels_last=True)
    classes = len(data.class_names)
    teacher, student = _models(classes, device)
    config = final.default_config()
    cfg = {**config["student"], "epochs": 1, "batch_size": BATCH, "lr": 0.05}
    out = Path(tempfile.mkdtemp(prefix="kd_bench_"))

    def spec(name: str) -> RunSpec:
        return RunSpec(name, cfg, 0, out / "tb" / name, out / "ckpt" / name, {})

    def images_per_s(distiller) -> float:
        """Two untimed warm-up steps (as the plain loop has), then `steps` steps: one epoch each."""
        fit(distiller, _limited(data, 2 * BATCH), spec("warm-up"), runtime)
        return fit(distiller, _limited(data, steps * BATCH), spec("timed"), runtime)[0]["history"][0]["images_per_s"]

    result = {"teacher": images_per_s(Baseline(teacher))}
    kd = KD(student, teacher, **config["methods"]["KD"])
    result["kd"] = images_per_s(kd)
    kd.close()
    subset = _limited(data, distill_images)
    for figure, groups in (("distill_one_by_one", [[name] for name in METHOD_NAMES]), ("distill", [METHOD_NAMES])):
        distillers = dict(zip(METHOD_NAMES, _distillers(student.state_dict(), teacher, classes, config["methods"])))
        result[figure] = 0.0
        for group in groups:  # --no-share-teacher, then the default: the three trained together
            outcomes = fit_together([(distillers[name], spec(name)) for name in group], subset, runtime)
            result[figure] += sum(outcome[0]["history"][0]["train_seconds"] for outcome in outcomes)
        for distiller in distillers.values():
            distiller.close()
    result["precision"] = runtime.precision
    shutil.rmtree(out)
    return result


def _worker(args: argparse.Namespace) -> None:
    from kd.data.digits import export_digits_demo
    from kd.data.load import load_image_data
    torch.manual_seed(0)
    device = torch.device(args.device)
    data = load_image_data(export_digits_demo(REPO / "data" / "digits"), args.size, hflip=False, num_workers=0)
    if args.worker == "plain":
        result = run_plain(data, args.size, args.steps, args.distill_images, device)
    else:
        result = run_project(data, args.size, args.steps, args.distill_images, device, args.precision)
    print(json.dumps(result))


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 1024, seconds: float = 2.0) -> float:
    """GFLOP/s of a square matmul, the ceiling that convolution-heavy training can approach."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n ** 3 * count / (time.perf_counter() - started) / 1e9


def train_flops_per_image(size: int) -> dict[str, float]:
    """FLOPs of one image: a training step is ~3 forward passes (forward, two backward products)."""
    from kd.results.metrics import forward_flops
    teacher, student = _models(10, torch.device("cpu"))
    image = torch.zeros(1, 3, size, size)
    forward = {"teacher": forward_flops(teacher.eval(), image), "student": forward_flops(student.eval(), image)}
    return {"teacher": 3 * forward["teacher"], "kd": 3 * forward["student"] + forward["teacher"]}


def _side(side: str, size: int, args: argparse.Namespace) -> dict:
    from run_experiment import MALLOC_TUNABLES
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if side == "project":
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES  # what run_experiment.py sets for itself
    command = [sys.executable, __file__, "--worker", side, "--size", str(size), "--steps", str(args.steps),
               "--distill-images", str(args.distill_images), "--device", args.device, "--precision", args.precision]
    return run_worker(command, env, f"{side} run at {size} px")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 timed steps and a 256-image distillation epoch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="12,32", help="image sizes; the first is the demo's (12 px)")
    parser.add_argument("--precision", default="auto", help="the project side's precision (auto, fp32, bf16, fp16)")
    parser.add_argument("--worker", choices=["plain", "project"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--distill-images", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (6 if args.quick else 30)
    args.distill_images = args.distill_images or (256 if args.quick else 1078)
    if args.worker:
        return _worker(args)

    device = torch.device(args.device)
    peak = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    print(f"device {device}, {torch.get_num_threads()} threads; matmul peak fp32 {peak['fp32']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s; batch {BATCH}, {args.steps} timed steps, distillation epoch "
          f"of {args.distill_images} images")
    header = f"{'size':>4} {'figure':<8} {'unit':<5} {'plain':>8} {'project':>8} {'speed-up':>8}  GFLOP/s plain/project"
    print(header + "\n" + "-" * len(header))
    ratios = {}
    for index, size in enumerate(int(s) for s in args.sizes.split(",")):
        plain, project = _side("plain", size, args), _side("project", size, args)
        flops = train_flops_per_image(size)
        suffix = "" if index == 0 else f"_{size}"
        for figure in ("teacher", "kd", "distill"):
            unit = "s" if figure == "distill" else "img/s"
            ratio = plain[figure] / project[figure] if figure == "distill" else project[figure] / plain[figure]
            ratios[f"ratio_{figure}{suffix}"] = round(ratio, 2)
            achieved = (f"{plain[figure] * flops[figure] / 1e9:.0f}/{project[figure] * flops[figure] / 1e9:.0f}"
                        if figure in flops else "")
            print(f"{size:>4} {figure:<8} {unit:<5} {plain[figure]:>8.1f} {project[figure]:>8.1f} {ratio:>7.2f}x"
                  f"  {achieved}")
        saving = project["distill_one_by_one"] / project["distill"]
        ratios[f"shared_teacher_saving{suffix}"] = round(saving, 2)
        print(f"     project precision {project['precision']}; distillation one by one (--no-share-teacher) "
              f"{project['distill_one_by_one']:.1f} s, together {project['distill']:.1f} s: {saving:.2f}x")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()

"""Cost as the data grows: epoch time and peak memory against the number of training images, for the
in-memory path (decoded once into a uint8 tensor) and the streaming path (`cache_max_gb=0`: decoded from
disk by DataLoader workers every epoch).

    python bench/scale.py --quick     # 1k, 5k and 20k training images (~11 min on a 2-core CPU)
    python bench/scale.py             # 1k, 10k and 50k

The images are made on the fly, no download: scikit-learn's 8x8 digits, enlarged to 32 px, in 100
classes (10 digits x 10 fixed distortions: rotation, shear and tint), each image with its own random
affine jitter; every size is the first images of each class of the largest set (hard links, one folder
per size). Each (size, path) runs in its own process, through the project's own trainer with the
settings run_experiment.py applies (GLIBC_TUNABLES): a ResNet18 student, batch 32, two epochs, the
second one timed (the first pays for warm-up). The student has the ImageNet stem, which shrinks 32 px
images 4x at once: a cheap model, so that the data path's own cost shows instead of hiding under
convolutions (with the CIFAR stem a step costs ~16x more and every path looks the same).

Printed: one row per (path, size) with images/s, seconds per epoch and per image, peak resident memory
of the main process against the bound 1.5 x (uint8 cache + model, gradients and momentum + 500 MB), the
resident memory right after the imports (torch, torchvision and the project, before any image or
model), and the peak of the largest DataLoader worker. The last line is a JSON object:
`time_per_image_slope_ratio` (per path, seconds per image of the largest set / of the smallest: 1.0 is
linear), `peak_rss_mb` (per path and size), `streaming_vs_cache_img_s` (per size) and the bounds.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from run_worker import run_worker  # noqa: E402

CLASSES, SIZE, VAL_PER_CLASS, BATCH = 100, 32, 2, 32


def make_images(root: Path, per_class: int, seed: int = 0) -> None:
    """root/{train,val}/<class>/ with `per_class` training and VAL_PER_CLASS val images per class."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    by_digit = [digits.images[digits.target == d] for d in range(10)]
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", VAL_PER_CLASS)):
        for label in range(CLASSES):
            digit, variant = label % 10, label // 10
            folder = root / split / f"c{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            tint = np.array([1.0, 0.4 + 0.06 * variant, 1.0 - 0.05 * variant])
            for i in range(count):
                pixels = by_digit[digit][rng.integers(len(by_digit[digit]))] / 16.0
                image = Image.fromarray((pixels * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
                image = TF.affine(image, angle=-45 + 9 * variant + rng.uniform(-8, 8),
                                  translate=[int(rng.integers(-2, 3)), int(rng.integers(-2, 3))],
                                  scale=rng.uniform(0.85, 1.1), shear=[-20 + 4 * variant + rng.uniform(-4, 4)])
                rgb = (np.asarray(image, dtype=float)[:, :, None] * tint).clip(0, 255).astype(np.uint8)
                Image.fromarray(rgb).save(folder / f"img_{i:05d}.png")


def subset(source: Path, target: Path, per_class: int) -> None:
    """The first `per_class` training images of each class of `source` (hard links), and all its val."""
    for class_dir in sorted((source / "train").iterdir()):
        (target / "train" / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            os.link(image, target / "train" / class_dir.name / image.name)
    shutil.copytree(source / "val", target / "val", copy_function=os.link)


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def worker(root: Path, streaming: bool) -> dict:
    """Train two epochs on `root` through the project's trainer; the second epoch's figures and peak RSS."""
    import final
    from kd.data.load import load_image_data
    from kd.engine.run import RunSpec
    from kd.engine.runtime import Runtime
    from kd.engine.trainer import fit
    from kd.methods.baseline import Baseline
    from models import build_resnet

    imported = _rss_mb()  # the libraries' code and data alone, before any image or model
    data = load_image_data(root, SIZE, hflip=True, cache_max_gb=0 if streaming else 4.0, num_workers=2)
    runtime = Runtime(torch.device("cpu"), "fp32", channels_last=True)
    torch.manual_seed(0)
    student = build_resnet("ResNet18", len(data.class_names), "imagenet")
    cfg = final.create_student_config(epochs=2, batch_size=BATCH)
    out = Path(tempfile.mkdtemp(prefix="kd_scale_"))
    result, _ = fit(Baseline(student), data, RunSpec("scale", cfg, 0, out / "tb", out / "ckpt", {}), runtime)
    shutil.rmtree(out)
    epoch = result["history"][1]
    params = sum(p.numel() for p in student.parameters())
    cache = sum(split.images.numel() for split in data.splits.values()) if not streaming else 0
    return {"images": epoch["images"], "seconds": epoch["train_seconds"], "images_per_s": epoch["images_per_s"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "import_rss_mb": imported,
            "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "cache_mb": cache / 2**20, "model_mb": 3 * 4 * params / 2**20}  # weights, gradients, momentum


def measure(root: Path, streaming: bool) -> dict:
    from run_experiment import MALLOC_TUNABLES
    env = {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES, "PYTHONPATH": str(REPO)}
    command = [sys.executable, __file__, "--worker", str(root)] + (["--streaming"] if streaming else [])
    return run_worker(command, env, f"measuring {root}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k, 5k and 20k training images")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--streaming", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.streaming)))
        return
    sizes = [1000, 5000, 20000] if args.quick else [1000, 10000, 50000]
    work = Path(tempfile.mkdtemp(prefix="kd_scale_data_"))
    try:
        make_images(work / "largest", sizes[-1] // CLASSES)
        results: dict[str, dict[int, dict]] = {"cache": {}, "stream": {}}
        print(f"{'path':<7}{'train images':>13}{'img/s':>8}{'s/epoch':>9}{'ms/img':>8}{'peak RSS MB':>12}"
              f"{'bound MB':>9}{'imports MB':>11}{'worker MB':>10}", flush=True)
        for size in sizes:
            root = work / "largest" if size == sizes[-1] else work / f"n{size}"
            if size != sizes[-1]:
                subset(work / "largest", root, size // CLASSES)
            for path in ("cache", "stream"):
                r = results[path][size] = measure(root, streaming=path == "stream")
                r["bound_mb"] = 1.5 * (r["cache_mb"] + r["model_mb"] + 500)
                print(f"{path:<7}{size:>13}{r['images_per_s']:>8.0f}{r['seconds']:>9.1f}"
                      f"{1000 * r['seconds'] / r['images']:>8.2f}{r['peak_rss_mb']:>12.0f}{r['bound_mb']:>9.0f}"
                      f"{r['import_rss_mb']:>11.0f}{r['workers_peak_rss_mb']:>10.0f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def per_image(r: dict) -> float:
        return r["seconds"] / r["images"]

    print(json.dumps({
        "time_per_image_slope_ratio": {path: round(per_image(rs[sizes[-1]]) / per_image(rs[sizes[0]]), 3)
                                       for path, rs in results.items()},
        "peak_rss_mb": {path: {size: round(r["peak_rss_mb"]) for size, r in rs.items()} for path, rs in results.items()},
        "rss_bound_mb": {size: round(results["cache"][size]["bound_mb"]) for size in sizes},
        "import_rss_mb": round(results["cache"][sizes[0]]["import_rss_mb"]),
        "streaming_vs_cache_img_s": {size: round(results["stream"][size]["images_per_s"] /
                                                 results["cache"][size]["images_per_s"], 3) for size in sizes},
    }))


if __name__ == "__main__":
    main()

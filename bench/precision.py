"""Is bf16 worth it on this machine? A ResNet18 training step in fp32 and under bf16 autocast, side by side.

    python bench/precision.py                  # the CPU (or --device cuda)

Both precisions alternate in one process (fp32, bf16, fp32, bf16 ...), each round a warm-up step and a
few timed steps (kd/experiment/estimate.py's timing, as --check uses it), so a slower or faster moment of the machine
hits both alike; each figure is the median over its rounds. Printed: img/s of each, the ratio
bf16/fp32, and what `--precision auto` picks here. The last line is a JSON object with those numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.engine.runtime import Runtime, resolve_precision  # noqa: E402
from kd.experiment.estimate import random_batch, seconds_per_call, training_step  # noqa: E402
from models import build_resnet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    runtimes = {precision: Runtime(device, precision, channels_last=True) for precision in ("fp32", "bf16")}
    model = runtimes["fp32"].place(build_resnet("ResNet18", 10, "cifar"))
    images, labels = random_batch(args.batch_size, args.size, 10, runtimes["fp32"])
    steps = {precision: training_step(model, images, labels, runtime) for precision, runtime in runtimes.items()}
    speeds: dict[str, list[float]] = {precision: [] for precision in runtimes}
    for _ in range(args.rounds):  # alternating, so that a slower moment of the machine hits both alike
        for precision, runtime in runtimes.items():
            speeds[precision].append(args.batch_size / seconds_per_call(steps[precision], runtime))
    median = {precision: statistics.median(values) for precision, values in speeds.items()}
    auto = resolve_precision("auto", device)
    print(f"{device}, {torch.get_num_threads()} threads, ResNet18 training step at {args.size} px, batch "
          f"{args.batch_size}: fp32 {median['fp32']:.1f} img/s, bf16 {median['bf16']:.1f} img/s "
          f"(bf16/fp32 {median['bf16'] / median['fp32']:.2f}); --precision auto picks {auto} here")
    print(json.dumps({"fp32_img_s": round(median["fp32"], 1), "bf16_img_s": round(median["bf16"], 1),
                      "bf16_vs_fp32": round(median["bf16"] / median["fp32"], 2), "auto": auto}))


if __name__ == "__main__":
    main()

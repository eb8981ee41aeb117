"""Is bf16 worth it on this machine? A ResNet18 training step in fp32 and under bf16 autocast, side by side.

    python bench/precision.py                  # the CPU (or --device cuda)

Both precisions alternate in one process (fp32, bf16, fp32, bf16 ...), so a slower or faster moment of the
machine hits both alike; each figure is the median over its rounds. Printed: img/s of each, the ratio
bf16/fp32, and what `--precision auto` picks here. The last line is a JSON object with those numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.runtime import Runtime, resolve_precision  # noqa: E402
from models import build_resnet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Runtime(device, "fp32", channels_last=True).place(build_resnet("ResNet18", 10, "cifar"))
    images = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    runtimes = {precision: Runtime(device, precision, channels_last=True) for precision in ("fp32", "bf16")}

    def step(runtime: Runtime) -> None:
        with runtime.autocast():
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    speeds: dict[str, list[float]] = {precision: [] for precision in runtimes}
    for round_ in range(args.rounds + 1):
        for precision, runtime in runtimes.items():
            step(runtime)  # warm-up for this precision's kernels
            runtime.synchronize()
            started = time.perf_counter()
            for _ in range(args.steps):
                step(runtime)
            runtime.synchronize()
            if round_:  # round 0 only warms up
                speeds[precision].append(args.steps * args.batch_size / (time.perf_counter() - started))
    median = {precision: statistics.median(values) for precision, values in speeds.items()}
    auto = resolve_precision("auto", device)
    print(f"{device}, {torch.get_num_threads()} threads, ResNet18 training step at {args.size} px, batch "
          f"{args.batch_size}: fp32 {median['fp32']:.1f} img/s, bf16 {median['bf16']:.1f} img/s "
          f"(bf16/fp32 {median['bf16'] / median['fp32']:.2f}); --precision auto picks {auto} here")
    print(json.dumps({"fp32_img_s": round(median["fp32"], 1), "bf16_img_s": round(median["bf16"], 1),
                      "bf16_vs_fp32": round(median["bf16"] / median["fp32"], 2), "auto": auto}))


if __name__ == "__main__":
    main()

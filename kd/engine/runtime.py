"""Where and how tensors are computed: the device, the precision, the memory format, and clocks that are
right on GPUs (whose kernels run after the host has queued them)."""
from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from kd.errors import UserError

log = logging.getLogger("kd")

# Ampere (compute capability 8.0) and newer GPUs compute bf16 natively; older ones (V100, T4) only emulate
# it, slowly, and `torch.cuda.is_bf16_supported()` counts that emulation as support.
NATIVE_BF16_CAPABILITY = (8, 0)

# CPU features that compute bf16 in hardware: x86's AVX512-BF16 and AMX, Arm's BF16 extension. Without
# them oneDNN emulates bf16 (measured slower than fp32 on AVX-512 and AVX2 CPUs, see bench/RESULTS.md), and
# `torch.ops.mkldnn._is_mkldnn_bf16_supported()` counts that emulation as support.
CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed, resolved once per experiment."""
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool = False  # the models' forward (and backward) captured by torch.compile (resolve_compile)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def place(self, module: nn.Module) -> nn.Module:
        module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def capture(self, step: nn.Module) -> nn.Module:
        """`step` (a distiller, or its DDP wrapper) as the training step calls it: with `compile`, through
        torch.compile (the student's forward, the loss and their backward as a few large kernels; on CUDA
        "reduce-overhead" replays them as CUDA graphs), else as it is. The module itself is unchanged, so
        evaluation and checkpoints use it as they would without."""
        if not self.compile:
            return step
        config = torch._dynamo.config
        # by default dynamo does not guard modules' hooks: code compiled before a method registered its feature
        # hooks on a shared teacher would run without them
        config.skip_nnmodule_hook_guards = False
        # one compiled entry per method's step (several train together): past the limit dynamo runs eager
        config.recompile_limit = max(config.recompile_limit, 64)
        # static shapes: the epoch's last, smaller batch gets a graph of its own instead of turning every batch's
        # graph into a dynamic-shape one (which CUDA graphs cannot replay)
        return torch.compile(step, mode="reduce-overhead" if self.device.type == "cuda" else None, dynamic=False)

    def autocast(self) -> AbstractContextManager:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def synchronize(self) -> None:
        """Wait until the device has run all the work queued so far (nothing to wait for on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        """Give the memory a failed run held back to the device (only a GPU caches it)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def stopwatch(self) -> Stopwatch:
        return Stopwatch(self.device)


class Stopwatch:
    """Adds up the seconds between `start()` and `stop()` calls.

    On a GPU a host clock would time the queuing of kernels, not their work, so the stopwatch records
    CUDA events on the device's own timeline instead, and reads them without waiting: spans whose end
    the GPU has passed are added up as it goes (so events do not pile up over a long epoch), the rest in
    `seconds()`, which waits for them.
    """

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.spans: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self.total = 0.0
        self.began: float | torch.cuda.Event = 0.0

    def _mark(self) -> float | torch.cuda.Event:
        if self.stream is None:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    def start(self) -> None:
        self.began = self._mark()

    def stop(self) -> None:
        end = self._mark()
        if self.stream is None:
            self.total += end - self.began
            return
        self.spans.append((self.began, end))
        self._add_finished(wait=False)

    def _add_finished(self, wait: bool) -> None:
        while self.spans and (wait or self.spans[0][1].query()):
            began, end = self.spans.popleft()
            end.synchronize()
            self.total += began.elapsed_time(end) / 1000.0

    def seconds(self) -> float:
        """The summed time so far (on a GPU this waits for the last recorded event)."""
        self._add_finished(wait=True)
        return self.total


def resolve_device(name: str) -> torch.device:
    """"auto" picks cuda, then mps, then cpu; an explicit device must exist."""
    mps_ok = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; "
                            "use --device cuda:0 or auto")
        return torch.device("cuda", index)
    if name == "mps" and not mps_ok:
        raise UserError("--device mps: MPS is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere: then nothing counts as native)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (emulation, however well supported, does not count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY
    return device.type == "cpu" and bool(cpu_flags() & CPU_BF16_FLAGS)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot train in."""
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs a GPU; on the CPU use --precision bf16, fp32 or auto")


def trains_well_in(precision: str, device: torch.device) -> bool:
    """Whether `device` trains in `precision` at its proper speed: fp32 anywhere, fp16 on a GPU, bf16 where
    it is native."""
    if precision == "bf16":
        return native_bf16(device)
    try:
        check_precision(precision, device)
    except UserError:
        return False
    return True


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 autocast where the device computes bf16 natively (GPUs of compute capability 8.0 and
    newer, CPUs with AVX512-BF16/AMX), fp16 with a GradScaler on older GPUs, fp32 on other devices."""
    if precision == "auto":
        if native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    check_precision(precision, device)
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        log.warning("%s only emulates bf16 (slowly); --precision auto would train in fp16", device)
    return precision


def resolve_compile(setting: str | bool) -> bool:
    """experiment.compile: true or false as set; "auto" turns it on only where a measurement showed a gain, and
    none has yet: on the CPU a run pays tens of seconds of compiling (tests/test_compile.py) for no measured
    gain, and bench/gpu_check.sh's cifar step, which measures it on a GPU, has not run on one so far."""
    return setting is True

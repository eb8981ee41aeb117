"""Several processes under torchrun, in one of two ways (`experiment.parallel`).

"data": every process trains its shard of each batch of the same run; DistributedDataParallel averages
the gradients (gloo on CPU, nccl on CUDA); rank 0 writes everything.
"runs": every process trains whole runs by itself (see kd/experiment/sweep.py). While it does, `alone()`
makes every helper here answer as for a single process, so the run's training code, and its record, are
those of a one-process experiment; the processes talk through the job's store (small messages) and gloo.

Started plainly, every helper here is a no-op, so the single-process path is the same code.
"""
from __future__ import annotations

import datetime
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.tensorboard import SummaryWriter


def launched() -> bool:
    """Whether torchrun started this process (also as the only one: a 1-process job still uses DDP and
    its backend, which is how one GPU checks the multi-GPU path)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ


_alone = False                  # inside `alone()`: this process trains a whole run by itself
_store: dist.Store | None = None  # the job's key-value store (torchrun's), for --parallel runs
_parallel = "data"


def joined() -> bool:
    """Whether this process is part of a started process group."""
    return dist.is_available() and dist.is_initialized()


def active() -> bool:
    """Whether the run being trained is shared with other processes (data-parallel)."""
    return joined() and not _alone


def job_rank() -> int:
    """This process's place in the whole job, also inside `alone()`."""
    # torchrun's RANK also answers before the process group is up (e.g. when logging is set up)
    return dist.get_rank() if joined() else int(os.environ.get("RANK", "0"))


def job_size() -> int:
    return dist.get_world_size() if joined() else 1


def rank() -> int:
    """This process's place among the processes training the current run."""
    return 0 if _alone else job_rank()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def spreads_runs() -> bool:
    """Whether this job hands whole runs to its processes (--parallel runs)."""
    return joined() and _parallel == "runs"


def store() -> dist.Store:
    return _store


@contextmanager
def alone() -> Iterator[None]:
    """Train as a single process would: no collectives, this process's own shard is the whole split, and
    it writes its run's checkpoints and TensorBoard events itself."""
    global _alone
    _alone = True
    try:
        yield
    finally:
        _alone = False


def backend() -> str | None:
    """The process group's backend (nccl, gloo), None when this process trains alone."""
    return dist.get_backend() if active() else None


def is_main() -> bool:
    """Whether this process writes: rank 0 of the job writes logs, checkpoints and results; inside `alone()`
    a process writes its own run's checkpoints."""
    return rank() == 0


def quiet() -> bool | None:
    """tqdm's `disable`: automatic (off when not a terminal) on rank 0, always off on the others."""
    return None if job_rank() == 0 else True


def init(device_name: str, parallel: str = "data") -> str:
    """Join the torchrun job (if launched by one) and return the device this process should use.

    With "runs", processes may outnumber GPUs: process k uses GPU k mod (GPUs on its node), and the
    backend is gloo (nccl refuses two processes on one GPU, and only small messages travel)."""
    global _store, _parallel
    if not launched() or joined():
        return device_name
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    gpu = local_rank % max(1, torch.cuda.device_count()) if parallel == "runs" else local_rank
    if use_cuda:
        torch.cuda.set_device(gpu)
    backend = "nccl" if use_cuda and parallel == "data" else "gloo"
    timeout = datetime.timedelta(minutes=30)
    job_store, job_rank_, size = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(backend, store=job_store, rank=job_rank_, world_size=size, timeout=timeout)
    _store, _parallel = dist.PrefixStore("kd", job_store), parallel
    if is_main():
        logging.getLogger("kd").info("torchrun job: %d process(es), backend %s, parallel %s", size, backend,
                                     parallel)
    return f"cuda:{gpu}" if use_cuda else device_name


def shutdown() -> None:
    if joined():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process got here (e.g. rank 0 finished writing a checkpoint the others read)."""
    if active():
        dist.barrier()


def sum_all(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes."""
    if active():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def gather_all(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` (of one shape on all of them) concatenated along dim 0 in rank order, the same
    on every process."""
    if not active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(value):
    """Every process's `value`, in rank order."""
    if not active():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value):
    """Rank 0's `value` on every process."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def sync_buffers(module: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics). Each process updates its own
    from its own batches, so after a training step they differ; rank 0's are the ones saved, and
    evaluating with them scores exactly the saved model."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module to call for training steps: DDP around it when several processes train together.

    A Distiller that trains only part of its parameters in some epochs (FitNets' hint stage) says so
    with `skips_parameters`, and DDP then looks for the unused ones every step.
    """
    if not active():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=getattr(model, "skips_parameters", False))


class _NoWriter:
    """Stands in for a TensorBoard writer on the processes that do not write."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def summary_writer(log_dir: Path) -> SummaryWriter | _NoWriter:
    return SummaryWriter(str(log_dir)) if is_main() else _NoWriter()

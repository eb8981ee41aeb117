"""How a process of this project starts and ends: the malloc settings it re-executes itself with, and
the exit code (and one-line message) each outcome gives, also inside a torchrun job."""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from kd import distributed
from kd.config import UserError

# glibc's malloc returns freed memory to the system eagerly and serves big blocks with mmap, so every
# training step pays page faults for its activations again; keeping the memory around is 1.6-1.8x faster
# for ResNet50 training on a 2-core CPU (bench/RESULTS.md). Set GLIBC_TUNABLES yourself (even empty) to
# opt out.
MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296:"
                   "glibc.malloc.top_pad=268435456")


def with_malloc_tunables() -> None:
    """Re-execute this process with MALLOC_TUNABLES, once, where glibc reads them (Linux)."""
    if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES})


def _raised_by_a_collective(err: BaseException) -> bool:
    """Whether `err` came out of torch.distributed: in a job, that means another process went away."""
    frames = traceback.extract_tb(err.__traceback__)
    return any(f"torch{os.sep}distributed{os.sep}" in frame.filename or
               frame.filename.endswith(os.path.join("nn", "parallel", "distributed.py")) for frame in frames)


def _stop(code: int, message: str) -> int:
    """Print `message`; inside a torchrun job leave at once: a graceful shutdown could wait forever for
    processes that still wait for this one, while torchrun stops the others as soon as one has exited."""
    if message:
        sys.stderr.write(message + "\n")
    if distributed.launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def exit_code(work: Callable[[], list[dict]]) -> int:
    """Run `work` (an experiment; it returns its records) and turn its outcome into the exit code: 0 done,
    1 a run failed or an unexpected error, 2 bad input (one line on stderr), 130 interrupted."""
    try:
        records = work()
    except UserError as err:
        return _stop(2, f"error: {err}")
    except KeyboardInterrupt:  # final.main has logged where the finished runs are and how to resume
        return _stop(130, "interrupted")
    except Exception as err:
        if not distributed.launched():
            raise
        if _raised_by_a_collective(err):  # a consequence: the process that failed has printed why
            return _stop(1, f"error: process {distributed.rank()} stopped: another process of this job failed")
        traceback.print_exc()
        return _stop(1, "")
    distributed.shutdown()
    return 1 if any(r["status"] == "failed" for r in records) else 0

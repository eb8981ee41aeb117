"""How a run of this project ends: the exit code (and one-line message) each outcome gives, also inside
a torchrun job."""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

import torch.distributed as dist

from kd.engine import distributed
from kd.errors import UserError
from models import ModelError

# How gloo reports a collective whose peer process has gone (nccl's collectives wait instead, until
# torchrun stops them).
PEER_GONE = ("closed by peer", "reset by peer", "connection closed", "broken pipe")


def _peer_went_away(err: BaseException) -> bool:
    """Whether `err` only says that another process of the job stopped (which has printed why)."""
    return isinstance(err, dist.DistNetworkError) or any(words in str(err).lower() for words in PEER_GONE)


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
    except (UserError, ModelError) as err:
        return _stop(2, f"error: {err}")
    except KeyboardInterrupt:  # final.main has logged where the finished runs are and how to resume
        return _stop(130, "interrupted")
    except Exception as err:
        if not distributed.launched():
            raise
        if _peer_went_away(err):  # a consequence: the process that failed has printed why
            return _stop(1, f"error: process {distributed.rank()} stopped: another process of this job failed")
        traceback.print_exc()
        return _stop(1, "")
    distributed.shutdown()
    return 1 if any(r["status"] == "failed" for r in records) else 0

"""Running one measurement in its own process: the benchmarks' workers print a JSON object as their last line."""
from __future__ import annotations

import json
import subprocess
import sys


def run_worker(command: list[str], env: dict[str, str], what: str) -> dict:
    """The JSON object `command` prints last; exits with the worker's error output if it fails."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def launcher(processes: int) -> list[str]:
    """How to start run_experiment.py in `processes` processes: plain Python for one, else a one-machine torchrun."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]

#!/usr/bin/env bash
# The GPU check: the demo, the throughput bench, a torchrun (nccl) job, a kill -9 + --resume and runs
# sharing the GPU (--parallel runs), all on CUDA, in a few minutes on one GPU. Prints a summary table and
# appends it to bench/RESULTS.md; exits non-zero if any step failed. Usage: bash bench/gpu_check.sh [--out LOG_DIR] [--steps demo,resume]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/gpu_check.py "$@"

#!/bin/sh
# The GPU check (bench/gpu_check.py): SSD300 and Deeper SSD500 on this machine's GPU(s), first
# loss against the CPU's, float32/bf16/fp16 images/s, two GPUs over NCCL when present.
# Usage: bash bench/gpu_check.sh [gpu_check.py options]; PYTHON names the interpreter.
set -e
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"

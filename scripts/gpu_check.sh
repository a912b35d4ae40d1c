#!/usr/bin/env bash
# The CUDA check, for the lent GPU machine (no network there): installs the carried wheels
# the image lacks, then runs scripts/gpu_check.py. Prepare .gpu_carry/ here first with
# scripts/prepare_gpu_carry.sh, and carry it along.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_carry/wheels/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export YAYI_MODEL_CACHE=/tmp/yayi-gpu/cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,power.draw,utilization.gpu --format=csv
exec timeout 470 python3 scripts/gpu_check.py

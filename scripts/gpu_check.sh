#!/usr/bin/env bash
# The CUDA check, for the lent GPU machine (no network there): installs the carried wheels
# the image lacks, then runs scripts/gpu_check.py. Prepare .gpu_carry/ here first with
# scripts/prepare_gpu_carry.sh, and carry it along.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_carry/wheels/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export YAYI_MODEL_CACHE=/tmp/yayi-gpu/cache PYTHONUNBUFFERED=1
# The tiny test models take SmolLM2's tokenizer from these carried files (no GGUF package here).
export YAYI_SMOLLM2_TOKENIZER=$PWD/.gpu_carry/models/smollm2-shape
nvidia-smi --query-gpu=name,memory.total,power.draw,utilization.gpu --format=csv
# The CUDA-only tests, as committed: a real device out-of-memory hands the memory back.
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/integration/test_faults.py -k cuda || echo "CUDA tests failed"
timeout 240 python3 scripts/gpu_check.py || echo "gpu_check.py failed"
# The log's 1.6B row on this device: its bfloat16 folder built here (3.3 GB, random weights at
# StableLM-2's shape), served by hf-kv, measured and reported as on the CPU (docs/results).
timeout 60 python3 -m bench.sizes.build --sizes 1.6b --formats bf16
exec timeout 90 python3 -m bench.sizes.measure --sizes 1.6b --formats bf16 --engines hf-kv --refuse "" \
  --peer-sizes "" --probe-seconds 2 --out /tmp/yayi-gpu/sizes

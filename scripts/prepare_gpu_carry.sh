#!/usr/bin/env bash
# Builds .gpu_carry/ (git-ignored): the wheels the GPU image lacks (its Python is 3.12)
# and SmolLM2's config and tokenizer (the weights stay behind: random ones of the same
# shape are made there).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_carry/wheels .gpu_carry/models/smollm2-shape
smollm2=$(.venv/bin/python -m engines.models smollm2-135m | tail -1)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu_carry/wheels grpcio==1.85.3 protobuf==7.36.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
# pytest for the CUDA-only tests (pure Python wheels)
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu_carry/wheels \
  pytest pluggy iniconfig packaging pytest-timeout
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  cp "$smollm2/$f" .gpu_carry/models/smollm2-shape/
done
du -sh .gpu_carry

#!/bin/bash
# Issue 16 on one lent H200: engine nemo next to engine megatron on the GPT-3 1.3B reference cell.
# Carries .whl/nemo (NeMo 2.7.3 + the packages the machine lacks, cp312 wheels) and .whl/base
# (megatron-core 0.16.1, zeus 0.16.0); see docs/nemo.md for how they were chosen.
set -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/nemo/*.whl .whl/base/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 docs/gpu/nemo/run.py 2>&1 | tee "$OUT/log.txt"

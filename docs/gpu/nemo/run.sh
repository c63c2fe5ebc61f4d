#!/bin/bash
# Issue 16 on one lent H200: engine nemo next to engine megatron on the GPT-3 1.3B reference cell.
# Carry .whl/nemo (NeMo 2.7.3, megatron-core 0.15.3 and what the machine lacks, cp312 wheels) and
# .whl/base (megatron-core 0.16.1, zeus 0.16.0). Two targets: engine megatron runs on 0.16.1
# (/tmp/site), engine nemo on 0.15.3 (/tmp/site-nemo first on its PYTHONPATH): NeMo 2.7.3 does
# not run on 0.16 (requirements-nemo.lock).
set -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir"
$PIP --target /tmp/site .whl/base/*.whl $(ls .whl/nemo/*.whl | grep -v megatron_core) || exit 1
$PIP --target /tmp/site-nemo .whl/nemo/megatron_core-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD CHARLLM_NEMO_PYTHONPATH=/tmp/site-nemo
python3 docs/gpu/nemo/run.py 2>&1 | tee "$OUT/log.txt"

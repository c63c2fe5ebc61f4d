#!/usr/bin/env bash
# Issue 13a on one lent H200: the offload/recompute smoke, then the kwai-remat-1gpu sweep and the
# kwai-vs-full comparison (benchmarks/kwai_remat_gpu.py). From the repository root on the device:
#   OUT=$OUT bash docs/gpu/kwai-remat-1gpu/run.sh
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv
  nvidia-smi topo -m
  free -g
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} > "$OUT/machine.txt" 2>&1
timeout 60 python3 benchmarks/kwai_offload_smoke.py 2>&1 | tee "$OUT/smoke.txt"
timeout "${BENCH_LIMIT_S:-330}" python3 benchmarks/kwai_remat_gpu.py \
  --cells docs/gpu/kwai-remat-1gpu/cells.json --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/bench.txt"
ls -la "$OUT"

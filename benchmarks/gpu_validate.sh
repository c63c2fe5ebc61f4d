#!/usr/bin/env bash
# Run the GPU validation on a node with one (or two) GPUs and keep the outputs in OUT.
#   benchmarks/gpu_validate.sh OUT [SECTIONS]
# SECTIONS: comma list of ref,overhead,replay,oom,modes,variants,scale,scale_ablate
# (default: ref,overhead,replay,oom,modes). Zeus is used for a cross-check when importable;
# on a node without network, carry its wheel: pip install --no-deps --target DIR zeus-0.16.0-*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: gpu_validate.sh OUT [SECTIONS]}"
sections="${2:-ref,overhead,replay,oom,modes}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
python3 benchmarks/gpu_validate.py --out "$out" --sections "$sections" 2>&1 | tee "$out/stdout.txt"

#!/usr/bin/env bash
# Issue 13's one-H200 checks in one short lease (docs/gpu/kwai-remat-1gpu-run/README.md):
#  1. `charllm run` of include/campaigns/kwai-remat-1gpu.yaml, local backend, its three alpha-0 cells
#     (none: out of memory through the job's OOM path; full and kwai: 20 measured steps each from the
#     campaign's seed): results tree, cells table and the registered figures from the real runner;
#  2. the recompute x alpha sweep of the same campaign's cells in one process
#     (benchmarks/kwai_remat_gpu.py: one engine switched in place, one warm step after the build,
#     then one measured step per cell; max_memory_allocated; PCIe TX/RX counters sampled every
#     5 ms and unwrapped), until the lease's deadline.
# From the repository root on the device:  OUT=$OUT bash docs/gpu/kwai-remat-1gpu-run/run.sh
# CPU dry run (tiny shape): see DRYRUN in the README; every knob below is an environment override.
set -uo pipefail
T0=$(date +%s)
HERE=docs/gpu/kwai-remat-1gpu-run
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
CAMPAIGN=${CAMPAIGN:-include/campaigns/kwai-remat-1gpu.yaml}
CELLS_JSON=${CELLS_JSON:-$HERE/cells.json}
RUN_CELLS=${RUN_CELLS:-'*-00000,*-01000,*-01000-rkwai'}
# every mode gets three alphas first, then the rest of the grid while time is left
PLAN=${PLAN:-none:0.8,none:0.6,none:0.4,selective:0.8,selective:0.6,selective:0.4,kwai:0.8,kwai:0.4,kwai:0.0,full:0.8,full:0.4,full:0.0,kwai:0.6,kwai:0.2,full:0.6,full:0.2,none:0.2,selective:0.2}
TOTAL_S=${TOTAL_S:-285}
RUN_LIMIT_S=${RUN_LIMIT_S:-230}
DEVICE=${DEVICE:-cuda}
WHEELS=${WHEELS:-.whl/charllm}
export CHARLLM_HOME=${CHARLLM_HOME:-/tmp/charllm-home}
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
if ! python3 -c 'import pydantic, sqlalchemy, croniter' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/charllm-wheels \
    "$WHEELS"/*.whl || exit 3
  export PYTHONPATH=/tmp/charllm-wheels
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  date -u +%FT%TZ
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv
  fi
  free -g
  python3 -c 'import torch, pydantic, sqlalchemy; print("torch", torch.__version__, "cuda", torch.version.cuda, "pydantic", pydantic.VERSION, "sqlalchemy", sqlalchemy.__version__)'
} > "$OUT/machine.txt" 2>&1

# 1. the operating point through the runner
echo "== charllm run $CAMPAIGN --cells $RUN_CELLS (t=$(($(date +%s) - T0)) s)" | tee "$OUT/run.log"
timeout "$RUN_LIMIT_S" python3 -m charllm.cli run "$CAMPAIGN" --cells "$RUN_CELLS" 2>&1 | tee -a "$OUT/run.log"
echo "charllm run exit ${PIPESTATUS[0]} at t=$(($(date +%s) - T0)) s" | tee -a "$OUT/run.log"
python3 -m charllm.cli status "$CAMPAIGN" > "$OUT/status.txt" 2>&1
# a job the runner left behind when its time limit hit (detached by the local backend): ended by pid
if command -v nvidia-smi >/dev/null; then
  for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null); do
    echo "ending leftover job process $pid" | tee -a "$OUT/run.log"
    kill "$pid"
  done
  sleep 1
fi
tar -C "$CHARLLM_HOME" -czf "$OUT/charllm-home.tgz" tables figures results 2>>"$OUT/run.log"

# 2. the sweep, until the deadline
DEADLINE=$((T0 + TOTAL_S - 4))
LEFT=$((DEADLINE - $(date +%s)))
echo "== sweep: $LEFT s left (t=$(($(date +%s) - T0)) s)" | tee "$OUT/bench.txt"
if [ "$LEFT" -gt 20 ]; then
  timeout "$LEFT" python3 benchmarks/kwai_remat_gpu.py --cells "$CELLS_JSON" --out "$OUT" --device "$DEVICE" \
    --sweep-steps 1 --warm-steps 1 --keep-pool --skip-compare --plan "$PLAN" --deadline-unix "$DEADLINE" \
    2>&1 | tee -a "$OUT/bench.txt"
  echo "sweep exit ${PIPESTATUS[0]} at t=$(($(date +%s) - T0)) s" | tee -a "$OUT/bench.txt"
fi
ls -la "$OUT"

#!/usr/bin/env bash
# Issue 13's two-GPU rows, for issue 17's two-H200 machine (not run yet): from the repo root,
#   OUT=$OUT bash docs/gpu/two-gpu-13/run.sh [kwai|pcie|pp|all]
# - kwai: include/campaigns/kwai-remat-2gpu.yaml, all 7 cells (PP2 x kwai/full x offload 0/0.5;
#   CP2 ring attention x none/kwai x offload 0/0.5);
# - pcie: the 1- and 2-GPU rows of include/campaigns/pcie-strategies.yaml (5 models x native/pcie x
#   {1 GPU, DDP, TP, PP, ZeRO-1, ZeRO-2, ZeRO-3, ZeRO-3 + CPU offload}: 80 cells), then
#   `charllm table scaling pcie_strategies` (issue 13b's scaling table);
# - pp: the pp = 2 rows of include/campaigns/pcie-pp-microbatch.yaml (m = 2 vs m = 8, 10 cells).
# Through `charllm run` and the local backend (as docs/gpu/small-campaign/run.sh; pydantic and
# SQLAlchemy wheels in .whl/ when the machine lacks them). The machine's `nvidia-smi topo -m`
# goes into machine.txt and into every job's provenance (interconnect native vs pcie).
set -uo pipefail
WHAT=${1:-all}
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"  # OUT, CHARLLM_HOME, wheels, PYTHONPATH
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,memory.total --format=csv; nvidia-smi topo -m; } > "$OUT/machine.txt" 2>&1
run() {  # campaign file, cell glob, log name
  timeout "${RUN_LIMIT_S:-540}" python3 -m charllm.cli run "$1" --cells "$2" 2>&1 | tee -a "$OUT/$3.log"
}
if [[ $WHAT == kwai || $WHAT == all ]]; then
  run include/campaigns/kwai-remat-2gpu.yaml '*' kwai-remat-2gpu
fi
if [[ $WHAT == pcie || $WHAT == all ]]; then
  for glob in '*-tp1pp1dp1-*' '*-tp1pp1dp2-*' '*-tp2pp1dp1-*' '*-tp1pp2dp1-*'; do
    run include/campaigns/pcie-strategies.yaml "$glob" pcie-strategies
  done
  python3 -m charllm.cli table scaling pcie_strategies > "$OUT/scaling.txt" 2>&1
fi
if [[ $WHAT == pp || $WHAT == all ]]; then
  run include/campaigns/pcie-pp-microbatch.yaml '*-tp1pp2dp1-*' pcie-pp-microbatch
fi
for c in kwai-remat-2gpu pcie-strategies pcie-pp-microbatch; do
  python3 -m charllm.cli status "include/campaigns/$c.yaml" > "$OUT/status-$c.txt" 2>&1
done
tar -C "$CHARLLM_HOME" -czf "$OUT/results.tgz" results tables figures 2>/dev/null
ls -la "$OUT"

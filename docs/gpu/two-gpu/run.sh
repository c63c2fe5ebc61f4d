#!/usr/bin/env bash
# Issue 17: every two-GPU validation run, for a two-H200 machine (the device tool's kind
# nvidia-h200-x2), from the repository root:
#   OUT=$OUT bash docs/gpu/two-gpu/run.sh [small|scale|kwai-pcie|perseus|checks|all]...
#   bash docs/gpu/two-gpu/run.sh --dry-run        # any machine: validate, plan, render, predict
# Sections (each writes under $OUT/<section>; the whole run needs about 45 min of GPU time, so
# on the device tool run it in three or four calls of <= 10 min, e.g. small / scale+perseus /
# kwai-pcie kwai / kwai-pcie pcie, keeping CHARLLM_HOME on the machine between calls):
# - small:     charllm-small.yaml (torch: DP2, TP2, PP2, FSDP2, Mixtral proxy DP2; codes 00000/01000)
#              and charllm-small-megatron.yaml (DP2, TP2+SP, PP2 x 00000/10000 "cc", FSDP, EP2 x 2 codes)
#              through `charllm run` on the local backend: tables, figures (Figs 4/5/8/13/15
#              analogues) and report.md;
# - scale:     weak scaling, DDP and FSDP2, GPT-3 1.3B, same per-GPU batch (benchmarks/gpu_validate.py);
# - kwai-pcie: docs/gpu/two-gpu-13/run.sh (Kwai PP2 offload, CP2; PCIe strategies native vs pcie;
#              PP2 m = p vs 4p), then `charllm table scaling`;
# - perseus:   perseus-pp2-local.yaml: real PP2 instruction timelines with energy, then
#              `charllm energy-plan` on one cell with the P2P blocking power the checks measure;
# - checks:    benchmarks/two_gpu_checks.py (all ok; cc <= base and exposed communication down
#              >= 30 %; bubble within 2 points of (p-1)/(m+p-1); P2P blocking power; predicted vs
#              measured DP2/TP2/PP2 step time within 15 % and ranked right), and a tarball of
#              tables, figures and results.
# Python packages the machine lacks come as wheels in .whl/ (docs/gpu/small-campaign/run.sh).
set -uo pipefail
CAMPAIGNS=(include/campaigns/charllm-small.yaml include/campaigns/charllm-small-megatron.yaml
           include/campaigns/kwai-remat-2gpu.yaml include/campaigns/pcie-strategies.yaml
           include/campaigns/pcie-pp-microbatch.yaml include/campaigns/perseus-pp2-local.yaml)
CLI=(python3 -m charllm.cli)

if [[ ${1:-} == --dry-run ]]; then
  # what can be checked without GPUs: every campaign validates and plans (capability table:
  # what the job would refuse), its job scripts render, the planner predicts each cell, the
  # sub-scripts parse, and the checks run (n/a without tables)
  [[ -x .venv/bin/python ]] && CLI=(.venv/bin/python -m charllm.cli)
  for f in docs/gpu/two-gpu/run.sh docs/gpu/two-gpu-13/run.sh docs/gpu/small-campaign/run.sh; do
    bash -n "$f" && echo "syntax ok: $f"
  done
  "${CLI[@]}" validate "${CAMPAIGNS[@]}"
  for c in "${CAMPAIGNS[@]}"; do
    echo "== $c"
    "${CLI[@]}" plan --predict "$c" | tail -n 25
    d=$(mktemp -d)
    "${CLI[@]}" render "$c" "$d" > /dev/null && echo "rendered $(find "$d" -name '*.sbatch' | wc -l) job scripts"
    rm -rf "$d"
  done
  "${CLI[0]}" benchmarks/two_gpu_checks.py --home "${CHARLLM_HOME:-/tmp/charllm-home}"
  exit 0
fi

. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"  # OUT, CHARLLM_HOME, wheels, PYTHONPATH
n=$(nvidia-smi -L | wc -l)
[[ $n -ge 2 ]] || { echo "two GPUs needed, found $n" >&2; exit 3; }
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,clocks.max.sm,memory.total --format=csv; nvidia-smi topo -m; } > "$OUT/machine.txt" 2>&1

run_campaign() {  # campaign file, log name
  timeout "${RUN_LIMIT_S:-560}" "${CLI[@]}" run "$1" 2>&1 | tee -a "$OUT/$2.log"
  "${CLI[@]}" status "$1" > "$OUT/status-$2.txt" 2>&1
}

for what in "${@:-all}"; do
  if [[ $what == small || $what == all ]]; then
    run_campaign include/campaigns/charllm-small.yaml ppt-small
    run_campaign include/campaigns/charllm-small-megatron.yaml ppt-small-megatron
  fi
  if [[ $what == scale || $what == all ]]; then
    python3 benchmarks/gpu_validate.py --out "$OUT/scale" --sections scale 2>&1 | tee "$OUT/scale.log"
  fi
  if [[ $what == kwai-pcie || $what == all ]]; then
    OUT=$OUT/kwai-pcie bash docs/gpu/two-gpu-13/run.sh all
  fi
  if [[ $what == perseus || $what == all ]]; then
    run_campaign include/campaigns/perseus-pp2-local.yaml perseus-pp2
  fi
  if [[ $what == checks || $what == all ]]; then
    python3 benchmarks/two_gpu_checks.py --home "$CHARLLM_HOME" --json "$OUT/checks.json" 2>&1 | tee "$OUT/checks.txt"
    w=$(python3 -c 'import json,sys; r=[x for x in json.load(open(sys.argv[1])) if x["check"]=="p2p" and x["ok"]]; print(r[0]["what"].split("stage ")[1].split(" W")[0] if r else "")' "$OUT/checks.json")
    [[ -n $w ]] && "${CLI[@]}" energy-plan include/campaigns/perseus-pp2-local.yaml '*gb128*00000' --p2p-w "$w" \
      --out "$OUT/energy-plan" 2>&1 | tee "$OUT/energy-plan.log"
    tar -C "$CHARLLM_HOME" -czf "$OUT/tables-figures.tgz" tables figures 2>/dev/null
    tar -C "$CHARLLM_HOME" -czf "$OUT/results.tgz" --exclude='*.parquet' results 2>/dev/null
  fi
done
ls -la "$OUT"

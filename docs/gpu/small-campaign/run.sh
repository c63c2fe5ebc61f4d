#!/usr/bin/env bash
# The small CharLLM-PPT campaign on a lent one-GPU machine, through the command-line twin and
# the local backend: the same runner, job scripts, training, telemetry, aggregation and
# figures as the Airflow DAG. Run from the repository root on the GPU machine:
#   bash docs/gpu/small-campaign/run.sh [campaign file]
# Python packages the machine lacks (pydantic, sqlalchemy) come as wheels in .whl/
# (pip download --python-version 3.12 --only-binary=:all: pydantic sqlalchemy -d .whl).
set -uo pipefail
CAMPAIGN=${1:-include/campaigns/charllm-small-1gpu.yaml}
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"  # OUT, CHARLLM_HOME, wheels, PYTHONPATH
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,clocks.max.sm,memory.total --format=csv
  python3 -c 'import torch, pydantic, sqlalchemy; print("torch", torch.__version__, "cuda", torch.version.cuda, "pydantic", pydantic.VERSION, "sqlalchemy", sqlalchemy.__version__)'
} 2>&1 | tee "$OUT/machine.txt"
t0=$(date +%s)
timeout "${RUN_LIMIT_S:-500}" python3 -m charllm.cli run "$CAMPAIGN" 2>&1 | tee "$OUT/run.log"
rc=${PIPESTATUS[0]}
echo "charllm run exit code $rc after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/run.log"
python3 -m charllm.cli status "$CAMPAIGN" > "$OUT/status.txt" 2>&1
# tables, figures, report, and each cell's result/manifest (telemetry parquet kept in results)
tar -C "$CHARLLM_HOME" -czf "$OUT/tables-figures.tgz" tables figures 2>/dev/null
tar -C "$CHARLLM_HOME" -czf "$OUT/results.tgz" results 2>/dev/null
ls -la "$OUT"
exit "$rc"

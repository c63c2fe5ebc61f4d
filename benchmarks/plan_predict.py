"""``charllm plan --predict`` of the four CharLLM-PPT paper campaigns: predicted GPU-hours, pruned cells.

For each paper campaign (Fig 4 parallelism, H200 optimisation, micro batch, H100 optimisation)
the models' GPU-hours per prune mode (none, oom, dominated), as separate runs and for the
unique cells after dedupe (a cell shared by campaigns runs once), against the seed's 7,808
GPU-hours for its four sweeps (docs/analysis.md) and the job-time-limit bound ``plan`` gave
before. No layer profiles of these models exist yet: every cell is priced by the calibrated
roofline (``charllm.predict.timing``), its memory by ``charllm.predict.memory``.

Run: .venv/bin/python benchmarks/plan_predict.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charllm.campaign import load_campaign
from charllm.predict.plan import PRUNE_MODES, CellPrediction, predict_campaign, totals

REPO = Path(__file__).resolve().parents[1]
PAPER = ["charllm-fig4-parallelism.yaml", "charllm-h200-opt.yaml", "charllm-microbatch.yaml", "charllm-h100-opt.yaml"]
SEED_GPU_HOURS = 7808.0


def main() -> int:
    t0 = time.perf_counter()
    loaded = [load_campaign(REPO / "include" / "campaigns" / f, check=False) for f in PAPER]
    print(
        f"{'campaign':<32} {'cells':>5} {'OOM':>4} "
        + " ".join(f"{'GPU-h ' + m:>16}" for m in PRUNE_MODES)
        + f" {'limit bound':>12}"
    )
    sums = dict.fromkeys(PRUNE_MODES, 0.0)
    limit_sum = 0.0
    unique: dict[str, dict[str, CellPrediction]] = {m: {} for m in PRUNE_MODES}
    skipped: dict[str, list[CellPrediction]] = {m: [] for m in PRUNE_MODES}
    for f, lc in zip(PAPER, loaded, strict=True):
        row = {}
        for mode in PRUNE_MODES:
            preds = predict_campaign(lc, prune=mode)
            t = totals(preds)
            row[mode] = t
            sums[mode] += t["gpu_hours"]
            for p in preds:
                unique[mode].setdefault(p.cell.cell_id, p)
                if p.action == "skip":
                    skipped[mode].append(p)
        limit_sum += row["none"]["limit_hours"]
        print(
            f"{f:<32} {int(row['none']['cells']):>5} {int(row['none']['predicted_oom']):>4} "
            + " ".join(f"{row[m]['gpu_hours']:>16,.0f}" for m in PRUNE_MODES)
            + f" {row['none']['limit_hours']:>12,.0f}"
        )
    print(
        f"{'all four (separate runs)':<32} {'':>5} {'':>4} "
        + " ".join(f"{sums[m]:>16,.0f}" for m in PRUNE_MODES)
        + f" {limit_sum:>12,.0f}"
    )
    uniq = {m: sum(p.spent_hours for p in unique[m].values()) for m in PRUNE_MODES}
    print(
        f"{'unique cells after dedupe':<32} {len(unique['none']):>5} {'':>4} "
        + " ".join(f"{uniq[m]:>16,.0f}" for m in PRUNE_MODES)
    )
    print()
    for m in PRUNE_MODES:
        print(
            f"prune {m:<9}: {sums[m]:,.0f} GPU-h as four runs ({sums[m] / SEED_GPU_HOURS:.2f}x the seed's {SEED_GPU_HOURS:,.0f}), "
            f"{uniq[m]:,.0f} for the unique cells ({uniq[m] / SEED_GPU_HOURS:.2f}x); "
            f"{len({p.cell.cell_id for p in skipped[m]})} unique cells skipped"
        )
    for m in ("oom", "dominated"):
        seen: set[str] = set()
        print(f"\ncells skipped by prune {m}:")
        for p in skipped[m]:
            if p.cell.cell_id in seen:
                continue
            seen.add(p.cell.cell_id)
            print(f"  {p.cell.name:<52} {p.reason}")
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

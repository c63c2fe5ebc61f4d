"""The Perseus planner against the published artifact (SOSP'24, Apache-2.0): Table 6 and the frontier.

Part 1 (instant): the intrinsic energy saving of every Table 6 row (GPT-3 175B and Bloom, A100-SXM
and A40, 12/24/48/96 micro batches) from the published frontier files: the frontier's energy at
its minimum iteration time against our all-maximum-frequency baseline
(:func:`charllm.energy.planner.all_max`: every instruction at its highest frequency, times in 1 ms
units, P2P blocking power for every idle GPU-second). Prints ours, the paper's, the difference,
and the blocking power that would reproduce the paper's figure exactly.

Part 2 (about 20 s a row at 12 micro batches, minutes at 48/96): our planner (lowtime's
min-cut frontier) on the published profiles (default: A100-SXM, GPT-3 175B and Bloom, 12 micro
batches; the A40 frontiers step 0.1 ms, ten times the iterations): minimum iteration time, the
intrinsic saving with and without the blocking energy, and how far our frontier's energies are
from the published frontier's at equal times.

    .venv/bin/python benchmarks/perseus_frontier.py [--data DIR] [--rows none|model:gpu:m,...] [--json OUT]

Data: ``--data``, else ``$CHARLLM_PERSEUS_DATA``, else ``../shared/data/perseus-sosp24`` beside the checkout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charllm.energy import planner
from charllm.energy.attribution import read_stage_profile

P2P_W = 83.64  # the artifact's A100 blocking power; the A40's is not published with the data
TABLE6 = {  # paper Table 6, intrinsic saving (%) at 12 / 24 / 48 / 96 micro batches
    ("gpt3-175b", "a100_sxm"): (15.2, 14.2, 13.6, 13.3),
    ("gpt3-175b", "a40"): (11.8, 10.2, 9.3, 8.9),
    ("bloom", "a100_sxm"): (10.5, 7.1, 5.2, 4.3),
    ("bloom", "a40"): (7.0, 4.5, 3.1, 2.4),
}
MBS = (12, 24, 48, 96)
UNIT_S = {"a100_sxm": 0.001, "a40": 0.0001}  # the published frontiers' time steps: 1 ms (A100), 0.1 ms (A40)


def frontier_file(data: Path, model: str, dev: str, m: int) -> list[tuple[float, float]]:
    with (data / "iteration_time_energy" / dev / f"{model}_bf16_mb{m}.csv").open() as fh:
        return [(float(r["time"]), float(r["energy"])) for r in csv.DictReader(fh)]


def table6(data: Path) -> list[dict]:
    out = []
    for (model, dev), pubs in TABLE6.items():
        prof = read_stage_profile(data / "stage_profile" / f"{model}+{dev}_bf16.csv")
        for m, pub in zip(MBS, pubs, strict=True):
            base = planner.all_max(prof, m, P2P_W)
            t_min, e_min = min(frontier_file(data, model, dev, m))
            ours = planner.saving(base.energy, e_min)
            inst = base.energy - P2P_W * base.idle_s
            p_match = (e_min / (1 - pub / 100) - inst) / base.idle_s
            out.append({"model": model, "device": dev, "micro_batches": m, "all_max_time_s": base.time,
                        "frontier_min_time_s": t_min, "all_max_energy_j": base.energy, "frontier_energy_j": e_min,
                        "saving_pct": ours, "paper_pct": pub, "diff_points": ours - pub,
                        "p2p_w_matching_paper": p_match})  # fmt: skip
    return out


def plan_row(data: Path, model: str, dev: str, m: int) -> dict:
    prof = read_stage_profile(data / "stage_profile" / f"{model}+{dev}_bf16.csv")
    unit = UNIT_S[dev]
    t0 = time.monotonic()
    pts = list(planner.frontier(prof, m, P2P_W, unit_s=unit))
    took = time.monotonic() - t0
    base = planner.all_max(prof, m, P2P_W, unit_s=unit)
    # computation energy only (no blocking): the fastest plan's fitted cost against all-max's profiled sum
    last = pts[-1]
    busy = sum(planner.quantise(prof[(k[0], k[1])][f][0], unit) for k, f in last.plan.items())
    fitted_compute = last.energy - P2P_W * (planner.stages_of(prof) * last.time - busy)
    compute_max = sum(v[max(v)][1] * m for v in prof.values())
    pub = {round(t, 4): e for t, e in frontier_file(data, model, dev, m)}
    rel = [abs(p.energy - pub[round(p.time, 4)]) / pub[round(p.time, 4)] for p in pts if round(p.time, 4) in pub]
    return {"model": model, "device": dev, "micro_batches": m, "seconds": took, "points": len(pts),
            "published_points": len(pub), "min_time_s": pts[-1].time, "max_time_s": pts[0].time,
            "saving_pct_fitted": planner.saving(base.energy, pts[-1].energy),
            "saving_pct_profiled": planner.saving(base.energy, pts[-1].energy_profiled),
            "saving_compute_pct": planner.saving(compute_max, fitted_compute),
            "paper_pct": dict(zip(MBS, TABLE6[(model, dev)], strict=True))[m],
            "energy_vs_published_max_rel": max(rel) if rel else None,
            "energy_vs_published_mean_rel": sum(rel) / len(rel) if rel else None}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    default = os.environ.get("CHARLLM_PERSEUS_DATA") or str(
        Path(__file__).resolve().parents[2] / "shared/data/perseus-sosp24"
    )
    ap.add_argument("--data", type=Path, default=Path(default))
    ap.add_argument(
        "--rows",
        default="gpt3-175b:a100_sxm:12,bloom:a100_sxm:12",
        help="rows to plan, model:gpu:micro_batches comma-separated, or none (A40 rows: 0.1 ms steps, slow)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = table6(args.data)
    print(f"Table 6 from the published frontier files (P2P {P2P_W} W for both GPUs):")
    print(
        f"{'model':<10} {'gpu':<9} {'m':>3} {'T_allmax':>9} {'T_front':>8} {'ours %':>7} {'paper %':>7} {'diff':>6} {'P2P W to match':>14}"
    )
    for r in rows:
        print(f"{r['model']:<10} {r['device']:<9} {r['micro_batches']:>3} {r['all_max_time_s']:>9.3f} "
              f"{r['frontier_min_time_s']:>8.3f} {r['saving_pct']:>7.2f} {r['paper_pct']:>7.1f} "
              f"{r['diff_points']:>+6.2f} {r['p2p_w_matching_paper']:>14.1f}")  # fmt: skip
    within = sum(abs(r["diff_points"]) <= 0.1 for r in rows)
    print(
        f"{within} of {len(rows)} rows within +-0.1 points; A100 rows: max |diff| "
        f"{max(abs(r['diff_points']) for r in rows if r['device'] == 'a100_sxm'):.2f} points"
    )
    planned = []
    if args.rows != "none":
        todo = [(mo, dev, int(m)) for mo, dev, m in (r.split(":") for r in args.rows.split(","))]
        for mo, dev, m in todo:
            r = plan_row(args.data, mo, dev, m)
            planned.append(r)
            print(f"planner {mo} {dev} m={m}: {r['points']} points ({r['published_points']} published) in "
                  f"{r['seconds']:.1f} s; min time {r['min_time_s']:.3f} s (max {r['max_time_s']:.3f}); saving "
                  f"{r['saving_pct_fitted']:.2f} % fitted / {r['saving_pct_profiled']:.2f} % profiled, computation "
                  f"energy only {r['saving_compute_pct']:.2f} % (paper {r['paper_pct']}); energy vs "
                  f"published frontier at equal time: mean {r['energy_vs_published_mean_rel'] * 100:.3f} %, "
                  f"max {r['energy_vs_published_max_rel'] * 100:.3f} %", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"table6": rows, "planner": planned}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

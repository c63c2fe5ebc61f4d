"""The CharLLM-PPT catalog as campaigns: cells, unique cells after dedupe, and GPU-hours.

For each paper campaign file: its cells and GPUs, an upper bound on GPU-hours (every cell
runs to its cluster's job time limit: limit x GPUs x repeats), and an estimate from the seed
README's sweep durations (each sweep's MP and FSDP hours spread evenly over its MP and FSDP
cells, times the cell's GPUs). Then the same after dedupe by content hash (a cell shared by
several campaigns runs once), against the seed's own script set: ~380 sbatch files, ~200
jobs, 16 h + 60 h + 48 h + 60 h of sweeps on 32 H200 / 64 H100.

Run: .venv/bin/python benchmarks/plan_catalog.py
"""

from __future__ import annotations

from pathlib import Path

from charllm.backends.base import parse_time_limit
from charllm.campaign import Cell, LoadedCampaign, dedupe, load_campaign

REPO = Path(__file__).resolve().parent.parent
CAMPAIGNS = REPO / "include" / "campaigns"

# campaign file -> (seed sweep, MP hours, FSDP hours) from the seed README
SEED_SWEEPS: dict[str, tuple[str, float, float]] = {
    "charllm-fig4-parallelism.yaml": ("Parallelism sweep (Fig 4)", 6.0, 10.0),
    "charllm-h200-opt.yaml": ("H200 optimisation sweep", 24.0, 36.0),
    "charllm-microbatch.yaml": ("Microbatch sweep", 24.0, 24.0),
    "charllm-h100-opt.yaml": ("H100 optimisation sweep", 24.0, 36.0),
}
# the seed's per-job limits: 30 min (H200), 1 h (H100), 10 h for FSDP jobs; the cluster
# profiles carry the first two, the campaigns' time_limits rules the third (see docs/analysis.md)
SEED_SBATCH_FILES = 380
SEED_JOBS = 200


def per_cell_hours(lc: LoadedCampaign, mp_h: float, fsdp_h: float) -> dict[str, float]:
    """Wall hours per cell: the sweep's MP (FSDP) hours over its MP (FSDP) cells."""
    mp = [c for c in lc.cells if not c.parallel.fsdp]
    fs = [c for c in lc.cells if c.parallel.fsdp]
    out = {c.cell_id: mp_h / len(mp) for c in mp}
    out.update({c.cell_id: fsdp_h / len(fs) for c in fs})
    return out


def job_limit_s(lc: LoadedCampaign, cell: Cell) -> int:
    """The cell's own job limit (the campaign's ``time_limits`` give FSDP cells the seed's 10 h)."""
    return parse_time_limit(lc.cluster_for(cell).time_limit)


def main() -> None:
    loaded = {f: load_campaign(CAMPAIGNS / f) for f in SEED_SWEEPS}
    wall: dict[str, float] = {}  # cell id -> estimated wall hours (first campaign that has it)
    cells: dict[str, Cell] = {}
    reps: dict[str, int] = {}
    limit_s: dict[str, int] = {}
    print(
        f"{'campaign file':<32} {'cells':>5} {'GPUs':>9} {'limit':>8} {'GPU-h bound':>12} {'GPU-h est':>10}"
        f" {'seed sweep':>26} {'seed h':>7} {'seed GPU-h':>11}"
    )
    tot = [0, 0.0, 0.0, 0.0]
    for f, (sweep, mp_h, fs_h) in SEED_SWEEPS.items():
        lc = loaded[f]
        h = per_cell_hours(lc, mp_h, fs_h)
        bound = sum(job_limit_s(lc, c) / 3600 * c.world_size * lc.campaign.repeats for c in lc.cells)
        est = sum(h[c.cell_id] * c.world_size * lc.campaign.repeats for c in lc.cells)
        seed_gpu_h = (mp_h + fs_h) * lc.cluster.total_gpus  # a seed sweep holds the whole cluster
        gpus = sorted({c.world_size for c in lc.cells})
        print(
            f"{f:<32} {len(lc.cells):>5} {'/'.join(map(str, gpus)):>9} {lc.cluster.time_limit:>8} {bound:>12,.0f}"
            f" {est:>10,.0f} {sweep:>26} {mp_h + fs_h:>7.0f} {seed_gpu_h:>11,.0f}"
        )
        tot[0] += len(lc.cells)
        tot[1] += bound
        tot[2] += est
        tot[3] += seed_gpu_h
        for c in lc.cells:
            if c.cell_id not in cells:
                cells[c.cell_id], wall[c.cell_id] = c, h[c.cell_id]
                reps[c.cell_id], limit_s[c.cell_id] = lc.campaign.repeats, job_limit_s(lc, c)
            else:
                wall[c.cell_id] = min(wall[c.cell_id], h[c.cell_id])
                reps[c.cell_id] = max(reps[c.cell_id], lc.campaign.repeats)
    print(
        f"{'all four (as separate runs)':<32} {tot[0]:>5} {'':>9} {'':>8} {tot[1]:>12,.0f} {tot[2]:>10,.0f}"
        f" {'':>26} {16 + 60 + 48 + 60:>7} {tot[3]:>11,.0f}"
    )
    owners = dedupe(list(loaded.values()))
    uniq_bound = sum(limit_s[i] / 3600 * cells[i].world_size * reps[i] for i in owners)
    uniq_est = sum(wall[i] * cells[i].world_size * reps[i] for i in owners)
    shared = {i: o for i, o in owners.items() if len(o) > 1}
    print(f"{'unique after dedupe':<32} {len(owners):>5} {'':>9} {'':>8} {uniq_bound:>12,.0f} {uniq_est:>10,.0f}")
    print()
    print(
        f"cells shared by several campaigns: {len(shared)} (each run once); "
        f"saved {tot[0] - len(owners)} jobs, {tot[2] - uniq_est:,.0f} estimated GPU-hours "
        f"({(tot[2] - uniq_est) / tot[2]:.0%})"
    )
    by = {}
    for o in shared.values():
        by[", ".join(sorted(o))] = by.get(", ".join(sorted(o)), 0) + 1
    for k, v in by.items():
        print(f"  {v:>3} cells in: {k}")
    wall_h = sum(wall.values())  # every paper cell holds its whole cluster: cells run one after another
    print(f"estimated wall time: {16 + 60 + 48 + 60} h as the seed's four sweeps, {wall_h:.0f} h for the unique cells")
    print(
        f"seed: ~{SEED_SBATCH_FILES} hand-written sbatch files for ~{SEED_JOBS} jobs; "
        f"here: {len(SEED_SWEEPS)} campaign files, {tot[0]} cells, {len(owners)} jobs to run"
    )
    print(
        "estimates: 'GPU-h est' spreads each seed sweep's README hours evenly over that sweep's MP and FSDP cells; "
        "'GPU-h bound' assumes every cell runs to its job time limit (the cluster's; 10 h for FSDP cells)."
    )


if __name__ == "__main__":
    main()

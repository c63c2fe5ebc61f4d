"""``charllm energy-plan CAMPAIGN CELL``: the time-energy frontier of a cell's stage profile.

The profile is the cell's own (its latest ``ok`` result of a ``profile: instructions`` run:
per-rank timelines + NVML energy, :mod:`.runprofile`) or ``--profile stage_profile.csv``
(Zeus's schema, e.g. the Perseus artifact's). Writes into ``--out`` (default
``$CHARLLM_HOME/energy-plan/<cell>``): ``stage_profile.csv`` (when built from the run),
``frontier.csv`` (``time,energy,energy_profiled``), ``plans.jsonl`` (every frontier point's
frequency per instruction, slowest first; a cell runs one with ``frequency_plan:
energy-plan/<cell>/plans.jsonl[@point]``, :mod:`.freqplan`), ``summary.json`` (minimum iteration
time, all-maximum baseline, intrinsic saving in the paper's Table 6 accounting), ``frontier.png`` and ``timeline.png`` (the minimum-time plan's Gantt
chart, coloured by power). Needs ``lowtime`` (``pip install 'charllm[energy]'``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from charllm.errors import ConfigError

DEFAULT_UNIT_S = 0.001


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "energy-plan",
        help="time-energy frontier and frequency plans of a cell's pipeline stage profile (Perseus)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="campaign YAML")
    p.add_argument("cell", help="cell name, glob or id prefix (exactly one cell)")
    p.add_argument("--profile", type=Path, help="a stage_profile.csv to plan instead of the cell's own run")
    p.add_argument("--micro-batches", type=int, help="micro batches per iteration (default: the cell's)")
    p.add_argument(
        "--p2p-w", type=float, required=True, help="P2P blocking power of one GPU (W), measured with >= 2 GPUs"
    )
    p.add_argument("--unit-s", type=float, default=DEFAULT_UNIT_S, help="time quantum of the planner (s)")
    p.add_argument("--out", type=Path, help="output folder")
    p.set_defaults(fn=cmd_energy_plan)


def _cell(args: argparse.Namespace) -> Any:
    from charllm.campaign import load_campaign

    lc = load_campaign(args.file, check=False)
    cells = lc.select(args.cell)
    if len(cells) != 1:
        names = ", ".join(c.name for c in cells[:5])
        raise ConfigError(args.file, "cell", f"{args.cell!r} matches {len(cells)} cells ({names}); name exactly one")
    return cells[0]


def _run_dir(cell: Any) -> Path:
    from charllm.catalog import Catalog

    cat = Catalog()
    for repeat in range(16):
        row = cat.valid_result(cell.cell_id, repeat)
        if row is not None and row.outcome == "ok" and row.result_dir:
            hits = sorted(Path(row.result_dir).rglob("instructions-0.csv"))
            if hits:
                return hits[0].parent
    raise ConfigError(
        "catalog",
        "cell",
        f"cell {cell.name} has no ok result with instruction timelines; run it with profile: instructions",
    )


def cmd_energy_plan(args: argparse.Namespace) -> int:
    from charllm import paths
    from charllm.energy import planner
    from charllm.energy.attribution import read_stage_profile, write_stage_profile
    from charllm.energy.figures import frontier_figure, gantt_figure

    cell = _cell(args)
    m = args.micro_batches or cell.grad_accum
    if not 1 <= m <= 4096 or not 0 < args.unit_s <= 1 or not 0 <= args.p2p_w <= 5000:
        raise ConfigError("command line", "micro-batches/unit-s/p2p-w", "out of range (1..4096, (0, 1] s, 0..5000 W)")
    out = args.out or paths.home() / "energy-plan" / cell.name
    out.mkdir(parents=True, exist_ok=True)
    run_summary: list[dict[str, Any]] = []
    if args.profile is not None:
        src = args.profile
    else:
        from charllm.energy.runprofile import run_profile

        rows, run_summary = run_profile(_run_dir(cell))
        src = out / "stage_profile.csv"
        write_stage_profile(rows, src)
    try:
        prof = read_stage_profile(src)
    except (OSError, ValueError) as err:
        raise ConfigError(str(src), "profile", str(err)) from None
    base = planner.all_max(prof, m, args.p2p_w, args.unit_s)
    try:
        points = list(planner.frontier(prof, m, args.p2p_w, args.unit_s))
    except RuntimeError as err:
        print(f"charllm: error: {err}", file=sys.stderr)
        return 2
    with (out / "frontier.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["time", "energy", "energy_profiled"])
        for p in points:
            w.writerow([f"{p.time:.6f}", repr(p.energy), repr(p.energy_profiled)])
    with (out / "plans.jsonl").open("w") as fh:
        for p in points:
            plan = [[s, i, mb, f] for (s, i, mb), f in sorted(p.plan.items())]
            fh.write(json.dumps({"time": p.time, "energy": p.energy, "plan": plan}) + "\n")
    fastest = points[-1]
    busy = sum(planner.quantise(prof[(k[0], k[1])][f][0], args.unit_s) for k, f in fastest.plan.items())
    fitted_compute = fastest.energy - args.p2p_w * (planner.stages_of(prof) * fastest.time - busy)
    compute_max = sum(v[max(v)][1] * m for v in prof.values())
    summary = {
        "cell": cell.name,
        "profile": str(src),
        "micro_batches": m,
        "p2p_w": args.p2p_w,
        "unit_s": args.unit_s,
        "min_iteration_time_s": fastest.time,
        "energy_at_min_time_j": fastest.energy,
        "energy_at_min_time_profiled_j": fastest.energy_profiled,
        "all_max": {"time_s": base.time, "energy_j": base.energy},
        # Perseus Table 6's accounting (reproduces all 16 rows, docs/energy.md): the fastest plan's energy
        # against all-max over the same iteration time, profiled unquantised all-max times and energies
        "intrinsic_saving_pct": planner.intrinsic_saving(prof, m, args.p2p_w, fastest.time, fastest.energy),
        "intrinsic_saving_profiled_pct": planner.intrinsic_saving(
            prof, m, args.p2p_w, fastest.time, fastest.energy_profiled
        ),
        # against all-max on its own quantised schedule (its own iteration time), and computation energy only
        "saving_vs_all_max_schedule_pct": planner.saving(base.energy, fastest.energy_profiled),
        "intrinsic_saving_compute_pct": planner.saving(compute_max, fitted_compute),
        "frontier_points": len(points),
        "run": run_summary,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    frontier_figure(points, out / "frontier.png", (base.time, base.energy))
    gantt_figure(prof, m, fastest.plan, out / "timeline.png", args.unit_s)
    print(
        f"{cell.name}: {len(points)} frontier points; minimum iteration time {fastest.time:.3f} s at "
        f"{fastest.energy_profiled:.1f} J (all max: {base.time:.3f} s, {base.energy:.1f} J): intrinsic saving "
        f"{summary['intrinsic_saving_pct']:.2f} %; written to {out}"
    )
    return 0

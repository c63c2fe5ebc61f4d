"""``charllm search`` on the generated scenarios: steps and wall time, pruned and unpruned.

The Metis variant's table rows 1-3 (10 blocks on 16+16 GPUs, 20 on 32+32, 20 on 64+64), here
H100 + H200 nodes of 8, Llama-3 70B blocks at seq 8192, global batch 128, roofline profiles
(:mod:`charllm.predict.search_scenarios`). For each: the candidate plans, the unpruned and the
memory-first pruned search's evaluation steps and wall time, the plans that fit, the best cost
(equal in both: asserted), and the total wall time of the three (target: under 2 minutes).
``--max-group-sizes 3`` widens the space (three group sizes per pool); ``--max-stages`` deepens it;
``--per-stage`` gives every stage its own strategy (exponential in the stages: use few).

Run: .venv/bin/python benchmarks/search_scenarios.py [--max-group-sizes N] [--max-stages N] [--per-stage]
     [--only NAME] [--repeat N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from charllm.predict.search import search
from charllm.predict.search_scenarios import SCENARIOS, scenario


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-group-sizes", type=int, default=2)
    ap.add_argument("--max-stages", type=int, default=8)
    ap.add_argument("--per-stage", action="store_true", help="a strategy per stage, not per class")
    ap.add_argument("--only", default=None, help="one scenario by name (e.g. 10L-16+16)")
    ap.add_argument("--repeat", type=int, default=3, help="timings: the median of this many runs")
    args = ap.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {args.repeat} runs each (median)")
    print(
        f"space: at most {args.max_stages} stages, {args.max_group_sizes} group sizes per pool, "
        f"strategies per {'stage' if args.per_stage else 'class'}"
    )
    hdr = f"{'scenario':<11} {'candidates':>10} {'unpruned':>9} {'pruned':>8} {'ratio':>6} {'fit':>7} "
    print(hdr + f"{'t unpruned':>11} {'t pruned':>9}  best s/iteration")
    total = 0.0
    ratios = []
    for name, blocks, each in SCENARIOS:
        if args.only and name != args.only:
            continue
        times: dict[bool, list[float]] = {False: [], True: []}
        res = {}
        for _ in range(args.repeat):
            for prune in (False, True):
                prob = scenario(blocks, each, args.max_stages, args.max_group_sizes, args.per_stage)
                t = time.perf_counter()
                res[prune] = search(prob, prune=prune)
                times[prune].append(time.perf_counter() - t)
        full, pruned = res[False], res[True]
        assert pruned.ranked == full.ranked, f"{name}: pruning changed the plans"
        ratio = pruned.steps / full.steps
        ratios.append(ratio)
        tf, tpr = statistics.median(times[False]), statistics.median(times[True])
        total += tf + tpr
        print(
            f"{name:<11} {full.candidates:>10} {full.steps:>9} {pruned.steps:>8} {ratio:>6.3f} {len(full.ranked):>7} "
            f"{tf:>10.2f}s {tpr:>8.2f}s  {full.ranked[0][0]:.4f}"
        )
        best = pruned.best
        assert best is not None
        print(f"            best: {best.describe()}")
    print(f"{len(ratios)} scenario(s), both searches: {total:.2f} s (target for the three: < 120 s)")
    print(f"pruned/unpruned steps: max {max(ratios):.3f} (<= 0.95), min {min(ratios):.3f} (<= 0.80)")
    return 0 if total < 120 and max(ratios) <= 0.95 and min(ratios) <= 0.80 else 1


if __name__ == "__main__":
    raise SystemExit(main())

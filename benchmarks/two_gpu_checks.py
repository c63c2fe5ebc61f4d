"""The pass/fail checks of the two-GPU validation run (issue 17), from what the run left behind.

Reads the campaign tables (``cells``/``kernels`` Parquet that ``charllm run`` aggregates), the
Perseus PP2 cells' instruction timelines, and the planner's predictions, and prints one line a
check (``PASS``/``FAIL``/``n/a`` and the numbers). Runs on the orchestrator or the GPU node:

    python3 benchmarks/two_gpu_checks.py --home $CHARLLM_HOME [--json OUT.json]

Checks (each one skipped as ``n/a`` when its campaign has no tables yet):

- ``small``: every cell of ``ppt_small`` and ``ppt_small_megatron`` ended ``ok``;
- ``cc``: for each megatron layout with communication (DP2, TP2, PP2, EP2), code 10000 ("cc")
  has a median step time <= code 00000's, and its *exposed* communication share is down by
  >= 30 %. Exposed communication per step is estimated from the kernel breakdown as the step time
  minus the compute kernels' time per profiled step (matmul + attention + other, rank 0): the
  part of the step in which no compute kernel ran (communication not hidden, and launch gaps);
- ``perseus``: for each PP2 cell of ``perseus_pp2_local``, the measured bubble fraction of stage 0
  (1 - busy / step) is within 2 points of (p - 1) / (m + p - 1);
- ``predict``: ``charllm plan --predict``'s step time of the DP2 / TP2 / PP2 cells of
  ``ppt_small`` within +-15 % of the measured, and the three in the measured order.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COMPUTE = ("matmul", "attention", "other")
COMM = ("all-reduce", "reduce-scatter", "all-gather", "send/recv")


def _tables(home: Path, campaign: str) -> dict[str, Any] | None:
    import pandas as pd

    d = home / "tables" / campaign
    if not (d / "cells.parquet").is_file():
        return None
    out = {"cells": pd.read_parquet(d / "cells.parquet")}
    if (d / "kernels.parquet").is_file():
        out["kernels"] = pd.read_parquet(d / "kernels.parquet")
    return out


def _line(results: list[dict[str, Any]], check: str, ok: bool | None, what: str) -> None:
    word = "n/a " if ok is None else ("PASS" if ok else "FAIL")
    print(f"{word} {check:8s} {what}", flush=True)
    results.append({"check": check, "ok": ok, "what": what})


def check_all_ok(results: list[dict[str, Any]], home: Path) -> None:
    for campaign in ("ppt_small", "ppt_small_megatron"):
        t = _tables(home, campaign)
        if t is None:
            _line(results, "small", None, f"{campaign}: no tables")
            continue
        cells = t["cells"]
        bad = cells[cells["outcome"] != "ok"]
        names = ", ".join(f"{r.cell_name} ({r.outcome})" for r in bad.itertuples())
        _line(results, "small", bad.empty, f"{campaign}: {len(cells) - len(bad)} of {len(cells)} cells ok {names}")


def exposed_share(cell: Any, kernels: Any, profile_steps: int = 3) -> tuple[float, float]:
    """(exposed communication s per step, its share of the step) of one cell (rank 0's kernels)."""
    k = kernels[(kernels["cell_id"] == cell.cell_id) & (kernels["rank"] == 0)]
    compute = float(k[k["category"].isin(COMPUTE)]["time_s"].sum()) / profile_steps
    step = float(cell.step_time_median_s)
    exposed = max(0.0, step - compute)
    return exposed, exposed / step if step > 0 else math.nan


def check_cc(results: list[dict[str, Any]], home: Path) -> None:
    t = _tables(home, "ppt_small_megatron")
    if t is None or "kernels" not in t:
        _line(results, "cc", None, "ppt_small_megatron: no cells/kernels tables")
        return
    cells, kernels = t["cells"], t["kernels"]
    ok_cells = cells[cells["outcome"] == "ok"].copy()
    ok_cells["layout"] = ok_cells["cell_name"].str.replace(r"-(00000|10000)$", "", regex=True)
    for layout, g in ok_cells.groupby("layout"):
        codes = {str(r.cell_name)[-5:]: r for r in g.itertuples()}
        if "00000" not in codes or "10000" not in codes:
            continue
        base, cc = codes["00000"], codes["10000"]
        _, share_b = exposed_share(base, kernels)
        _, share_c = exposed_share(cc, kernels)
        down = 1 - share_c / share_b if share_b > 0 else math.nan
        faster = cc.step_time_median_s <= base.step_time_median_s
        ok = bool(faster and down >= 0.30)
        _line(
            results,
            "cc",
            ok,
            f"{layout}: step {base.step_time_median_s:.4f} -> {cc.step_time_median_s:.4f} s (cc <= base: {faster}); "
            f"exposed communication {share_b:.1%} -> {share_c:.1%} of the step ({down:+.0%} down, >= 30 %)",
        )


def bubble_fraction(out_dir: Path, rank: int = 0) -> tuple[float, int]:
    """Median over the measured steps of 1 - busy / step on ``rank``, and the micro-batch count."""
    from charllm.energy.attribution import read_timeline

    rows = read_timeline(out_dir / f"instructions-{rank}.csv")
    steps: dict[int, list[Any]] = {}
    for r in rows:
        steps.setdefault(r.step, []).append(r)
    fracs, m = [], 0
    for s in sorted(steps)[1:]:  # the first measured step warms the pipeline's buffers
        rs = steps[s]
        busy = sum(r.end - r.start for r in rs)
        span = max(r.end for r in rs) - min(r.start for r in rs)
        m = len({r.micro_batch for r in rs})
        if span > 0:
            fracs.append(1 - busy / span)
    fracs.sort()
    return (fracs[len(fracs) // 2] if fracs else math.nan), m


def blocking_power_w(out_dir: Path, rank: int) -> float:
    """Mean power of ``rank``'s GPU while it waits between its instructions (P2P blocking), from
    the counter series: energy over the gaps of the measured steps / their length."""
    import numpy as np
    import pandas as pd

    from charllm.energy.attribution import read_timeline

    rows = sorted(read_timeline(out_dir / f"instructions-{rank}.csv"), key=lambda r: r.start)
    df = pd.read_parquet(out_dir / "telemetry" / f"rank{rank}.parquet", columns=["unix_s", "energy_total_j"])
    df = df.dropna().sort_values("unix_s")
    t, e = df["unix_s"].to_numpy(), df["energy_total_j"].to_numpy()
    first = min(r.step for r in rows)
    rows = [r for r in rows if r.step > first]
    joules = seconds = 0.0
    for a, b in itertools.pairwise(rows):
        if b.step != a.step or b.start - a.end < 0.005:
            continue
        ea, eb = np.interp([a.end, b.start], t, e)
        joules += float(eb - ea)
        seconds += b.start - a.end
    return joules / seconds if seconds > 0 else math.nan


def check_perseus(results: list[dict[str, Any]], home: Path) -> None:
    t = _tables(home, "perseus_pp2_local")
    if t is None:
        _line(results, "perseus", None, "perseus_pp2_local: no tables")
        return
    from charllm.catalog import Catalog

    cat = Catalog(f"sqlite:///{home / 'catalog.db'}")
    for row in t["cells"].itertuples():
        atts = [a for a in cat.attempts(cell_id=row.cell_id) if a.outcome == "ok" and a.result_dir]
        if not atts:
            _line(results, "perseus", False, f"{row.cell_name}: no ok attempt")
            continue
        out = Path(atts[-1].result_dir) / "out"
        frac, m = bubble_fraction(out)
        p = 2
        want = (p - 1) / (m + p - 1)
        _line(
            results,
            "perseus",
            abs(frac - want) <= 0.02,
            f"{row.cell_name}: bubble {frac:.3f} vs (p-1)/(m+p-1) = {want:.3f} (m={m}; within 2 points)",
        )
        watts = [blocking_power_w(out, r) for r in (0, 1) if (out / "telemetry" / f"rank{r}.parquet").is_file()]
        _line(
            results,
            "p2p",
            bool(watts) and all(w == w and w > 0 for w in watts),
            f"{row.cell_name}: P2P blocking power per stage {', '.join(f'{w:.1f} W' for w in watts)} "
            "(energy counter over the waits between instructions)",
        )


def check_predict(results: list[dict[str, Any]], home: Path) -> None:
    t = _tables(home, "ppt_small")
    if t is None:
        _line(results, "predict", None, "ppt_small: no tables")
        return
    from charllm.campaign import load_campaign
    from charllm.predict.plan import predict_campaign

    lc = load_campaign(REPO / "include" / "campaigns" / "charllm-small.yaml")
    preds = {p.cell.cell_id: p for p in predict_campaign(lc, prune="none")}
    cells = t["cells"]
    wanted = {
        "DP2": "gpt3-1.3b-L4-tp1pp1dp2-mb2-gb32-s2048-00000",
        "TP2": "gpt3-1.3b-L4-tp2pp1dp1-mb2-gb32-s2048-00000",
        "PP2": "gpt3-1.3b-L4-tp1pp2dp1-mb2-gb32-s2048-00000",
    }
    pairs = []
    for label, name in wanted.items():
        row = cells[(cells["cell_name"] == name) & (cells["outcome"] == "ok")]
        if row.empty:
            _line(results, "predict", None, f"{label} ({name}): not measured")
            continue
        r = row.iloc[0]
        pred = preds[str(r["cell_id"])].step.step_s
        meas = float(r["step_time_median_s"])
        err = pred / meas - 1
        pairs.append((label, pred, meas))
        _line(
            results, "predict", abs(err) <= 0.15, f"{label}: predicted {pred:.4f} s, measured {meas:.4f} s ({err:+.1%})"
        )
    if len(pairs) == 3:
        by_pred = [p[0] for p in sorted(pairs, key=lambda p: p[1])]
        by_meas = [p[0] for p in sorted(pairs, key=lambda p: p[2])]
        _line(results, "predict", by_pred == by_meas, f"ranking predicted {by_pred} vs measured {by_meas}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True, help="CHARLLM_HOME of the run (tables/, catalog.db)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    results: list[dict[str, Any]] = []
    check_all_ok(results, args.home)
    check_cc(results, args.home)
    check_perseus(results, args.home)
    check_predict(results, args.home)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    failed = [r for r in results if r["ok"] is False]
    print(f"{len(results)} checks: {sum(r['ok'] is True for r in results)} pass, {len(failed)} fail, "
          f"{sum(r['ok'] is None for r in results)} n/a")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

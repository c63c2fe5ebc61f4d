"""The 1F1B DAG and the frontier planner on the published Perseus profile (GPT-3 175B, A100-SXM)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from charllm.energy import planner
from charllm.energy.attribution import read_stage_profile

DATA = Path(__file__).resolve().parents[1] / "data" / "perseus-sosp24"
P2P_W = 83.64  # the A100's P2P blocking power in the Perseus artifact


def _profile() -> dict:
    return read_stage_profile(DATA / "gpt3-175b+a100_sxm_bf16.csv")


def test_onef1b_order_and_dag() -> None:
    for stages, m in ((2, 4), (4, 8), (8, 12)):
        for s in range(stages):
            seq = planner.onef1b_order(stages, m, s)
            assert sorted(seq) == sorted([("forward", i) for i in range(m)] + [("backward", i) for i in range(m)])
            warm = [i for i, _ in seq[: stages - s - 1]]
            assert warm == ["forward"] * min(stages - s - 1, m)
    sched = planner.simulate(2, 3, lambda s, i, m: 1.0 if i == "forward" else 2.0)
    # stage 1 starts F0 at 1; stage 0 starts B0 at 4, after stage 1's B0 (hand-checked)
    assert sched.start[(1, "forward", 0)] == 1.0 and sched.start[(0, "backward", 0)] == 4.0
    assert sched.time == 12.0  # (m + S - 1) * (F + B) = 4 * 3: the 1F1B bubble formula
    print("2x3 1F1B:", sorted(sched.end.items(), key=lambda kv: kv[1]))


def test_min_iteration_time_and_intrinsic_saving_published_profile() -> None:
    prof = _profile()
    base = planner.all_max(prof, 12, P2P_W, unit_s=0.001)
    rows = list(csv.reader((DATA / "gpt3-175b_bf16_mb12.csv").open()))[1:]
    t_min, e_at_min = min((float(t), float(e)) for t, e in rows)
    save = planner.saving(base.energy, e_at_min)
    print(
        f"all-max: {base.time:.4f} s, {base.energy:.2f} J (idle {base.idle_s:.3f} GPU-s); frontier min {t_min} s "
        f"{e_at_min:.2f} J; intrinsic saving {save:.2f} % (paper Table 6: 15.2 %)"
    )
    assert base.time == pytest.approx(2.818, rel=1e-3)
    assert t_min == pytest.approx(base.time, rel=1e-3)
    assert save == pytest.approx(15.2, abs=0.5)


def test_frontier_planner_small_row() -> None:
    """lowtime's min-cut frontier on stages 0-3 of the profile, 4 micro-batches (the full row: benchmarks/)."""
    pytest.importorskip("lowtime", reason="lowtime (the 'energy' extra) is not installed")
    full = _profile()
    prof = {k: v for k, v in full.items() if k[0] < 4}
    t0 = time.monotonic()
    pts = list(planner.frontier(prof, 4, P2P_W, unit_s=0.001))
    took = time.monotonic() - t0
    base = planner.all_max(prof, 4, P2P_W)
    # the slowest Pareto-optimal option of each instruction is its least-energy one
    least = {k: min(v.values(), key=lambda te: te[1]) for k, v in prof.items()}
    slow = planner.simulate(4, 4, lambda s, i, m: planner.quantise(least[(s, i)][0], 0.001))
    print(
        f"{len(pts)} frontier points in {took:.1f} s: {pts[0].time:.3f} s {pts[0].energy:.1f} J -> "
        f"{pts[-1].time:.3f} s {pts[-1].energy:.1f} J (profiled {pts[-1].energy_profiled:.1f} J); "
        f"all-max {base.time:.3f} s {base.energy:.1f} J; saving {planner.saving(base.energy, pts[-1].energy_profiled):.2f} %"
    )
    assert pts[-1].time == pytest.approx(base.time, abs=1e-9)  # the fastest plan is as fast as all-max
    assert pts[0].time <= slow.time + 1e-9 and pts[0].time >= slow.time - 0.0015
    times = [p.time for p in pts]
    assert times == sorted(times, reverse=True) and len(set(times)) == len(times)
    assert pts[-1].energy > pts[0].energy  # the fastest plan costs more than the slowest
    assert pts[-1].energy_profiled < base.energy  # slack instructions slowed down: energy saved at equal time
    # every instruction has a profiled frequency in every plan
    assert all(len(p.plan) == 2 * 4 * 4 and all(f in prof[(k[0], k[1])] for k, f in p.plan.items()) for p in pts)

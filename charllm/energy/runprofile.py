"""A stage profile from a ``profile: instructions`` run: per-rank timelines + the NVML energy series.

Each rank ``r`` of the job wrote ``instructions-<r>.csv`` and ``instruction_steps-<r>.json``
(its pipeline stage) and its telemetry ``telemetry/rank<r>.parquet`` (``unix_s``,
``energy_total_j``, ``sm_clock_mhz``). The instructions of the measured steps get their energy
from the counter (:mod:`.attribution`); the frequency of a profile row is the median SM clock
the telemetry read over the rank's measured steps.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from charllm.energy.attribution import (
    EnergySeries,
    Instruction,
    ProfileRow,
    idle_energy,
    instruction_energy,
    read_timeline,
    stage_profile,
)


def _series(parquet: Path) -> tuple[EnergySeries, list[tuple[float, float]]]:
    import pandas as pd

    df = pd.read_parquet(parquet, columns=["unix_s", "energy_total_j", "sm_clock_mhz"])
    df = df.dropna(subset=["unix_s", "energy_total_j"]).sort_values("unix_s").drop_duplicates("unix_s")
    clocks = [(float(t), float(c)) for t, c in zip(df["unix_s"], df["sm_clock_mhz"], strict=True) if c == c]
    return EnergySeries(df["unix_s"].tolist(), df["energy_total_j"].tolist()), clocks


def rank_profile(out: Path, rank: int, skip_steps: int = 1) -> dict[str, Any]:
    """One rank's instructions with energy, its idle energy and the counter over its measured steps."""
    rows = read_timeline(out / f"instructions-{rank}.csv")
    meta = json.loads((out / f"instruction_steps-{rank}.json").read_text())
    steps = meta["steps"][skip_steps:]
    if not steps:
        raise ValueError(f"{out}: rank {rank} recorded {len(meta['steps'])} steps, none after the first {skip_steps}")
    keep = {s["step"] for s in steps}
    rows = [r for r in rows if r.step in keep]
    series, clocks = _series(out / "telemetry" / f"rank{rank}.parquet")
    t0, t1 = steps[0]["start"], steps[-1]["end"]
    energies = instruction_energy(series, rows)
    window = [c for t, c in clocks if t0 <= t <= t1]
    freq = round(statistics.median(window)) if window else 0
    return {
        "rank": rank,
        "stage": int(meta["stage"]),
        "frequency": freq,
        "rows": rows,
        "energies": energies,
        "idle_j": idle_energy(series, rows, t0, t1),
        "counter_j": series.between(t0, t1),
        "window_s": t1 - t0,
    }


def run_profile(out: Path, skip_steps: int = 1) -> tuple[list[ProfileRow], list[dict[str, Any]]]:
    """Profile rows of every stage (tp/dp rank 0 of each stage: the ranks that wrote a timeline)."""
    ranks = sorted(int(p.stem.split("-")[1]) for p in out.glob("instructions-*.csv"))
    if not ranks:
        raise ValueError(f"{out}: no instructions-<rank>.csv (was the campaign's profile: instructions?)")
    per = [rank_profile(out, r, skip_steps) for r in ranks]
    samples: list[tuple[int, int, Instruction, float]] = []
    for p in per:
        samples += [(p["stage"], p["frequency"], r, e) for r, e in zip(p["rows"], p["energies"], strict=True)]
    summary = [
        {k: v for k, v in p.items() if k not in ("rows", "energies")}
        | {"instruction_j": math.fsum(p["energies"]), "instructions": len(p["rows"])}
        for p in per
    ]
    return stage_profile(samples), summary

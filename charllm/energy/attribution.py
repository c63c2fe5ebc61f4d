"""Energy per pipeline instruction from a cumulative energy series.

NVML's ``nvmlDeviceGetTotalEnergyConsumption`` is a cumulative counter (mJ) that the driver
updates about every 100 ms. A job samples it (host time, joules) and records each instruction's
host-time interval. The energy of an interval is the difference of the counter linearly
interpolated at its two ends; one interval's figure is only as good as the 100 ms updates, so
a stage profile aggregates at least ``MIN_WINDOW_S`` (10 s) of one (stage, instruction,
frequency) before it is trusted.

Linear interpolation telescopes: the energies of back-to-back intervals add up exactly to the
interpolated energy of their union. Idle energy (the gaps between instructions, where a stage
waits on point-to-point communication) is computed over the gaps themselves, so
``sum(instructions) + idle`` is a real check of the bookkeeping (no interval counted twice or
missed), not an identity by construction.
"""

from __future__ import annotations

import csv
import itertools
import json
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: the columns of Zeus's pipeline frequency optimizer's profile (and the Perseus artifact)
STAGE_PROFILE_COLUMNS = ("stage", "instruction", "frequency", "time", "energy")
#: the columns of the per-rank instruction timeline (``instructions-<rank>.csv``)
TIMELINE_COLUMNS = ("step", "micro_batch", "instruction", "start", "end")
INSTRUCTIONS = ("forward", "backward")
MIN_WINDOW_S = 10.0  # NVML's counter updates every ~100 ms: aggregate >= 10 s per profile row


@dataclass(frozen=True)
class Instruction:
    """One forward or backward of one micro batch on one stage (host seconds)."""

    step: int
    micro_batch: int
    instruction: str  # forward | backward
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


class EnergySeries:
    """A cumulative energy series: strictly increasing times (s), non-decreasing joules."""

    def __init__(self, times: Sequence[float], joules: Sequence[float]) -> None:
        if len(times) != len(joules):
            raise ValueError(f"{len(times)} times but {len(joules)} energy readings")
        if len(times) < 2:
            raise ValueError("an energy series needs at least two readings")
        for a, b in itertools.pairwise(times):
            if not b > a:
                raise ValueError(f"energy series times must increase strictly ({a} then {b})")
        for a, b in itertools.pairwise(joules):
            if b < a:
                raise ValueError(f"a cumulative energy counter cannot decrease ({a} J then {b} J)")
        self.times = [float(t) for t in times]
        self.joules = [float(j) for j in joules]

    def at(self, t: float) -> float:
        """The counter linearly interpolated at host time ``t`` (inside the series only)."""
        ts = self.times
        if t < ts[0] or t > ts[-1]:
            raise ValueError(f"time {t} lies outside the energy series [{ts[0]}, {ts[-1]}]")
        i = bisect_right(ts, t)
        if i >= len(ts):
            return self.joules[-1]
        t0, t1 = ts[i - 1], ts[i]
        e0, e1 = self.joules[i - 1], self.joules[i]
        return e0 + (e1 - e0) * (t - t0) / (t1 - t0)

    def between(self, t0: float, t1: float) -> float:
        """Energy (J) between host times ``t0 <= t1``."""
        if t1 < t0:
            raise ValueError(f"interval ends ({t1}) before it starts ({t0})")
        return self.at(t1) - self.at(t0)


def instruction_energy(series: EnergySeries, rows: Iterable[Instruction]) -> list[float]:
    """The energy of each instruction interval."""
    return [series.between(r.start, r.end) for r in rows]


def check_no_overlap(rows: Sequence[Instruction]) -> None:
    """Instructions of one stage run one at a time: raise on an overlap or a negative interval."""
    ordered = sorted(rows, key=lambda r: r.start)
    for r in ordered:
        if r.end < r.start:
            raise ValueError(f"{r.instruction} of micro batch {r.micro_batch} (step {r.step}) ends before it starts")
    for a, b in itertools.pairwise(ordered):
        if b.start < a.end:
            raise ValueError(
                f"{b.instruction} mb {b.micro_batch} (step {b.step}) starts at {b.start} before "
                f"{a.instruction} mb {a.micro_batch} ends at {a.end}"
            )


def idle_energy(series: EnergySeries, rows: Sequence[Instruction], t0: float, t1: float) -> float:
    """Energy of ``[t0, t1]`` outside every instruction (the gaps, summed one by one)."""
    check_no_overlap(rows)
    total, cursor = 0.0, t0
    for r in sorted(rows, key=lambda r: r.start):
        if r.end <= t0 or r.start >= t1:
            continue
        if r.start > cursor:
            total += series.between(cursor, r.start)
        cursor = max(cursor, r.end)
    if t1 > cursor:
        total += series.between(cursor, t1)
    return total


@dataclass(frozen=True)
class ProfileRow:
    stage: int
    instruction: str
    frequency: int
    time: float  # mean seconds of one instruction
    energy: float  # mean joules of one instruction
    count: int
    busy_s: float  # the instructions' summed duration
    window_s: float  # first start to last end: the stretch of the counter the mean rests on

    @property
    def trusted(self) -> bool:
        return self.window_s >= MIN_WINDOW_S


def stage_profile(
    samples: Iterable[tuple[int, int, Instruction, float]], min_window_s: float = MIN_WINDOW_S
) -> list[ProfileRow]:
    """Aggregate ``(stage, frequency, instruction, energy)`` samples into profile rows.

    One row per (stage, instruction, frequency): mean time and energy of one instruction,
    over ``count`` instructions (``busy_s`` in all) spread over ``window_s`` of the counter.
    """
    acc: dict[tuple[int, str, int], list[float]] = {}
    for stage, freq, ins, energy in samples:
        if ins.instruction not in INSTRUCTIONS:
            raise ValueError(f"unknown instruction {ins.instruction!r}; expected one of {INSTRUCTIONS}")
        a = acc.setdefault((stage, ins.instruction, freq), [0.0, 0.0, 0.0, ins.start, ins.end])
        a[0] += ins.duration
        a[1] += energy
        a[2] += 1
        a[3], a[4] = min(a[3], ins.start), max(a[4], ins.end)
    out = []
    for (stage, name, freq), (t, e, n, first, last) in sorted(
        acc.items(), key=lambda kv: (kv[0][0], kv[0][1] != "forward", -kv[0][2])
    ):
        out.append(ProfileRow(stage, name, freq, t / n, e / n, int(n), t, last - first))
    del min_window_s  # the threshold is applied by ProfileRow.trusted / write_stage_profile
    return out


def write_stage_profile(
    rows: Sequence[ProfileRow], path: Path, min_window_s: float = MIN_WINDOW_S
) -> dict[str, object]:
    """``stage_profile.csv`` (Zeus's schema) and ``stage_profile.json`` beside it (counts, windows).

    Returns the sidecar's content. Rows measured over less than ``min_window_s`` are written
    (the planner can still run) and listed under ``short_windows``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(STAGE_PROFILE_COLUMNS)
        for r in rows:
            w.writerow([r.stage, r.instruction, r.frequency, repr(r.time), repr(r.energy)])
    meta: dict[str, object] = {
        "schema": "zeus pipeline_frequency stage profile: " + ",".join(STAGE_PROFILE_COLUMNS),
        "min_window_s": min_window_s,
        "rows": [
            {
                "stage": r.stage,
                "instruction": r.instruction,
                "frequency": r.frequency,
                "count": r.count,
                "busy_s": r.busy_s,
                "window_s": r.window_s,
            }
            for r in rows
        ],
        "short_windows": [
            f"stage {r.stage} {r.instruction} @ {r.frequency} MHz: {r.window_s:.2f} s"
            for r in rows
            if r.window_s < min_window_s
        ],
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def read_stage_profile(path: Path) -> dict[tuple[int, str], dict[int, tuple[float, float]]]:
    """(stage, instruction) -> frequency -> (time s, energy J), with the file and row in every error."""
    out: dict[tuple[int, str], dict[int, tuple[float, float]]] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != STAGE_PROFILE_COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {','.join(STAGE_PROFILE_COLUMNS)}")
        for i, row in enumerate(reader, start=2):
            try:
                stage, ins, freq = int(row["stage"]), row["instruction"], int(row["frequency"])
                t, e = float(row["time"]), float(row["energy"])
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}: line {i}: {err}") from None
            if ins not in INSTRUCTIONS:
                raise ValueError(f"{path}: line {i}: instruction {ins!r} is not one of {INSTRUCTIONS}")
            if stage < 0 or freq <= 0 or not t > 0 or e < 0:
                raise ValueError(f"{path}: line {i}: stage >= 0, frequency > 0, time > 0 and energy >= 0 expected")
            out.setdefault((stage, ins), {})[freq] = (t, e)
    if not out:
        raise ValueError(f"{path}: no profile rows")
    stages = sorted({s for s, _ in out})
    if stages != list(range(len(stages))):
        raise ValueError(f"{path}: stages {stages} are not 0..{len(stages) - 1}")
    for s in stages:
        for ins in INSTRUCTIONS:
            if (s, ins) not in out:
                raise ValueError(f"{path}: stage {s} has no {ins} rows")
    return out


def write_timeline(rows: Sequence[Instruction], path: Path, energies: Sequence[float] | None = None) -> None:
    """``instructions-<rank>.csv``: ``step,micro_batch,instruction,start,end`` (+ ``energy`` when known)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*TIMELINE_COLUMNS, *(["energy"] if energies is not None else [])])
        for i, r in enumerate(rows):
            extra = [repr(energies[i])] if energies is not None else []
            w.writerow([r.step, r.micro_batch, r.instruction, repr(r.start), repr(r.end), *extra])


def read_timeline(path: Path) -> list[Instruction]:
    with path.open(newline="") as fh:
        return [
            Instruction(int(r["step"]), int(r["micro_batch"]), r["instruction"], float(r["start"]), float(r["end"]))
            for r in csv.DictReader(fh)
        ]

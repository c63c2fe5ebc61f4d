"""The definitions the job and the aggregation share: one function each, no torch, no pandas.

The job (:mod:`charllm.train.metrics`) computes them live for ``result.json``; the
aggregation (:mod:`charllm.analysis.aggregate`) recomputes them from the recorded steps and
telemetry for ``cells.parquet``. Both call these, so the two numbers agree by construction
and carry one name each (:data:`METRIC_ALIASES` maps the older names that result files and
tables written before carry).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

NAN = float("nan")

#: older metric names -> the one name; read-aliases only (nothing writes the old names)
METRIC_ALIASES: dict[str, str] = {
    "samples_per_s_per_mj": "efficiency_samples_per_s_mj",  # result.json before December 2026
    "energy_counter_ratio": "energy_counter_over_sampled",  # cells.parquet before December 2026
}


def canonical_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` with older names renamed (a value under the new name wins)."""
    out = dict(metrics)
    for old, new in METRIC_ALIASES.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def as_float(x: Any) -> float:
    """A number as float; NaN for anything that is not one (None, '', text)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return NAN


def measured_window(steps: Iterable[tuple[str, float, float]]) -> tuple[float, float, int] | None:
    """(start, end, count) of the measured steps among (phase, start_unix_s, end_unix_s); None if none.

    The window runs from the first measured step's start to the last one's end: the energy of
    a cell is integrated over it, and its step durations tile it.
    """
    t0, t1, n = math.inf, -math.inf, 0
    for phase, start, end in steps:
        if phase == "measure":
            t0, t1, n = min(t0, float(start)), max(t1, float(end)), n + 1
    return (t0, t1, n) if n else None


def efficiency_samples_per_s_mj(global_batch: float, step_time_median_s: float, energy_per_step_j: float) -> float:
    """PPT's efficiency, samples / (s * MJ): ``global_batch / (step_time_median_s * energy_per_step_j / 1e6)``."""
    try:
        return float(global_batch) / (float(step_time_median_s) * float(energy_per_step_j) / 1e6)
    except ZeroDivisionError:
        return NAN


def counter_over_sampled(counter_j: float, sampled_j: float) -> float:
    """NVML's energy counter over the sampled power's integral in the same window (a cross-check, ~1)."""
    if not sampled_j or math.isnan(sampled_j):
        return NAN
    return float(counter_j) / float(sampled_j)


__all__ = [
    "METRIC_ALIASES",
    "as_float",
    "canonical_metrics",
    "counter_over_sampled",
    "efficiency_samples_per_s_mj",
    "measured_window",
]

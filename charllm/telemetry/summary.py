"""Telemetry over a measurement window, per GPU and over all GPUs of a job.

Definitions (units in the names):

- ``energy_gpu_j``: trapezoid integral of ``power_w`` over [t0, t1]; the curve is closed at
  the window edges by linear interpolation between the samples either side, so the result
  does not depend on where the ticks fall. ``energy_mem_j`` likewise from ``mem_power_w``.
- ``energy_counter_j``: the NVML total-energy counter interpolated at t1 minus at t0.
- ``avg_power_w`` = energy_gpu_j / (t1 - t0) (time-weighted); ``peak_power_w`` = max sample
  in the window. Temperatures, clocks and utilisation: plain mean / max of the samples in
  the window (the ticks are evenly spaced).
- ``throttle_<reason>_s``: time with that clock-event bit set, each sample standing for the
  interval up to the next one (clipped to the window).
- ``sampling_rate_hz``: samples in the window / (t1 - t0).
- ``pcie_tx_bytes`` etc.: counter differences over the window (interpolated like energy;
  the PCIe counters are 32-bit and wrap, which is undone first).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from charllm.telemetry.schema import CLOCK_EVENT_REASONS

NAN = math.nan


def _curve(t: np.ndarray, v: np.ndarray, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
    """Samples inside (t0, t1) plus interpolated values at t0 and t1 (NaNs dropped first)."""
    ok = ~np.isnan(v)
    t, v = t[ok], v[ok]
    if t.size < 2 or t[0] > t0 or t[-1] < t1:
        return np.empty(0), np.empty(0)
    inside = (t > t0) & (t < t1)
    tt = np.concatenate(([t0], t[inside], [t1]))
    vv = np.concatenate(([np.interp(t0, t, v)], v[inside], [np.interp(t1, t, v)]))
    return tt, vv


def integrate(t: np.ndarray, v: np.ndarray, t0: float, t1: float) -> float:
    """Trapezoid integral of v(t) over [t0, t1]; NaN if the samples do not cover the window."""
    tt, vv = _curve(np.asarray(t, float), np.asarray(v, float), t0, t1)
    if tt.size == 0:
        return NAN
    return float(np.sum((vv[1:] + vv[:-1]) * np.diff(tt)) / 2.0)


def unwrap(c: np.ndarray, modulus: float) -> np.ndarray:
    """Undo wrap-arounds of a counter kept modulo ``modulus`` (NaNs kept in place)."""
    c = np.asarray(c, float).copy()
    ok = ~np.isnan(c)
    v = c[ok]
    if v.size > 1:
        steps = np.diff(v)
        v[1:] = v[0] + np.cumsum(np.where(steps < 0, steps + modulus, steps))
        c[ok] = v
    return c


def counter_delta(t: np.ndarray, c: np.ndarray, t0: float, t1: float, modulus: float | None = None) -> float:
    """Increase of a cumulative counter over [t0, t1], interpolated at the edges."""
    if modulus is not None:
        c = unwrap(c, modulus)
    tt, cc = _curve(np.asarray(t, float), np.asarray(c, float), t0, t1)
    if tt.size == 0:
        return NAN
    return float(cc[-1] - cc[0])


def _mean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else NAN


def _max(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.max()) if x.size else NAN


def gpu_window_summary(df: Any, t0: float, t1: float) -> dict[str, float]:
    """Summary of one GPU's rows (a DataFrame of one rank's Parquet) over [t0, t1]."""
    if t1 <= t0:
        raise ValueError(f"empty window [{t0}, {t1}]")
    df = df.sort_values("unix_s", kind="stable")
    t = df["unix_s"].to_numpy(float)

    def col(name: str) -> np.ndarray:
        return df[name].to_numpy(float) if name in df.columns else np.full(t.size, NAN)

    win = (t >= t0) & (t <= t1)
    dur = t1 - t0
    out: dict[str, float] = {"window_s": dur}
    out["energy_gpu_j"] = integrate(t, col("power_w"), t0, t1)
    out["energy_mem_j"] = integrate(t, col("mem_power_w"), t0, t1)
    out["energy_counter_j"] = counter_delta(t, col("energy_total_j"), t0, t1)
    out["avg_power_w"] = out["energy_gpu_j"] / dur
    out["peak_power_w"] = _max(col("power_w")[win])
    out["avg_mem_power_w"] = out["energy_mem_j"] / dur
    for name, key in (
        ("gpu_temp_c", "gpu_temp_c"),
        ("mem_temp_c", "mem_temp_c"),
        ("sm_clock_mhz", "sm_clock_mhz"),
        ("mem_clock_mhz", "mem_clock_mhz"),
        ("gpu_util_pct", "gpu_util_pct"),
        ("mem_util_pct", "mem_util_pct"),
        ("cpu_util_pct", "cpu_util_pct"),
    ):
        out[f"avg_{name}"] = _mean(col(key)[win])
    out["peak_gpu_temp_c"] = _max(col("gpu_temp_c")[win])
    out["peak_mem_temp_c"] = _max(col("mem_temp_c")[win])
    out["peak_mem_used_bytes"] = _max(col("mem_used_bytes")[win])
    out["power_limit_w"] = _max(col("power_limit_w")[win])
    for name in ("pcie_tx", "pcie_rx"):
        # NVML's PCIe byte counters are 32-bit: seen wrapping at 2**32 on an H200
        out[f"{name}_bytes"] = counter_delta(t, col(f"{name}_total_bytes"), t0, t1, modulus=2.0**32)
    for name in ("nvlink_tx", "nvlink_rx"):
        out[f"{name}_bytes"] = counter_delta(t, col(f"{name}_total_kib"), t0, t1) * 1024.0
    # each sample's bits hold until the next sample; clip the intervals to the window
    reasons = col("clock_event_reasons")
    nxt = np.append(t[1:], t[-1] if t.size else NAN)
    lo, hi = np.clip(t, t0, t1), np.clip(nxt, t0, t1)
    span = np.where(np.isnan(reasons), 0.0, hi - lo)
    bits = np.where(np.isnan(reasons), 0, reasons).astype(np.int64)
    for name, bit in CLOCK_EVENT_REASONS.items():
        out[f"throttle_{name}_s"] = float(np.sum(span[(bits & bit) != 0]))
    out["samples"] = float(win.sum())
    out["sampling_rate_hz"] = float(win.sum()) / dur
    errs = col("nvml_errors_total")
    out["nvml_errors"] = _max(errs) if errs.size else 0.0
    return out


_SUM: tuple[str, ...] = ("energy_gpu_j", "energy_mem_j", "energy_counter_j", "samples", "nvml_errors")
_SUM += ("pcie_tx_bytes", "pcie_rx_bytes", "nvlink_tx_bytes", "nvlink_rx_bytes")


def combine(per_gpu: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Job-level numbers from per-GPU summaries.

    Energies, byte counts, samples and errors add up over GPUs; ``peak_*`` take the max;
    ``avg_*`` the mean over GPUs; ``throttle_*_s`` the max (the most affected GPU);
    ``sampling_rate_hz`` becomes ``sampling_rate_min_hz`` (the slowest sampler).
    """
    rows = list(per_gpu)
    if not rows:
        return {}
    out: dict[str, float] = {"telemetry_gpus": float(len(rows))}
    keys = sorted({k for r in rows for k in r})
    for k in keys:
        vals = np.array([r.get(k, NAN) for r in rows], float)
        if k in _SUM:
            finite = vals[~np.isnan(vals)]
            out[k] = float(finite.sum()) if finite.size else NAN
        elif k.startswith(("peak_", "throttle_")):
            out[k] = _max(vals)
        elif k == "sampling_rate_hz":
            out["sampling_rate_min_hz"] = float(np.nanmin(vals)) if not np.all(np.isnan(vals)) else NAN
        elif k == "power_limit_w":
            out["power_limit_min_w"] = float(np.nanmin(vals)) if not np.all(np.isnan(vals)) else NAN
        elif k == "window_s":
            out[k] = _max(vals)
        else:
            out[k] = _mean(vals)
    out["telemetry_samples"] = out.pop("samples", 0.0)
    return out

"""Per-GPU numbers over a measured window, from one rank's telemetry Parquet file.

The definitions are those of :mod:`charllm.telemetry.summary` (what the training job puts
in ``result.json``), computed for all ranks of an attempt at once on one 2-D NumPy array of
a pyarrow table (no pandas copy; every rank file read once, in one parallel scan):

- energy: trapezoid of ``power_w`` (and ``mem_power_w``) over [t0, t1], the curve closed at
  the window edges by linear interpolation between the samples either side;
- counters (``energy_total_j``, PCIe, NVLink): value interpolated at t1 minus at t0; the
  PCIe byte counters are 32-bit and wrap, which is undone first;
- averages and peaks of temperatures, clocks, power: plain mean / max of the samples with
  t0 <= t <= t1 (the ticks are evenly spaced);
- ``throttle_<reason>_s``: time with that clock-event bit set, each sample standing for the
  interval up to the next one, clipped to the window.

A window the samples do not cover gives NaN energies and counter differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from charllm.definitions import counter_over_sampled
from charllm.telemetry.schema import (
    CLOCK_EVENT_REASONS,
    GPU_COLUMNS,
    IDENTITY_COLUMNS,
    META_COLUMNS,
    NODE_COLUMNS,
)

NAN = math.nan
PCIE_MODULUS = 2.0**32  # NVML's PCIe byte counters are 32-bit (seen wrapping on an H200)

_STR_IDENTITY = ("host", "gpu_uuid", "pci_bus_id")
_INT_IDENTITY = ("rank", "local_rank", "gpu_index")

#: the canonical schema of telemetry.parquet (key columns first); missing columns are NaN/null
TELEMETRY_SCHEMA = pa.schema(
    [("cell_id", pa.string()), ("repeat", pa.int64()), ("attempt", pa.int64())]
    + [(c, pa.string() if c in _STR_IDENTITY else pa.int64()) for c in IDENTITY_COLUMNS]
    + [(c, pa.float64()) for c in (*META_COLUMNS, *GPU_COLUMNS, *NODE_COLUMNS)]
)


# what the per-GPU summary needs (the telemetry table needs every column)
SUMMARY_COLUMNS: tuple[str, ...] = (
    *IDENTITY_COLUMNS,
    "unix_s",
    "nvml_errors_total",
    *GPU_COLUMNS,
    "mem_used_bytes",
)


def read_rank_files(paths: Sequence[Path], columns: Sequence[str] | None = None) -> pa.Table:
    """The rank files of one attempt in one scan: each file read once, in parallel, rows in file order.

    ``columns``: a projection (those missing from the files are left out; the summary treats
    them as NaN); None reads every column.
    """
    if not paths:
        return pa.table({})
    # identity strings repeat on every row: keep them dictionary-encoded (no per-row strings)
    fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=set(_STR_IDENTITY)))
    dataset = ds.dataset([str(p) for p in paths], format=fmt)
    cols = None if columns is None else [c for c in columns if c in dataset.schema.names]
    return dataset.to_table(columns=cols)


def _col(table: pa.Table, name: str, n: int) -> np.ndarray:
    if name not in table.column_names:
        return np.full(n, NAN)
    arr = table.column(name)
    return np.asarray(arr.to_numpy(), dtype=float)


def _clean(t: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok = ~np.isnan(v)
    if ok.all():
        return t, v
    return t[ok], v[ok]


def _edge_values(t: np.ndarray, v: np.ndarray, t0: float, t1: float) -> tuple[int, int, float, float] | None:
    """Indices [a, b) of the samples strictly inside (t0, t1) and the values at t0 and t1."""
    n = t.size
    if n < 2 or t[0] > t0 or t[-1] < t1:
        return None
    a = int(np.searchsorted(t, t0, "right"))  # first sample after t0 (t[a-1] <= t0)
    b = int(np.searchsorted(t, t1, "left"))  # first sample at or after t1 (t[b-1] < t1)

    def at(x: float, i: int) -> float:  # value at x between samples i-1 and i
        lo, hi = t[i - 1], t[i]
        if hi == lo or x <= lo:
            return float(v[i - 1])
        return float(v[i - 1] + (v[i] - v[i - 1]) * (x - lo) / (hi - lo))

    v0 = at(t0, a) if a < n else float(v[-1])
    v1 = float(v[b]) if t[b] == t1 else at(t1, b)
    return a, b, v0, v1


def window_integral(t: np.ndarray, v: np.ndarray, t0: float, t1: float) -> float:
    """Trapezoid integral of v(t) over [t0, t1]; NaN if the samples do not cover the window."""
    t, v = _clean(t, v)
    e = _edge_values(t, v, t0, t1)
    if e is None:
        return NAN
    a, b, v0, v1 = e
    tt = np.concatenate(([t0], t[a:b], [t1]))
    vv = np.concatenate(([v0], v[a:b], [v1]))
    return float(np.dot(vv[1:] + vv[:-1], np.diff(tt)) / 2.0)


def window_delta(t: np.ndarray, c: np.ndarray, t0: float, t1: float, modulus: float | None = None) -> float:
    """Increase of a cumulative counter over [t0, t1], interpolated at the edges."""
    t, c = _clean(t, c)
    n = t.size
    if n < 2 or t[0] > t0 or t[-1] < t1:
        return NAN
    if modulus is not None:
        # only the samples around the window matter: unwrap that stretch
        lo = max(int(np.searchsorted(t, t0, "right")) - 1, 0)
        hi = min(int(np.searchsorted(t, t1, "left")) + 1, n)
        t, c = t[lo:hi], c[lo:hi].astype(float, copy=True)
        steps = np.diff(c)
        c[1:] = c[0] + np.cumsum(np.where(steps < 0, steps + modulus, steps))
    e = _edge_values(t, c, t0, t1)
    if e is None:
        return NAN
    return e[3] - e[2]


def _max(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.max()) if x.size else NAN


# -- all ranks of an attempt at once -------------------------------------------------------

_AVG = ("gpu_temp_c", "mem_temp_c", "sm_clock_mhz", "mem_clock_mhz", "gpu_util_pct", "mem_util_pct")
_PEAK = ("gpu_temp_c", "mem_temp_c", "sm_clock_mhz", "power_w", "mem_used_bytes", "power_limit_w")
_INTEGRALS = ("power_w", "mem_power_w")
_COUNTERS = (
    "energy_total_j",
    "pcie_tx_total_bytes",
    "pcie_rx_total_bytes",
    "nvlink_tx_total_kib",
    "nvlink_rx_total_kib",
)
_WRAPPING = ("pcie_tx_total_bytes", "pcie_rx_total_bytes")
# integrals first, then the PCIe counters: both are used as column slices (views) below
_FLOATS = tuple(
    dict.fromkeys((*_INTEGRALS, *_WRAPPING, *_COUNTERS, *_AVG, *_PEAK, "clock_event_reasons", "nvml_errors_total"))
)
_IX = {c: i for i, c in enumerate(_FLOATS)}
_MASK = 0
for _bit in CLOCK_EVENT_REASONS.values():
    _MASK |= _bit
_PATTERNS = np.arange(_MASK + 1)


def sorted_by_rank_time(table: pa.Table) -> pa.Table:
    """Rows grouped by rank, each rank's rows in time order (a no-op for the usual files)."""
    if table.num_rows < 2:
        return table
    t = table.column("unix_s").to_numpy()
    r = table.column("rank").to_numpy() if "rank" in table.column_names else np.zeros(t.size, np.int64)
    dr = np.diff(r)
    if np.all(dr >= 0) and np.all((np.diff(t) >= 0) | (dr != 0)):
        return table
    return table.take(pa.array(np.lexsort((t, r))))


def _segments(table: pa.Table) -> list[tuple[int, int]]:
    if table.num_rows == 0:
        return []
    if "rank" not in table.column_names:
        return [(0, table.num_rows)]
    r = table.column("rank").to_numpy()
    starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    ends = np.r_[starts[1:], r.size]
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def _float_block(table: pa.Table, n: int) -> np.ndarray:
    """The float columns as one column-major (n, k) array: one copy, each column contiguous."""
    x = np.empty((n, len(_FLOATS)), order="F")
    names = set(table.column_names)
    for j, c in enumerate(_FLOATS):
        if c not in names:
            x[:, j] = NAN
            continue
        i = 0
        for chunk in table.column(c).chunks:
            k = len(chunk)
            x[i : i + k, j] = chunk.to_numpy(zero_copy_only=False)
            i += k
    return x


def _interp_rows(t: np.ndarray, block: np.ndarray, x: float, i: int) -> np.ndarray:
    """Rows of ``block`` (indexed like ``t``) interpolated at x between samples i-1 and i."""
    lo, hi = t[i - 1], t[i]
    if hi == lo or x <= lo:
        return block[i - 1]
    return block[i - 1] + (block[i] - block[i - 1]) * ((x - lo) / (hi - lo))


def rank_summaries(table: pa.Table, t0: float, t1: float) -> list[dict[str, Any]]:
    """Per-GPU summaries of all ranks of a (rank- and time-sorted) table over [t0, t1].

    The definitions of the module docstring, computed on one 2-D array of the
    float columns: a few NumPy operations per rank instead of a few per rank and column.
    A column with NaNs in a rank falls back to the one-column functions for that rank.
    """
    if t1 <= t0:
        raise ValueError(f"empty window [{t0}, {t1}]")
    n = table.num_rows
    if n == 0:
        return []
    t_all = _col(table, "unix_s", n)
    x_all = _float_block(table, n)
    dur = t1 - t0
    out = []
    for s, e in _segments(table):
        t, x = t_all[s:e], x_all[s:e]
        m = e - s
        row: dict[str, Any] = {
            c: table.column(c)[s].as_py() if c in table.column_names else None for c in IDENTITY_COLUMNS
        }
        for c in _INT_IDENTITY:
            row[c] = None if row[c] is None else int(row[c])
        i0 = int(np.searchsorted(t, t0, "left"))
        i1 = int(np.searchsorted(t, t1, "right"))
        row["window_s"] = dur
        row["samples"] = float(i1 - i0)
        row["sampling_rate_hz"] = (i1 - i0) / dur
        # averages and peaks over the samples in the window (NaNs skipped)
        total = x.sum(axis=0)
        has_nan = np.isnan(total)  # a NaN anywhere in the rank's column (inf too: safe side)
        w = x[i0:i1]
        if not has_nan.any():
            wsum = total if (i0, i1) == (0, m) else w.sum(axis=0)
            mean = wsum / w.shape[0] if w.shape[0] else np.full(len(_FLOATS), NAN)
            peak = w.max(axis=0) if w.shape[0] else np.full(len(_FLOATS), NAN)
        else:
            nan = np.isnan(w)
            cnt = (~nan).sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(nan, 0.0, w).sum(axis=0) / cnt
            peak = np.where(nan, -np.inf, w).max(axis=0) if w.shape[0] else np.full(len(_FLOATS), -np.inf)
            peak = np.where(np.isinf(peak), np.nan, peak)
        for c in _AVG:
            row[f"avg_{c}"] = float(mean[_IX[c]])
        for c in _PEAK:
            row[f"peak_{c}"] = float(peak[_IX[c]])
        row["power_limit_w"] = row.pop("peak_power_limit_w")
        # integrals and counter differences with interpolated edges
        covered = m >= 2 and t[0] <= t0 and t[-1] >= t1
        vals: dict[str, float] = {}
        if covered:
            a = int(np.searchsorted(t, t0, "right"))
            b = int(np.searchsorted(t, t1, "left"))
            v0 = _interp_rows(t, x, t0, a) if a < m else x[-1]
            v1 = x[b] if t[b] == t1 else _interp_rows(t, x, t1, b)
            ni = len(_INTEGRALS)  # the integral columns are the first ones
            if b > a:
                dt = np.diff(t[a:b])
                inner = ((x[a + 1 : b, :ni] + x[a : b - 1, :ni]) * dt[:, None]).sum(axis=0) / 2.0
                area = (
                    inner
                    + (v0[:ni] + x[a, :ni]) * (t[a] - t0) / 2.0
                    + (x[b - 1, :ni] + v1[:ni]) * (t1 - t[b - 1]) / 2.0
                )
            else:
                area = (v0[:ni] + v1[:ni]) * dur / 2.0
            delta = v1 - v0
            # PCIe counters wrap at 2**32: unwrap the stretch around the window, then difference it
            stretch = x[a - 1 : b + 1, ni : ni + len(_WRAPPING)]
            steps = np.diff(stretch, axis=0)
            if (steps < 0).any():
                un = np.vstack(
                    [stretch[:1], stretch[0] + np.cumsum(np.where(steps < 0, steps + PCIE_MODULUS, steps), axis=0)]
                )
                tt = t[a - 1 : b + 1]
                u0 = _interp_rows(tt, un, t0, 1)
                u1 = un[-1] if t[b] == t1 else _interp_rows(tt, un, t1, tt.size - 1)
                delta = delta.copy()
                delta[ni : ni + len(_WRAPPING)] = u1 - u0
            for c in _INTEGRALS:
                vals[c] = float(area[_IX[c]])
            for c in _COUNTERS:
                vals[c] = float(delta[_IX[c]])
        for c in (*_INTEGRALS, *_COUNTERS):
            j = _IX[c]
            if has_nan[j]:  # the exact NaN semantics of the one-column functions
                mod = PCIE_MODULUS if c in _WRAPPING else None
                col = x[:, j]
                vals[c] = window_integral(t, col, t0, t1) if c in _INTEGRALS else window_delta(t, col, t0, t1, mod)
            elif not covered:
                vals[c] = NAN
        e_gpu = vals["power_w"]
        row["energy_gpu_j"] = e_gpu
        row["energy_mem_j"] = vals["mem_power_w"]
        row["energy_counter_j"] = vals["energy_total_j"]
        row["energy_counter_over_sampled"] = counter_over_sampled(vals["energy_total_j"], e_gpu)
        row["avg_power_w"] = e_gpu / dur
        row["avg_mem_power_w"] = vals["mem_power_w"] / dur
        row["pcie_tx_bytes"] = vals["pcie_tx_total_bytes"]
        row["pcie_rx_bytes"] = vals["pcie_rx_total_bytes"]
        row["nvlink_tx_bytes"] = vals["nvlink_tx_total_kib"] * 1024.0
        row["nvlink_rx_bytes"] = vals["nvlink_rx_total_kib"] * 1024.0
        # throttle: each sample's bits hold until the next sample, clipped to the window
        lo = max(i0 - 1, 0)
        hi = int(np.searchsorted(t, t1, "left"))
        ts = t[lo:hi]
        nxt = t[lo + 1 : hi + 1] if hi < m else np.append(t[lo + 1 : m], t[-1])
        span = np.clip(nxt, t0, t1) - np.clip(ts, t0, t1)
        reasons = x[lo:hi, _IX["clock_event_reasons"]]
        known = ~np.isnan(reasons)
        # time per bit pattern in one pass, then per bit: a span-weighted histogram of the masks
        bits = np.where(known, reasons, 0).astype(np.int64) & _MASK
        hist = np.bincount(bits, weights=np.where(known, span, 0.0), minlength=_MASK + 1)
        for name, bit in CLOCK_EVENT_REASONS.items():
            row[f"throttle_{name}_s"] = float(hist[_PATTERNS & bit != 0].sum())
        errs = x[:, _IX["nvml_errors_total"]]
        row["nvml_errors"] = _max(errs) if errs.size else 0.0
        out.append(row)
    return out


def window_table(table: pa.Table, t0: float, t1: float, key: tuple[str, int, int]) -> pa.Table:
    """All ranks' rows with t0 <= unix_s <= t1, in the canonical schema, with the attempt's key."""
    t = table.column("unix_s").to_numpy()
    part = table.filter(pa.array((t >= t0) & (t <= t1)))
    n = part.num_rows
    cols = []
    for field in TELEMETRY_SCHEMA:
        if field.name == "cell_id":
            cols.append(
                pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([key[0]])).cast(pa.string())
            )
        elif field.name == "repeat":
            cols.append(pa.array(np.full(n, key[1], np.int64)))
        elif field.name == "attempt":
            cols.append(pa.array(np.full(n, key[2], np.int64)))
        elif field.name in part.column_names:
            cols.append(part.column(field.name).cast(field.type))
        else:
            cols.append(pa.array(np.full(n, NAN)) if field.type == pa.float64() else pa.nulls(n, field.type))
    return pa.Table.from_arrays(cols, schema=TELEMETRY_SCHEMA)

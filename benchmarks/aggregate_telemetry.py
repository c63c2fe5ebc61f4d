"""Per-GPU telemetry summaries: our Parquet layout and aggregation against the seed's CSV layout.

Synthesises a campaign of cells x ranks x samples (a sample = one GPU at one 20 Hz tick, all
metrics) on disk under ``--dir`` (default /tmp), twice:

* ours: ``results/cells/<id>/r0/a1/out/telemetry/rank{R}.parquet`` (the training job's columns,
  :mod:`charllm.telemetry.schema`), ``steps.csv`` and a manifest, registered in a SQLite catalog;
  timed through the real :func:`charllm.analysis.aggregate.aggregate` (per-GPU table only, and
  again with the windowed telemetry table);
* the seed's: ``{metric}_{rank}.csv`` per cell, rows ``unix_ts,value``, no header, one file per
  metric per rank (12 metrics); timed as the seed reads them (``pandas.read_csv``, C engine, and
  once with the pyarrow engine as a stronger baseline), computing the same per-GPU summaries
  (avg/peak GPU and memory temperature and power, avg SM clock, energy by trapezoid, PCIe and
  NVLink totals from counter differences).

Both hold exactly the same samples; the measured window is the whole span (the seed records
only inside it). Generation is chunked per rank file, so memory stays small. Several sizes in
one run show the scaling; ``--seed-max`` caps the sizes at which the (slow) seed layout is
written and read, larger sizes extrapolate it linearly and say so.

Run: .venv/bin/python benchmarks/aggregate_telemetry.py --sizes 1e6,4e6,16e6,100e6 --seed-max 16e6
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from charllm.analysis.aggregate import aggregate
from charllm.catalog import Catalog
from charllm.telemetry.schema import GPU_COLUMNS, IDENTITY_COLUMNS, META_COLUMNS, NODE_COLUMNS

HZ = 20.0
SEED_METRICS = {  # the seed's file stem ({stem}_{rank}.csv) -> our column
    "gpu_power": "power_w",
    "mem_power": "mem_power_w",
    "gpu_thermal": "gpu_temp_c",
    "mem_thermal": "mem_temp_c",
    "sm_clock": "sm_clock_mhz",
    "mem_clock": "mem_clock_mhz",
    "gpu_util": "gpu_util_pct",
    "mem_util": "mem_util_pct",
    "pcie_tx_bytes": "pcie_tx_total_bytes",
    "pcie_rx_bytes": "pcie_rx_total_bytes",
    "nvlink_tx_throughput": "nvlink_tx_total_kib",
    "nvlink_rx_throughput": "nvlink_rx_total_kib",
}
U32 = 4294967295


def rank_frame(rng: np.random.Generator, rank: int, n: int, t_start: float) -> pa.Table:
    """One rank's telemetry: plausible values, integer-valued where NVML's are."""
    t = t_start + np.arange(n) / HZ + rng.uniform(0, 0.002, n)
    t[0], t[-1] = t_start, t_start + (n - 1) / HZ  # every rank spans the same window
    power = np.round(650 + 60 * rng.standard_normal(n), 3)
    temp = np.round(60 + 5 * np.sin(np.arange(n) / 400) + rng.normal(0, 0.5, n))
    cols: dict[str, np.ndarray | list] = {
        "host": [f"node{rank // 8}"] * n,
        "rank": np.full(n, rank),
        "local_rank": np.full(n, rank % 8),
        "gpu_index": np.full(n, rank % 8),
        "gpu_uuid": [f"GPU-{rank:08d}"] * n,
        "pci_bus_id": [f"00000000:{rank % 8:02X}:00.0"] * n,
        "unix_s": t,
        "read_latency_s": np.round(rng.uniform(0.002, 0.008, n), 6),
        "nvml_errors_total": np.zeros(n),
        "power_w": power,
        "mem_power_w": np.round(130 + 10 * rng.standard_normal(n), 3),
        "energy_total_j": 5e4 + np.cumsum(power) / HZ,
        "gpu_temp_c": temp,
        "mem_temp_c": temp - 2,
        "sm_clock_mhz": np.where(rng.random(n) < 0.9, 1980.0, 1755.0),
        "mem_clock_mhz": np.full(n, 2619.0),
        "gpu_util_pct": np.full(n, 100.0),
        "mem_util_pct": np.round(rng.uniform(30, 60, n)),
        "clock_event_reasons": np.where(rng.random(n) < 0.3, 4.0, 0.0),
        "power_limit_w": np.full(n, 700.0),
        "pcie_tx_total_bytes": np.floor(np.cumsum(rng.uniform(1e6, 3e6, n))) % 2**32,
        "pcie_rx_total_bytes": np.floor(np.cumsum(rng.uniform(1e6, 3e6, n))) % 2**32,
        "nvlink_tx_total_kib": np.floor(2e8 + np.cumsum(rng.uniform(4e5, 6e5, n))),
        "nvlink_rx_total_kib": np.floor(2e8 + np.cumsum(rng.uniform(4e5, 6e5, n))),
        "cpu_util_pct": np.round(rng.uniform(3, 9, n), 2),
        "mem_used_bytes": np.full(n, 3.3e9),
        "mem_total_bytes": np.full(n, 2.7e11),
    }
    order = (*IDENTITY_COLUMNS, *META_COLUMNS, *GPU_COLUMNS, *NODE_COLUMNS)
    return pa.table({k: cols[k] for k in order})


def generate(
    root: Path, n_cells: int, ranks: int, rows: int, seed_layout: bool, compression: str = "snappy"
) -> tuple[Catalog, dict[str, float]]:
    """Write the campaign in our layout (and the seed's); return the catalog and timings."""
    from charllm.backends.base import JobIdentity
    from charllm.store import attempt_dir

    rng = np.random.default_rng(1)
    home = root / "home"
    cat = Catalog(f"sqlite:///{home / 'catalog.db'}")
    cells = [(f"c{i:05d}", f"bench-cell-{i}", {"i": i}) for i in range(n_cells)]
    cat.register("bench", "bench.yaml", cells)
    t_ours = t_seed = 0.0
    for i, (cid, name, _) in enumerate(cells):
        d = attempt_dir(home, JobIdentity("bench", cid, 0, 1))
        (d / "out" / "telemetry").mkdir(parents=True)
        t_start = 1.8e9 + i * (rows / HZ + 60)
        seed_dir = root / "seed" / cid
        if seed_layout:
            seed_dir.mkdir(parents=True)
        t_lo, t_hi = -math.inf, math.inf
        for r in range(ranks):
            tab = rank_frame(rng, r, rows, t_start)
            ts = tab.column("unix_s").to_numpy()
            t_lo, t_hi = max(t_lo, ts[0]), min(t_hi, ts[-1])
            a = time.perf_counter()
            pq.write_table(tab, d / "out" / "telemetry" / f"rank{r}.parquet", compression=compression)
            t_ours += time.perf_counter() - a
            if seed_layout:
                a = time.perf_counter()
                opts = pacsv.WriteOptions(include_header=False)
                for stem, col in SEED_METRICS.items():
                    pacsv.write_csv(
                        pa.table({"ts": tab.column("unix_s"), "v": tab.column(col)}), seed_dir / f"{stem}_{r}.csv", opts
                    )
                t_seed += time.perf_counter() - a
        # the measured window: the span all ranks cover (the seed's files hold only that)
        n_steps = 10
        edges = np.linspace(t_lo, t_hi, n_steps + 1)
        steps = pd.DataFrame(
            {
                "step": range(n_steps),
                "phase": "measure",
                "start_unix_s": edges[:-1],
                "end_unix_s": edges[1:],
                "duration_s": np.diff(edges),
                "loss": 1.0,
                "tokens": 262144,
            }
        )
        steps.to_csv(d / "out" / "steps.csv", index=False)  # shortest round-trip floats: exact edges
        (d / "out" / "result.json").write_text(json.dumps({"outcome": "ok", "metrics": {"x": 1.0}}))
        cell = {
            "name": name,
            "parallel": {"tp": 8, "pp": 4, "dp": 1, "cp": 1, "ep": 1, "fsdp": False},
            "global_batch": 128,
            "micro_batch": 1,
            "seq_len": 2048,
            "opt_code": "00000",
            "world_size": ranks,
            "model": {"name": "gpt3-175b"},
        }
        (d / "manifest.json").write_text(
            json.dumps({"cell": cell, "metrics": {}, "collected_at": "2026-03-01T00:00:00+00:00"})
        )
        cat.new_attempt(cid, 0, "bench", "local", "bench")
        cat.update_attempt(cid, 0, 1, state="ended", outcome="ok", result_dir=str(d))
    return cat, {"gen_ours_s": t_ours, "gen_seed_s": t_seed}


def seed_layout_summaries(seed_root: Path, ranks: int) -> pd.DataFrame:
    """The seed's layout read as well as it can be: every {metric}_{rank}.csv once (pandas, C
    engine), then the same per-GPU numbers as ours, vectorised (the window is the files' span)."""
    rows = []
    for cell_dir in sorted(seed_root.iterdir()):
        for r in range(ranks):
            d = {}
            for stem in SEED_METRICS:
                f = pd.read_csv(cell_dir / f"{stem}_{r}.csv", header=None, names=["ts", "v"])
                d[stem] = (f["ts"].to_numpy(), f["v"].to_numpy())
            t, p = d["gpu_power"]
            out = {"cell": cell_dir.name, "rank": r, "window_s": t[-1] - t[0]}
            out["energy_gpu_j"] = float(np.trapezoid(p, t))
            out["energy_mem_j"] = float(np.trapezoid(d["mem_power"][1], d["mem_power"][0]))
            out["avg_power_w"] = out["energy_gpu_j"] / out["window_s"]
            out["peak_power_w"] = float(p.max())
            for stem, ours in (("gpu_thermal", "gpu_temp_c"), ("mem_thermal", "mem_temp_c")):
                out[f"avg_{ours}"] = float(d[stem][1].mean())
                out[f"peak_{ours}"] = float(d[stem][1].max())
            for stem in ("sm_clock", "mem_clock", "gpu_util", "mem_util"):
                out[f"avg_{SEED_METRICS[stem]}"] = float(d[stem][1].mean())
            for stem in ("pcie_tx_bytes", "pcie_rx_bytes"):
                v = np.unwrap(d[stem][1], period=2.0**32)
                out[stem] = float(v[-1] - v[0])
            for stem, ours in (
                ("nvlink_tx_throughput", "nvlink_tx_bytes"),
                ("nvlink_rx_throughput", "nvlink_rx_bytes"),
            ):
                out[ours] = float(d[stem][1][-1] - d[stem][1][0]) * 1024
            rows.append(out)
    return pd.DataFrame(rows)


# -- the seed as written: its analysis reads the pair of files of a metric per call --------


def _seed_read(path: Path) -> pd.DataFrame | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    df = pd.read_csv(path, header=None)
    if df.empty or df.shape[1] < 2 or df.iloc[:, 1].isna().all():
        return None
    return df


def _seed_weighted(df: pd.DataFrame) -> float:
    t, v = df.iloc[:, 0].to_numpy(), df.iloc[:, 1].to_numpy()
    dt = np.diff(t)
    return float(np.sum(v[:-1] * dt) / np.sum(dt))


def _seed_deltas(values: np.ndarray) -> float:
    total = 0.0
    for i in range(1, len(values)):  # the seed's per-sample loop, uint32 overflow handled
        total += (U32 - values[i - 1]) + values[i] if values[i] < values[i - 1] else values[i] - values[i - 1]
    return total


_SEED_PAIRS = {
    "power": ("gpu_power", "mem_power"),
    "util": ("gpu_util", "mem_util"),
    "thermal": ("gpu_thermal", "mem_thermal"),
    "clock": ("sm_clock", "mem_clock"),
    "pcie_bytes": ("pcie_rx_bytes", "pcie_tx_bytes"),
    "nvlink_bytes": ("nvlink_rx_throughput", "nvlink_tx_throughput"),
}


def _seed_metric(cell: Path, kind: str, gpu: int, peak: bool = False) -> dict[str, float] | None:
    """One call of the seed's per-metric helper: both files of the pair read again."""
    a, b = (_seed_read(cell / f"{stem}_{gpu}.csv") for stem in _SEED_PAIRS[kind])
    if a is None or b is None:
        return None
    if kind in ("pcie_bytes", "nvlink_bytes"):
        return {"rx": _seed_deltas(a.iloc[:, 1].to_numpy()), "tx": _seed_deltas(b.iloc[:, 1].to_numpy())}
    if peak:
        return {"gpu": float(a.iloc[:, 1].max()), "mem": float(b.iloc[:, 1].max())}
    return {"gpu": _seed_weighted(a), "mem": _seed_weighted(b)}


def seed_as_written(seed_root: Path, ranks: int) -> pd.DataFrame:
    """The seed's own access pattern for the numbers of Figs 4, 5 and 17 and the energy: one
    helper call per metric kind (and per avg/peak), each reading its two CSVs again; byte
    counters summed by a per-sample Python loop; energy and step time reading the power files."""
    rows = []
    for cell in sorted(seed_root.iterdir()):
        f0 = _seed_read(cell / "gpu_power_0.csv")
        exec_s = float(f0.iloc[-1, 0] - f0.iloc[0, 0]) if f0 is not None else math.nan
        energy = 0.0
        for g in range(ranks):
            out: dict[str, Any] = {"cell": cell.name, "rank": g, "exec_s": exec_s}
            for kind, peak in (
                ("power", False),
                ("power", True),
                ("thermal", False),
                ("thermal", True),
                ("clock", False),
                ("util", False),
                ("pcie_bytes", False),
                ("nvlink_bytes", False),
            ):
                res = _seed_metric(cell, kind, g, peak) or {}
                for k, v in res.items():
                    out[f"{kind}_{'peak' if peak else 'avg'}_{k}"] = v
            p = pd.read_csv(cell / f"gpu_power_{g}.csv", header=None)
            e = float(np.trapezoid(p.iloc[:, 1].to_numpy(), p.iloc[:, 0].to_numpy()))
            energy += e
            out["energy_gpu_j"] = e
            rows.append(out)
    return pd.DataFrame(rows)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_size(
    base: Path, samples: int, ranks: int, rows: int, seed_layout: bool, keep: bool, compression: str = "snappy"
) -> dict[str, float]:
    n_cells = max(1, round(samples / (ranks * rows)))
    root = Path(tempfile.mkdtemp(prefix=f"agg-{samples}-", dir=base))
    try:
        a = time.perf_counter()
        cat, gen = generate(root, n_cells, ranks, rows, seed_layout, compression)
        res: dict[str, float] = {
            "samples": n_cells * ranks * rows,
            "cells": n_cells,
            **gen,
            "gen_wall_s": time.perf_counter() - a,
        }
        res["ours_bytes"] = du(root / "home" / "results")
        res["rank_files"] = n_cells * ranks
        # ours: per-GPU summaries (and the cells/steps tables), then again with the telemetry table
        out = root / "tables"
        a = time.perf_counter()
        info = aggregate(cat, "bench", out, telemetry=False)
        res["ours_s"] = time.perf_counter() - a
        assert info["gpu_rows"] == n_cells * ranks, info
        gpus = pd.read_parquet(info["gpus_table"])
        shutil.rmtree(out)
        a = time.perf_counter()
        aggregate(cat, "bench", out, telemetry=True)
        res["ours_with_telemetry_s"] = time.perf_counter() - a
        a = time.perf_counter()
        again = aggregate(cat, "bench", out, telemetry=True)
        res["ours_incremental_s"] = time.perf_counter() - a
        assert again["read_attempts"] == 0
        if seed_layout:
            res["seed_bytes"] = du(root / "seed")
            res["seed_files"] = n_cells * ranks * len(SEED_METRICS)
            a = time.perf_counter()
            seed = seed_layout_summaries(root / "seed", ranks)
            res["seed_s"] = time.perf_counter() - a
            a = time.perf_counter()
            written = seed_as_written(root / "seed", ranks)
            res["seed_written_s"] = time.perf_counter() - a
            # the same numbers both ways (the window is the whole span here)
            g = gpus.sort_values(["cell_id", "rank"]).reset_index(drop=True)
            s = seed.sort_values(["cell", "rank"]).reset_index(drop=True)
            for col in (
                "energy_gpu_j",
                "peak_power_w",
                "avg_gpu_temp_c",
                "peak_mem_temp_c",
                "avg_sm_clock_mhz",
                "pcie_rx_bytes",
                "nvlink_tx_bytes",
            ):
                np.testing.assert_allclose(g[col].to_numpy(), s[col].to_numpy(), rtol=1e-6, err_msg=col)
            w = written.sort_values(["cell", "rank"]).reset_index(drop=True)
            np.testing.assert_allclose(g["energy_gpu_j"].to_numpy(), w["energy_gpu_j"].to_numpy(), rtol=1e-6)
            np.testing.assert_allclose(g["peak_gpu_temp_c"].to_numpy(), w["thermal_peak_gpu"].to_numpy())
        return res
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e6,4e6,16e6", help="total samples (rows of all ranks), comma-separated")
    ap.add_argument("--seed-max", type=float, default=16e6, help="largest size at which the seed layout is run")
    ap.add_argument("--ranks", type=int, default=32, help="GPUs per cell (32 = the H200 cells)")
    ap.add_argument("--rows", type=int, default=6000, help="samples per rank (6000 = 5 min at 20 Hz)")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--compression", default="lz4", help="of our rank files (the job writes lz4)")
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    base = Path(args.dir)
    results = []
    for n in sizes:
        seed = n <= args.seed_max
        print(f"... {n:,} samples{' (+ seed layout)' if seed else ''}", file=sys.stderr, flush=True)
        results.append(run_size(base, n, args.ranks, args.rows, seed, args.keep, args.compression))
    # per-sample seed cost from the largest size it ran at, for the sizes where it did not run
    measured = [r for r in results if "seed_s" in r]
    last = measured[-1] if measured else None

    def seed_cost(r: dict[str, float], key: str) -> tuple[float, str]:
        if key in r:
            return r[key], " "
        return (last[key] / last["samples"] * r["samples"], "*") if last else (math.nan, "*")

    print(
        f"{'samples':>12} {'cells':>5} {'rank files':>10} {'ours GB':>8} {'seed GB':>8} {'seed files':>10}"
        f" {'ours s':>8} {'+tele s':>8} {'again s':>8} {'seed best s':>12} {'x':>6} {'seed as written s':>18} {'x':>6}"
    )
    for r in results:
        best, m1 = seed_cost(r, "seed_s")
        written, m2 = seed_cost(r, "seed_written_s")
        print(
            f"{r['samples']:>12,} {r['cells']:>5} {r['rank_files']:>10} {r['ours_bytes'] / 1e9:>8.2f}"
            f" {r.get('seed_bytes', math.nan) / 1e9:>8.2f} {r.get('seed_files', 0):>10}"
            f" {r['ours_s']:>8.2f} {r['ours_with_telemetry_s']:>8.2f} {r['ours_incremental_s']:>8.2f}"
            f" {best:>11.1f}{m1} {best / r['ours_s']:>5.1f}x {written:>17.1f}{m2} {written / r['ours_s']:>5.1f}x"
        )
    print(
        "ours s: aggregate() -> cells, steps and gpus tables (per-GPU summaries, all rank files read once);"
        " +tele s: also the windowed telemetry.parquet; again s: aggregate() again, nothing new (incremental)."
    )
    print(
        "seed best s: the seed's CSV layout read as well as pandas can (each file once, C engine, vectorised"
        " summaries); seed as written s: the seed's own access pattern (scripts/visualization/vistools.py:"
        " per metric and avg/peak call both CSVs read again, byte counters summed in a Python loop)."
    )
    print("* = not run at that size: extrapolated linearly from the largest size it was run at.")
    print(
        "generation (s): "
        + "; ".join(f"{r['samples']:,}: ours {r['gen_ours_s']:.0f}, seed CSV {r['gen_seed_s']:.0f}" for r in results)
    )
    print(
        f"our rank files: {args.compression}; machine: {os.cpu_count()} cores; the same samples in both layouts; per-GPU numbers cross-checked (rtol 1e-6)"
    )


if __name__ == "__main__":
    main()

"""Build a campaign's tidy tables from the results store, incrementally.

Tables (under the campaign's tables directory; every write is a temporary file renamed into
place with ``os.replace``):

- ``cells.parquet``: one row per cell and repeat: the newest attempt that ended with a result
  (so OOM cells appear as OOM), the job's metrics, ``measured_at`` (the manifest's
  ``collected_at``), and the numbers recomputed from the telemetry (``energy_sampled_j`` ...,
  ``efficiency_samples_per_s_mj``), and ``max_memory_allocated[_step2]_{mean,total}_bytes``:
  the mean and sum over ranks of each rank's allocator peak (result.json's ``per_rank``);
- ``steps.parquet``: one row per training step of every ok cell;
- ``gpus.parquet``: one row per cell x repeat x GPU (host, rank, slot, UUID, PCI bus id,
  temperatures, power, clocks, NVLink/PCIe totals, throttle time by reason);
- ``telemetry.parquet/``: a Parquet dataset, one file per attempt, holding the samples of all
  ranks inside the measured window (``pandas.read_parquet`` reads the directory);
- ``kernels.parquet``: kernel-time breakdown by category per rank, where the job profiled.

``_aggregated.json`` lists the attempts the tables hold. A later run reads only the attempts
not in it (a new cell, a newer attempt); rows of attempts that are no longer chosen are
dropped. The index is written last, so a crash in between only costs a re-read.

Energy and efficiency (PPT's definitions): the energy of a cell is the sum over its GPUs of
the trapezoid integral of ``power_w`` over the measured window (first measured step's start
to the last one's end, from ``steps.csv``; telemetry and steps share the clock ``unix_s``).
NVML's board power already covers the HBM, so ``mem_power_w`` is reported on its own
(``energy_mem_sampled_j``) and only added with ``add_mem_power=True``.
``energy_per_step_sampled_j`` = energy / measured steps;
``efficiency_samples_per_s_mj`` = global_batch / (step_time_median_s * energy_per_step_j / 1e6),
samples / (s * MJ). The NVML energy counter's difference over the same window is kept as a
cross-check (``energy_counter_over_sampled`` = counter / sampled, ~1). Both numbers are
defined once, in :mod:`charllm.definitions`, which the job calls too; result files that carry
the older names (``samples_per_s_per_mj``) are read under the new ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from charllm.analysis import telemetry as tele
from charllm.catalog import AttemptRow, Catalog
from charllm.definitions import (
    METRIC_ALIASES,
    canonical_metrics,
    counter_over_sampled,
    efficiency_samples_per_s_mj,
    measured_window,
)
from charllm.outcomes import PREFERENCE, Outcome
from charllm.store import MANIFEST

_PREFER: dict[str, int] = {str(o): i for o, i in PREFERENCE.items()}  # ok, oom, failed, timeout, cancelled, lost
INDEX = "_aggregated.json"
INDEX_VERSION = 3  # 3: recompute_mode, the Kwai/PCIe knob columns, per-rank memory
KEY = ["cell_id", "repeat", "attempt"]
TABLES = ("cells", "steps", "gpus", "kernels")
TELEMETRY_DIR = "telemetry.parquet"
_RANK_RE = re.compile(r"^rank(\d+)\.parquet$")
_KERNELS_RE = re.compile(r"^kernels_rank(\d+)\.csv$")

Key = tuple[str, int, int]


def _flat_cell(cell: dict[str, Any]) -> dict[str, Any]:
    par = cell.get("parallel", {})
    opt = cell.get("opt", {})
    model = cell.get("model", {})
    return {
        "cell_name": cell.get("name"),
        "model": model.get("name"),
        "n_layers": model.get("n_layers"),
        "hidden": model.get("hidden"),
        **{k: par.get(k) for k in ("tp", "pp", "dp", "cp", "ep", "fsdp")},
        "micro_batch": cell.get("micro_batch"),
        "global_batch": cell.get("global_batch"),
        "seq_len": cell.get("seq_len"),
        "opt_code": cell.get("opt_code"),
        "recompute": recompute_mode(opt) != "none",
        "recompute_mode": recompute_mode(opt),
        "overlap": opt.get("overlap"),
        "world_size": cell.get("world_size"),
        "gpu_type": cell.get("gpu_type"),
        # the Kwai / PCIe knobs, at their defaults where a cell predates them
        "pp_virtual": int(par.get("pp_virtual") or 1),
        "recompute_layers": opt.get("recompute_layers"),
        "offload_alpha": float(opt.get("offload_alpha") or 0.0),
        "zero": int(opt.get("zero") or 0),
        "cpu_offload": bool(opt.get("cpu_offload") or False),
        "interconnect": str(opt.get("interconnect") or "native"),
    }


def recompute_mode(opt: dict[str, Any]) -> str:
    """The cell's recompute mode, none | selective | kwai | full, from a bool or a mode string.

    A bool ``recompute`` (cells from before the modes) means full or none, ``recompute_granularity``
    naming the mode where it is set.
    """
    r = opt.get("recompute")
    if isinstance(r, str):
        return r
    if not r:
        return "none"
    return str(opt.get("recompute_granularity") or "full")


def layout_label(row: Any) -> str:
    """A parallel layout as the paper writes it: TP8PP2, EP8TP1PP4, TP8+FSDP."""
    g = row.get if hasattr(row, "get") else row.__getitem__

    def num(k: str) -> int:
        v = g(k)
        return 1 if v is None or (isinstance(v, float) and np.isnan(v)) else int(v)

    s = f"TP{num('tp')}PP{num('pp')}"
    if num("cp") > 1:
        s += f"CP{num('cp')}"
    if num("ep") > 1:
        s = f"EP{num('ep')}" + s
    if bool(g("fsdp")):
        s = f"TP{num('tp')}+FSDP" if num("pp") == 1 else s + "+FSDP"
    return s


def pick_attempts(attempts: Iterable[AttemptRow]) -> list[AttemptRow]:
    """Per (cell, repeat): the newest ok attempt, else the newest oom, else the newest ended one."""
    best: dict[tuple[str, int], AttemptRow] = {}
    for a in attempts:
        if not a.outcome or not a.result_dir:
            continue
        key = (a.cell_id, a.repeat)
        cur = best.get(key)
        rank = (_PREFER.get(a.outcome, 9), -a.attempt)
        if cur is None or rank < (_PREFER.get(cur.outcome or "", 9), -cur.attempt):
            best[key] = a
    return [best[k] for k in sorted(best)]


# -- one attempt -------------------------------------------------------------------------


@dataclass
class AttemptData:
    """Everything the tables need from one attempt directory."""

    key: Key
    cell: dict[str, Any]
    steps: pd.DataFrame | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    kernels: list[dict[str, Any]] = field(default_factory=list)
    telemetry: pa.Table | None = None


def _rank_files(directory: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := pattern.match(p.name))]
    return sorted(found)


def read_attempt(
    a: AttemptRow, campaign: str, *, with_telemetry: bool = True, add_mem_power: bool = False
) -> AttemptData:
    """Read one attempt directory: manifest, steps, every rank's telemetry (once), kernels."""
    rdir = Path(a.result_dir or "")
    manifest = json.loads((rdir / MANIFEST).read_text())
    cell = manifest.get("cell", {})
    key: Key = (a.cell_id, int(a.repeat), int(a.attempt))
    row: dict[str, Any] = {
        "campaign": campaign,
        "cell_id": a.cell_id,
        "repeat": a.repeat,
        "attempt": a.attempt,
        "outcome": a.outcome,
        "job_id": a.job_id,
        "nodes": manifest.get("nodes"),
        "result_dir": str(rdir),
        "measured_at": manifest.get("collected_at"),
        **_flat_cell(cell),
    }
    row["layout"] = layout_label(row)
    for k, v in canonical_metrics(manifest.get("metrics") or {}).items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        row[k] = float(v)
    data = AttemptData(key, row)
    out = rdir / "out"
    row.update(_per_rank_memory(out / "result.json"))
    steps_csv = out / "steps.csv"
    if a.outcome != Outcome.OK or not steps_csv.is_file():
        return data
    steps = pd.read_csv(steps_csv)
    steps.insert(0, "attempt", a.attempt)
    steps.insert(0, "repeat", a.repeat)
    steps.insert(0, "cell_id", a.cell_id)
    data.steps = steps
    cols = ("phase", "start_unix_s", "end_unix_s")
    win = measured_window(zip(*(steps[c] for c in cols), strict=True)) if set(cols) <= set(steps) else None
    if win is None:
        return data
    t0, t1, n_steps = win
    meas = steps[steps["phase"] == "measure"]
    row["window_start_unix_s"], row["window_end_unix_s"] = t0, t1
    row.setdefault("step_time_median_s", float(meas["duration_s"].median()))
    row.setdefault("measured_steps", float(n_steps))
    files = [p for _, p in _rank_files(out / "telemetry", _RANK_RE)]
    if files:
        # every rank file once, in one parallel scan; only the summary's columns without the telemetry table
        table = tele.read_rank_files(files, None if with_telemetry else tele.SUMMARY_COLUMNS)
        table = tele.sorted_by_rank_time(table)
        for i, s in enumerate(tele.rank_summaries(table, t0, t1)):
            if s.get("rank") is None:
                s["rank"] = i
            data.gpus.append({"cell_id": a.cell_id, "repeat": a.repeat, "attempt": a.attempt, **s})
        if with_telemetry:
            data.telemetry = tele.window_table(table, t0, t1, key)
    for rank, path in _rank_files(out, _KERNELS_RE):
        k = pd.read_csv(path)
        for rec in k.to_dict("records"):
            data.kernels.append({"cell_id": a.cell_id, "repeat": a.repeat, "attempt": a.attempt, "rank": rank, **rec})
    if data.gpus:
        _cell_energy(row, data.gpus, add_mem_power)
    return data


def _per_rank_memory(result_json: Path) -> dict[str, float]:
    """Mean and sum over ranks of each rank's allocator peak (the scaling table's avg/total memory)."""
    try:
        per_rank = json.loads(result_json.read_text()).get("per_rank") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    out: dict[str, float] = {}
    for key in ("max_memory_allocated_bytes", "max_memory_allocated_step2_bytes"):
        vals = [float(v) for v in per_rank.get(key) or [] if isinstance(v, int | float) and not isinstance(v, bool)]
        if vals:
            stem = key.removesuffix("_bytes")
            out[f"{stem}_mean_bytes"] = float(np.mean(vals))
            out[f"{stem}_total_bytes"] = float(np.sum(vals))
    return out


def _cell_energy(row: dict[str, Any], gpus: list[dict[str, Any]], add_mem_power: bool) -> None:
    """Cell-level energy and efficiency from the per-GPU numbers (see the module docstring)."""
    g = pd.DataFrame(gpus)

    def total(col: str) -> float:
        v = g[col].to_numpy(float)
        return float(np.nansum(v)) if np.isfinite(v).any() else np.nan

    e_gpu, e_mem, e_cnt = total("energy_gpu_j"), total("energy_mem_j"), total("energy_counter_j")
    energy = e_gpu + (e_mem if add_mem_power and np.isfinite(e_mem) else 0.0)
    steps = row.get("measured_steps") or np.nan
    per_step = energy / steps
    row["gpus_measured"] = float(len(g))
    row["energy_sampled_j"] = energy
    row["energy_mem_sampled_j"] = e_mem
    row["energy_counter_delta_j"] = e_cnt
    row["energy_counter_over_sampled"] = counter_over_sampled(e_cnt, e_gpu)
    row["energy_per_step_sampled_j"] = per_step
    st = row.get("step_time_median_s") or np.nan
    gb = row.get("global_batch") or np.nan
    row["efficiency_samples_per_s_mj"] = efficiency_samples_per_s_mj(gb, st, per_step)
    # job-level temperature/power/clock numbers where the job did not report them
    fills = {
        "avg_gpu_temp_c": g["avg_gpu_temp_c"].mean(),
        "peak_gpu_temp_c": g["peak_gpu_temp_c"].max(),
        "avg_mem_temp_c": g["avg_mem_temp_c"].mean(),
        "peak_mem_temp_c": g["peak_mem_temp_c"].max(),
        "avg_power_w": g["avg_power_w"].mean(),
        "peak_power_w": g["peak_power_w"].max(),
        "avg_sm_clock_mhz": g["avg_sm_clock_mhz"].mean(),
    }
    for k, v in fills.items():
        if k not in row or row[k] is None or (isinstance(row[k], float) and np.isnan(row[k])):
            row[k] = float(v)


# -- tables ------------------------------------------------------------------------------


def _key_str(k: Key) -> str:
    return f"{k[0]}/r{k[1]}/a{k[2]}"


def _part_name(k: Key) -> str:
    return f"{k[0]}_r{k[1]}_a{k[2]}.parquet"


def _atomic_parquet_table(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def _load_index(out_dir: Path) -> dict[str, Any]:
    try:
        idx = json.loads((out_dir / INDEX).read_text())
    except (OSError, ValueError):
        return {}
    if idx.get("version") != INDEX_VERSION or not all((out_dir / f"{t}.parquet").is_file() for t in TABLES):
        return {}
    return dict(idx.get("attempts", {}))


# columns older tables carry under an older name that the aggregation wrote (they win over
# the job's copy of the same number under the one name)
_AGGREGATION_OLD_NAMES = frozenset({"energy_counter_ratio"})


def read_table(path: Path) -> pd.DataFrame:
    """A table written by any version of charllm, older metric names read under the one name."""
    df = pd.read_parquet(path)
    old = [c for c in df.columns if c in METRIC_ALIASES]
    if not old:
        return df
    drop = [c for c in old if METRIC_ALIASES[c] in df.columns and c not in _AGGREGATION_OLD_NAMES]
    drop += [METRIC_ALIASES[c] for c in old if c in _AGGREGATION_OLD_NAMES and METRIC_ALIASES[c] in df.columns]
    return df.drop(columns=drop).rename(columns=METRIC_ALIASES)


def _keep_rows(path: Path, keep: set[str]) -> pd.DataFrame:
    """Rows of an existing table whose attempt is in ``keep`` (key strings)."""
    if not keep or not path.is_file():
        return pd.DataFrame()
    df = read_table(path)
    if df.empty or not set(KEY) <= set(df.columns):
        return pd.DataFrame()
    keys = df["cell_id"].astype(str) + "/r" + df["repeat"].astype(str) + "/a" + df["attempt"].astype(str)
    return df[keys.isin(keep)]


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if f is not None and not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _sorted(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    cols = [c for c in by if c in df.columns]
    return df.sort_values(cols, kind="stable").reset_index(drop=True) if cols and not df.empty else df


def aggregate(
    catalog: Catalog,
    campaign: str,
    out_dir: Path,
    cell_ids: Iterable[str] | None = None,
    *,
    telemetry: bool = True,
    add_mem_power: bool = False,
) -> dict[str, Any]:
    """Write the campaign's tables (see the module docstring); return paths and counts.

    Only attempts that are not in the tables yet are read; ``read_attempts`` and
    ``reused_attempts`` in the result say how many of each.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(cell_ids) if cell_ids is not None else None
    picked = [a for a in pick_attempts(catalog.attempts(campaign=campaign)) if wanted is None or a.cell_id in wanted]
    keys = {_key_str((a.cell_id, int(a.repeat), int(a.attempt))): a for a in picked}
    index = _load_index(out_dir)
    if index and any(bool(v.get("telemetry")) != telemetry for v in index.values()):
        index = {}  # the telemetry table was (not) wanted before: rebuild
    reuse = {k for k in keys if k in index}
    fresh = [a for k, a in keys.items() if k not in reuse]

    tdir = out_dir / TELEMETRY_DIR
    if telemetry:
        if tdir.is_file():
            tdir.unlink()
        tdir.mkdir(exist_ok=True)

    def read_one(a: AttemptRow) -> AttemptData:
        d = read_attempt(a, campaign, with_telemetry=telemetry, add_mem_power=add_mem_power)
        if d.telemetry is not None:  # written at once: the campaign's samples never sit in memory together
            if d.telemetry.num_rows:
                _atomic_parquet_table(d.telemetry, tdir / _part_name(d.key))
            d.telemetry = None
        return d

    # attempts in parallel: one's files are read (pyarrow, no GIL) while another's are summarised
    workers = max(1, min(len(fresh), os.cpu_count() or 1, 4))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        new = list(pool.map(read_one, fresh))

    tables: dict[str, pd.DataFrame] = {}
    tables["cells"] = _concat([_keep_rows(out_dir / "cells.parquet", reuse), pd.DataFrame([d.cell for d in new])])
    tables["steps"] = _concat(
        [_keep_rows(out_dir / "steps.parquet", reuse)] + [d.steps for d in new if d.steps is not None]
    )
    tables["gpus"] = _concat(
        [_keep_rows(out_dir / "gpus.parquet", reuse), pd.DataFrame([g for d in new for g in d.gpus])]
    )
    tables["kernels"] = _concat(
        [_keep_rows(out_dir / "kernels.parquet", reuse), pd.DataFrame([k for d in new for k in d.kernels])]
    )
    if not tables["cells"].empty:
        tables["cells"]["measured_at"] = pd.to_datetime(tables["cells"]["measured_at"], utc=True, errors="coerce")
    tables["cells"] = _sorted(tables["cells"], ["cell_name", "repeat"])
    tables["steps"] = _sorted(tables["steps"], ["cell_id", "repeat", "step"])
    tables["gpus"] = _sorted(tables["gpus"], ["cell_id", "repeat", "rank"])
    tables["kernels"] = _sorted(tables["kernels"], ["cell_id", "repeat", "rank"])

    tables["cells"].attrs["tables_dir"] = str(out_dir)  # lets draw_all find gpus/kernels beside it
    paths = {name: write_parquet(df, out_dir / f"{name}.parquet") for name, df in tables.items()}

    if telemetry:
        wanted_parts = {_part_name((a.cell_id, int(a.repeat), int(a.attempt))) for a in picked}
        for p in tdir.glob("*.parquet"):
            if p.name not in wanted_parts:
                p.unlink()
    elif tdir.exists():
        shutil.rmtree(tdir)

    idx = {k: {"result_dir": a.result_dir, "outcome": a.outcome, "telemetry": telemetry} for k, a in keys.items()}
    tmp = out_dir / f".{INDEX}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"version": INDEX_VERSION, "attempts": idx}, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / INDEX)

    cells = tables["cells"]
    outcomes = cells["outcome"].value_counts().to_dict() if not cells.empty else {}
    return {
        "cells_table": str(paths["cells"]),
        "steps_table": str(paths["steps"]),
        "gpus_table": str(paths["gpus"]),
        "kernels_table": str(paths["kernels"]),
        "telemetry_table": str(tdir) if telemetry else None,
        "rows": len(cells),
        "gpu_rows": len(tables["gpus"]),
        "outcomes": {str(k): int(v) for k, v in outcomes.items()},
        "read_attempts": len(fresh),
        "reused_attempts": len(reuse),
    }

"""The scaling table of the PCIe strategies study: every cell against the 1-GPU cell of its model.

Columns follow the study's CSVs (``../shared/data/pcie-strategies/``), so its tables and ours
read the same. Raw columns of a row (one cell; repeats reduced to their median):

- ``num_devices``: GPUs of the cell (its world size);
- ``total_tokens``: tokens of the measured steps (global batch x sequence x measured steps);
- ``total_time_sec``: measured steps x median step time, so that
  ``throughput_tokens_sec`` = total_tokens / total_time_sec (the job's ``tokens_per_s``);
- ``avg_gpu_mem_mb`` / ``total_gpu_mem_mb`` / ``peak_gpu_mem_mb``: the mean, sum and maximum
  over GPUs of each GPU's allocator peak (``torch.cuda.max_memory_allocated``), in MiB. The study
  averaged the memory it sampled during training; charllm records the allocator peak per rank.
- ``avg_gpu_util_percent``: the mean NVML GPU utilisation over the measured window.

Derived columns, against the baseline row B (the 1-GPU row of the same model, sequence length
and GPU type; ``baseline_cell`` names it), N = num_devices:

- relative_runtime_overhead_percent = (T - T_B) / T_B * 100
- ideal_scaling_throughput = N * tput_B
- throughput_scaling_factor = tput / tput_B
- throughput_efficiency_percent = tput / (N * tput_B) * 100
- memory_scaling_factor = avg_mem / avg_mem_B
- total_memory_scaling_factor = total_mem / avg_mem_B
- peak_memory_scaling_factor = peak_mem / peak_mem_B

Where several 1-GPU rows qualify, the baseline of a row is the one with the same global batch,
then the same micro batch, then the plainest settings (no ZeRO, no CPU offload, no activation
offload or recompute, native interconnect), then the first by cell name. A row whose baseline is
missing or ran out of memory keeps NaN in the derived columns; OOM cells stay in the table with
``outcome`` ``oom`` (an outcome of the study, not a gap).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

MIB = float(1 << 20)

#: the study's raw columns, in its order
RAW_COLUMNS = (
    "num_devices",
    "total_tokens",
    "total_time_sec",
    "throughput_tokens_sec",
    "avg_gpu_mem_mb",
    "total_gpu_mem_mb",
    "peak_gpu_mem_mb",
    "avg_gpu_util_percent",
)
#: the study's derived columns, in its order
DERIVED_COLUMNS = (
    "relative_runtime_overhead_percent",
    "ideal_scaling_throughput",
    "throughput_scaling_factor",
    "throughput_efficiency_percent",
    "memory_scaling_factor",
    "total_memory_scaling_factor",
    "peak_memory_scaling_factor",
)
#: identity columns of a charllm cell in the scaling table
ID_COLUMNS = (
    "model",
    "strategy",
    "layout",
    "interconnect",
    "zero",
    "cpu_offload",
    "recompute_mode",
    "offload_alpha",
    "seq_len",
    "global_batch",
    "micro_batch",
    "gpu_type",
    "outcome",
    "repeats",
    "cell_name",
    "baseline_cell",
)
#: what a baseline must share with the row it is the baseline of (those present in the frame)
BASELINE_KEYS = ("model", "seq_len", "gpu_type")
# tie-breaks among several 1-GPU candidates: same as the row first, then the plainest settings
_SAME_AS_ROW = ("global_batch", "micro_batch")
_PLAIN = (("zero", 0), ("cpu_offload", False), ("offload_alpha", 0.0), ("recompute_mode", "none"))


def _is_set(v: Any) -> bool:
    return not (v is None or (isinstance(v, float) and np.isnan(v)))


def _plainness(row: pd.Series) -> tuple[int, ...]:
    out = [int(_is_set(row.get(k)) and row.get(k) != default) for k, default in _PLAIN]
    ic = row.get("interconnect")
    out.append(int(_is_set(ic) and ic != "native"))
    return tuple(out)


def derive(
    rows: pd.DataFrame,
    keys: Sequence[str] = BASELINE_KEYS,
    *,
    gpus: str = "num_devices",
    name: str | None = None,
) -> pd.DataFrame:
    """``rows`` with the derived columns (and ``baseline_cell`` where ``name`` is given).

    ``rows`` carries the raw columns (:data:`RAW_COLUMNS`, ``avg_gpu_util_percent`` optional)
    and the ``keys`` that a row shares with its baseline; the baseline is a row with
    ``gpus`` == 1 and an ``outcome`` of ok where the frame has outcomes (see the module
    docstring for the choice among several). Rows keep their order.
    """
    keys = [k for k in keys if k in rows.columns]
    need = ("total_time_sec", "throughput_tokens_sec", "avg_gpu_mem_mb", "total_gpu_mem_mb", "peak_gpu_mem_mb", gpus)
    missing = [c for c in need if c not in rows.columns]
    if missing:
        raise ValueError(f"scaling rows lack the column(s) {', '.join(missing)}")
    df = rows.reset_index(drop=True).copy()
    ok = df["outcome"].eq("ok") if "outcome" in df.columns else pd.Series(True, index=df.index)
    single = df[(df[gpus] == 1) & ok & df["throughput_tokens_sec"].notna()]
    base_idx: list[int | None] = []
    for _, row in df.iterrows():
        cand = single
        for k in keys:
            cand = cand[cand[k] == row[k]] if _is_set(row[k]) else cand[cand[k].isna()]
        if cand.empty:
            base_idx.append(None)
            continue

        def score(j: int, row: pd.Series = row) -> tuple[Any, ...]:
            c = df.loc[j]
            same = tuple(int(k in df.columns and c[k] != row[k]) for k in _SAME_AS_ROW)
            return (*same, *_plainness(c), str(c[name]) if name else "", j)

        base_idx.append(min(cand.index, key=score))
    have = [j is not None for j in base_idx]
    b = df.loc[[j for j in base_idx if j is not None]].reset_index(drop=True)
    nan = np.full(len(df), np.nan)

    def base(col: str) -> np.ndarray:
        out = nan.copy()
        out[np.array(have, bool)] = b[col].to_numpy(float)
        return out

    t, t1 = df["total_time_sec"].to_numpy(float), base("total_time_sec")
    tput, tput1 = df["throughput_tokens_sec"].to_numpy(float), base("throughput_tokens_sec")
    n = df[gpus].to_numpy(float)
    mem1, peak1 = base("avg_gpu_mem_mb"), base("peak_gpu_mem_mb")
    with np.errstate(divide="ignore", invalid="ignore"):
        df["relative_runtime_overhead_percent"] = (t - t1) / t1 * 100
        df["ideal_scaling_throughput"] = n * tput1
        df["throughput_scaling_factor"] = tput / tput1
        df["throughput_efficiency_percent"] = tput / (n * tput1) * 100
        df["memory_scaling_factor"] = df["avg_gpu_mem_mb"].to_numpy(float) / mem1
        df["total_memory_scaling_factor"] = df["total_gpu_mem_mb"].to_numpy(float) / mem1
        df["peak_memory_scaling_factor"] = df["peak_gpu_mem_mb"].to_numpy(float) / peak1
    if name:
        names = df[name].tolist()
        df["baseline_cell"] = [names[j] if j is not None else None for j in base_idx]
    return df


def strategy_of(row: pd.Series) -> str:
    """The study's strategy name of a cell: single_gpu, ddp, tp, pp, zero1-3[_offload], fsdp, hybrid."""

    def num(k: str, default: int = 1) -> int:
        v = row.get(k)
        return int(v) if _is_set(v) else default

    world = num("world_size", num("tp") * num("pp") * num("dp") * num("cp"))
    zero = num("zero", 0)
    offload = "_offload" if bool(row.get("cpu_offload")) and _is_set(row.get("cpu_offload")) else ""
    if world == 1:
        return "single_gpu"
    if zero:
        return f"zero{zero}{offload}"
    if bool(row.get("fsdp")) and _is_set(row.get("fsdp")):
        return "fsdp" + offload
    tp, pp, dp, cp = num("tp"), num("pp"), num("dp"), num("cp")
    parts = [n for n, d in (("tp", tp), ("pp", pp), ("ddp", dp), ("cp", cp)) if d > 1]
    return parts[0] if len(parts) == 1 else "hybrid"


def _median_cell(g: pd.DataFrame) -> dict[str, Any]:
    ok = g[g["outcome"] == "ok"] if "outcome" in g.columns else g
    first = g.iloc[0]
    rec: dict[str, Any] = {k: first.get(k) for k in g.columns if not pd.api.types.is_float_dtype(g[k])}
    src = ok if not ok.empty else g
    for k in g.columns:
        if pd.api.types.is_float_dtype(g[k]):
            rec[k] = float(src[k].median()) if src[k].notna().any() else np.nan
    rec["outcome"] = "ok" if not ok.empty else str(first.get("outcome"))
    rec["repeats"] = len(ok) if not ok.empty else len(g)
    return rec


def from_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The study's raw columns from a campaign's cells table (one row per cell, repeats reduced)."""
    if cells.empty:
        return pd.DataFrame(columns=[*ID_COLUMNS[:-1], *RAW_COLUMNS])
    key = "cell_name" if "cell_name" in cells.columns else "cell_id"
    recs = [_median_cell(g) for _, g in cells.groupby(key, sort=True, dropna=False)]
    c = pd.DataFrame(recs)

    def col(name: str) -> pd.Series:
        return c[name].astype(float) if name in c.columns else pd.Series(np.nan, index=c.index)

    world = col("world_size")
    steps, tps = col("measured_steps"), col("tokens_per_step")
    if tps.isna().all():
        tps = col("global_batch") * col("seq_len")
    out = pd.DataFrame(index=c.index)
    for k in ID_COLUMNS[:-1]:
        if k == "strategy":
            out[k] = [strategy_of(r) for _, r in c.iterrows()]
        elif k == "cell_name":
            out[k] = c[key]
        elif k in c.columns:
            out[k] = c[k]
        else:
            out[k] = None
    out["num_devices"] = world.astype("Int64")
    out["total_tokens"] = tps * steps
    out["total_time_sec"] = steps * col("step_time_median_s")
    out["throughput_tokens_sec"] = out["total_tokens"] / out["total_time_sec"]
    peak = col("max_memory_allocated_bytes")
    mean, total = col("max_memory_allocated_mean_bytes"), col("max_memory_allocated_total_bytes")
    one = world == 1  # one GPU: its peak is the mean and the sum
    mean, total = mean.where(mean.notna() | ~one, peak), total.where(total.notna() | ~one, peak)
    out["avg_gpu_mem_mb"] = mean / MIB
    out["total_gpu_mem_mb"] = total / MIB
    out["peak_gpu_mem_mb"] = peak / MIB
    out["avg_gpu_util_percent"] = col("avg_gpu_util_pct")
    return out


def scaling_table(cells: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """The scaling table of a cells table: :func:`from_cells`, then :func:`derive`.

    ``by``: more columns a row must share with its baseline (e.g. ``interconnect``, to compare
    PCIe-only cells against a 1-GPU cell run with the PCIe setting).
    """
    raw = from_cells(cells)
    unknown = [k for k in by if k not in raw.columns]
    if unknown:
        raise ValueError(f"unknown baseline key(s) {', '.join(unknown)}; known: {', '.join(raw.columns)}")
    table = derive(raw, [*BASELINE_KEYS, *by], name="cell_name")
    order = [c for c in (*ID_COLUMNS, *RAW_COLUMNS, *DERIVED_COLUMNS) if c in table.columns]
    table = table[order]
    return table.sort_values(["model", "num_devices", "strategy", "cell_name"], kind="stable").reset_index(drop=True)


#: the study's strategy names -> the parallel degree that is N (single_gpu: all 1)
_STUDY_DEGREE = {
    "megatron_ddp": "dp",
    "tensor_parallel": "tp",
    "megatron_pipeline_parallel": "pp",
    "simple_zero_stage1": "dp",
    "simple_zero_stage2": "dp",
    "simple_zero_stage3": "dp",
    "simple_zero_stage3_offload": "dp",
}


def study_as_cells(raw: pd.DataFrame, model_prefix: str = "pcie-") -> pd.DataFrame:
    """The PCIe study's published rows as a charllm cells table (one measured 'step' = its whole run).

    Lets :func:`scaling_table` and the figures run on the study's own numbers, e.g. to draw them
    beside a campaign's. Model ``10m`` becomes ``pcie-10m`` (the catalog's shape), the ZeRO file's
    ``zero-10m`` ``pcie-zero-10m`` (the study measured ZeRO against its own 1-GPU runs of a plain
    PyTorch model); ZeRO stages and CPU offload become ``zero`` / ``cpu_offload``.
    """
    mib = MIB
    rows = []
    for _, r in raw.iterrows():
        n, strat = int(r["num_devices"]), str(r["strategy"])
        par = {"tp": 1, "pp": 1, "dp": 1}
        if strat in _STUDY_DEGREE:
            par[_STUDY_DEGREE[strat]] = n
        zero = int(strat[len("simple_zero_stage")]) if strat.startswith("simple_zero_stage") else 0
        rows.append(
            {
                "cell_id": f"{r['model_size']}-{strat}-{n}",
                "cell_name": f"{r['model_size']}-{strat}-{n}",
                "model": f"{model_prefix}{r['model_size']}",
                "repeat": 0,
                "outcome": "ok",
                "world_size": n,
                **par,
                "zero": zero,
                "cpu_offload": strat.endswith("_offload"),
                "tokens_per_step": float(r["total_tokens"]),
                "measured_steps": 1.0,
                "step_time_median_s": float(r["total_time_sec"]),
                "max_memory_allocated_bytes": float(r["peak_gpu_mem_mb"]) * mib,
                "max_memory_allocated_mean_bytes": float(r["avg_gpu_mem_mb"]) * mib,
                "max_memory_allocated_total_bytes": float(r["total_gpu_mem_mb"]) * mib,
                "avg_gpu_util_pct": float(r["avg_gpu_util_percent"]),
            }
        )
    return pd.DataFrame(rows)


def write_scaling(table: pd.DataFrame, out_dir: Path, stem: str = "scaling") -> tuple[Path, Path]:
    """``stem``.parquet and ``stem``.csv under ``out_dir`` (each written whole, then renamed)."""
    from charllm.analysis.aggregate import write_parquet

    out_dir.mkdir(parents=True, exist_ok=True)
    pq_path = write_parquet(table, out_dir / f"{stem}.parquet")
    csv_path = out_dir / f"{stem}.csv"
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    table.to_csv(tmp, index=False, float_format="%.10g")
    tmp.replace(csv_path)
    return pq_path, csv_path


def format_table(table: pd.DataFrame) -> str:
    """A compact text rendering for the terminal: one line per cell."""
    cols = [
        ("model", "{}"),
        ("strategy", "{}"),
        ("num_devices", "{}"),
        ("interconnect", "{}"),
        ("outcome", "{}"),
        ("throughput_tokens_sec", "{:,.0f}"),
        ("throughput_scaling_factor", "{:.3f}"),
        ("throughput_efficiency_percent", "{:.1f}"),
        ("relative_runtime_overhead_percent", "{:+.1f}"),
        ("peak_gpu_mem_mb", "{:,.0f}"),
        ("peak_memory_scaling_factor", "{:.3f}"),
    ]
    cols = [(c, f) for c, f in cols if c in table.columns]
    cells = [[c for c, _ in cols]]
    for _, r in table.iterrows():
        line = []
        for c, f in cols:
            v = r[c]
            line.append("-" if not _is_set(v) or v is pd.NA else f.format(v))
        cells.append(line)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(s.rjust(w) for s, w in zip(row, widths, strict=True)) for row in cells)

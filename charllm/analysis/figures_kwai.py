"""Figures and tables of the Megatron-Kwai and PCIe-strategies studies, drawn from a campaign's cells.

- ``memory_alpha``: memory against the offload fraction alpha, one panel per (model, sequence,
  layout), one bar series per recompute mode (none / selective / kwai / full), cells that ran out
  of memory hatched at their alpha; a least-squares line per mode with its R^2 (Kwai's Figure 7:
  memory falls linearly with alpha). Memory is ``max_memory_allocated`` read after the second
  step (``max_memory_allocated_step2_bytes``; the end-of-run peak where a cell lacks it), GiB.
- ``throughput_alpha``: tokens/s per GPU the same way.
- ``kwai_table`` (CSV, Markdown and a drawn table): Kwai's table, one row per cell: method
  (recompute mode and alpha), tokens/s/GPU, MFU as Kwai counts it (``mfu_causal``) and ours
  (``mfu``), max memory after step 2, offloaded bytes per step, the speed-up over the ``full``
  cell without offload of the same model/sequence/layout, and which alpha is the smallest that
  fits in each mode. Drawn where a cell uses the kwai mode or alpha is swept.
- ``scaling_<model>``: per model, throughput, throughput efficiency and peak memory scaling
  factor per GPU count and strategy (:mod:`charllm.analysis.scaling`), OOM hatched.

The functions take the per-cell summary (:func:`charllm.analysis.figures.cell_summary`) and
return the paths they wrote; importing this module registers them with ``draw_all``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from charllm.analysis import figures as _fig

MODES = ("none", "selective", "kwai", "full")
GIB = float(1 << 30)
MEMORY_COLUMNS = ("max_memory_allocated_step2_bytes", "max_memory_allocated_bytes")
_GROUP = ("model", "seq_len", "layout")
_MODE_COLORS = {"none": "#4c72b0", "selective": "#dd8452", "kwai": "#55a868", "full": "#8172b3"}


def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _prepared(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with ``recompute_mode``, ``offload_alpha`` and the layout filled in where absent."""
    s = summary.copy()
    if "recompute_mode" not in s:
        rec = s["recompute"] if "recompute" in s else pd.Series(False, index=s.index)
        s["recompute_mode"] = ["full" if bool(v) and not pd.isna(v) else "none" for v in rec]
    s["recompute_mode"] = s["recompute_mode"].fillna("none").astype(str)
    s["offload_alpha"] = pd.to_numeric(s.get("offload_alpha", 0.0), errors="coerce").fillna(0.0)
    if "layout" not in s:
        s["layout"] = [_fig.layout_label(r) for r in s.to_dict("records")]
    for c in _GROUP:
        if c not in s:
            s[c] = None
    return s


def memory_column(summary: pd.DataFrame) -> str | None:
    """The memory column a memory figure shows: after the second step, else the end-of-run peak."""
    for c in MEMORY_COLUMNS:
        if c in summary and pd.to_numeric(summary[c], errors="coerce").notna().any():
            return c
    return None


def _alpha_groups(s: pd.DataFrame) -> list[tuple[Any, ...]]:
    """(model, seq_len, layout) groups whose cells sweep alpha (two alphas or more)."""
    out = []
    for key, g in s.groupby(list(_GROUP), dropna=False, sort=True):
        if g["offload_alpha"].nunique() > 1:
            out.append(key if isinstance(key, tuple) else (key,))
    return out


def has_alpha_sweep(summary: pd.DataFrame) -> bool:
    return not summary.empty and "offload_alpha" in summary and bool(_alpha_groups(_prepared(summary)))


def linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(slope, intercept, R^2) of the least-squares line through (x, y); NaN with fewer than 3 points."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0:
        return math.nan, math.nan, math.nan
    slope, intercept = np.polyfit(x, y, 1)
    ss_res = float(np.sum((y - (slope * x + intercept)) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return float(slope), float(intercept), r2


def _alpha_figure(
    summary: pd.DataFrame, out_dir: Path, title: str, stem: str, col: str, scale: float, ylabel: str, fit: bool
) -> list[Path]:
    s = _prepared(summary)
    groups = _alpha_groups(s)
    n = len(groups)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 3.6 * nrows + 0.5), squeeze=False)
    records: list[dict[str, Any]] = []
    for gi, key in enumerate(groups):
        ax = axes[gi // ncols][gi % ncols]
        mask = np.ones(len(s), bool)
        for c, v in zip(_GROUP, key, strict=True):
            mask &= (s[c].isna() if v is None or (isinstance(v, float) and np.isnan(v)) else s[c] == v).to_numpy()
        g = s[mask]
        modes = [m for m in MODES if (g["recompute_mode"] == m).any()]
        modes += sorted(set(g["recompute_mode"]) - set(MODES))
        alphas = np.sort(g["offload_alpha"].unique())
        step = float(np.min(np.diff(alphas))) if len(alphas) > 1 else 0.1
        width = 0.8 * step / max(len(modes), 1)
        pending: list[tuple[float, str]] = []
        for mi, mode in enumerate(modes):
            gm = g[g["recompute_mode"] == mode].sort_values("offload_alpha")
            color = _MODE_COLORS.get(mode, plt.get_cmap("tab10")(mi % 10))
            xs, ys = [], []
            first = len(records)
            for _, r in gm.iterrows():
                a = float(r["offload_alpha"])
                x = a + (mi - (len(modes) - 1) / 2) * width
                outcome = str(r.get("outcome"))
                val = _f(r.get(col)) * scale if outcome == "ok" else math.nan
                records.append(
                    {
                        "model": key[0],
                        "seq_len": key[1],
                        "layout": key[2],
                        "recompute_mode": mode,
                        "offload_alpha": a,
                        "value": val,
                        "outcome": outcome,
                        "cell_name": r.get("cell_name"),
                    }
                )
                if outcome != "ok":
                    pending.append((x, outcome))
                    continue
                ax.bar(x, val, width=width, color=color)
                xs.append(a)
                ys.append(val)
            label = mode
            if fit:
                slope, icept, r2 = linear_fit(np.array(xs, float), np.array(ys, float))
                for rec in records[first:]:
                    rec.update({"fit_slope_per_alpha": slope, "fit_intercept": icept, "fit_r2": r2})
                if not math.isnan(r2):
                    line_x = np.array([min(xs), max(xs)])
                    ax.plot(line_x, slope * line_x + icept, "--", color=color, linewidth=1.0)
                    label = f"{mode} (R² {r2:.3f})"
            ax.plot([], [], color=color, linewidth=6, label=label)
        ax.set_xlim(alphas.min() - 0.6 * step, alphas.max() + 0.6 * step)
        for x, outcome in pending:
            _fig._mark_outcome(ax, x, width, outcome)
        ax.set_xlabel("offload fraction alpha", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{key[0]} s={key[1]} {key[2]}", fontsize=9)
        ax.legend(fontsize=7, frameon=False, loc="upper right")
    for pi in range(n, nrows * ncols):
        axes[pi // ncols][pi % ncols].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return _fig._save(fig, out_dir, stem, pd.DataFrame(records))


def memory_alpha_figure(summary: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    """Memory against alpha per recompute mode (OOM hatched), with a linear fit and R^2 per mode."""
    col = memory_column(summary)
    if col is None:
        return []
    which = "after step 2" if col == "max_memory_allocated_step2_bytes" else "peak"
    return _alpha_figure(
        summary, out_dir, title, "memory_alpha", col, 1 / GIB, f"max memory allocated, {which} (GiB)", True
    )


def throughput_alpha_figure(summary: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    return _alpha_figure(
        summary, out_dir, title, "throughput_alpha", "tokens_per_s_per_gpu", 1.0, "throughput (tokens/s/GPU)", False
    )


# -- Kwai's table ---------------------------------------------------------------------------


def method_label(mode: str, alpha: float) -> str:
    return mode if not alpha else f"{mode}, alpha={alpha:.2f}"


def kwai_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: method, tokens/s/GPU, MFU (Kwai's and ours), memory, speed-up over ``full``."""
    s = _prepared(summary)
    mem = memory_column(s)
    rows = []
    for _, r in s.iterrows():
        ok = str(r.get("outcome")) == "ok"

        def num(c: str, scale: float = 1.0, ok: bool = ok, r: pd.Series = r) -> float:
            return _f(r.get(c)) * scale if ok and c in r else math.nan

        rows.append(
            {
                "model": r.get("model"),
                "seq_len": r.get("seq_len"),
                "layout": r.get("layout"),
                "method": method_label(str(r["recompute_mode"]), float(r["offload_alpha"])),
                "recompute_mode": r["recompute_mode"],
                "offload_alpha": float(r["offload_alpha"]),
                "outcome": str(r.get("outcome")),
                "tokens_per_s_per_gpu": num("tokens_per_s_per_gpu"),
                "mfu_causal_pct": num("mfu_causal", 100.0),
                "mfu_pct": num("mfu", 100.0),
                "max_memory_gib": num(mem, 1 / GIB) if mem else math.nan,
                "offload_gib_per_step": num("offload_bytes_per_step", 1 / GIB),
                "loss_last": num("loss_last"),
                "cell_name": r.get("cell_name"),
                **({"source": r.get("source")} if "source" in s else {}),
            }
        )
    t = pd.DataFrame(rows)
    if t.empty:
        return t
    order = {m: i for i, m in enumerate(MODES)}
    t["_o"] = t["recompute_mode"].map(lambda m: order.get(m, len(MODES)))
    t = t.sort_values(["model", "seq_len", "layout", "_o", "offload_alpha"], kind="stable").drop(columns="_o")
    t["speedup_vs_full"] = math.nan
    t["smallest_fitting_alpha"] = False
    for _, g in t.groupby(["model", "seq_len", "layout"], dropna=False, sort=False):
        full = g[(g["recompute_mode"] == "full") & (g["offload_alpha"] == 0) & (g["outcome"] == "ok")]
        if not full.empty:
            ref = float(full["tokens_per_s_per_gpu"].iloc[0])
            t.loc[g.index, "speedup_vs_full"] = g["tokens_per_s_per_gpu"] / ref
        for _, gm in g[g["outcome"] == "ok"].groupby("recompute_mode", sort=False):
            t.loc[gm["offload_alpha"].idxmin(), "smallest_fitting_alpha"] = True
    return t.reset_index(drop=True)


def _cell_text(v: Any, fmt: str) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else fmt.format(v)


_SHOWN = (
    ("method", "method", "{}"),
    ("layout", "layout", "{}"),
    ("tokens_per_s_per_gpu", "tokens/s/GPU", "{:,.0f}"),
    ("mfu_causal_pct", "MFU Kwai (%)", "{:.1f}"),
    ("mfu_pct", "MFU (%)", "{:.1f}"),
    ("max_memory_gib", "max mem (GiB)", "{:.1f}"),
    ("speedup_vs_full", "vs full", "{:.2f}x"),
)


def kwai_table_markdown(t: pd.DataFrame) -> str:
    head = ["model", "s", *(h for _, h, _ in _SHOWN)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in t.iterrows():
        cells = [str(r["model"]), str(r["seq_len"])]
        for c, _, fmt in _SHOWN:
            if c != "method" and r["outcome"] != "ok" and c not in ("layout",):
                cells.append(r["outcome"].upper() if c == "tokens_per_s_per_gpu" else "-")
            else:
                cells.append(_cell_text(r[c], fmt))
        if r["smallest_fitting_alpha"]:
            cells[2] = f"**{cells[2]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def kwai_table_figure(summary: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    """Kwai's table as CSV, Markdown and a drawn table (OOM rows hatched)."""
    t = kwai_table(summary)
    if t.empty:
        return []
    head = ["model", "s", *(h for _, h, _ in _SHOWN)]
    body, oom_rows = [], []
    for i, (_, r) in enumerate(t.iterrows()):
        row = [str(r["model"]), str(r["seq_len"])]
        for c, _, fmt in _SHOWN:
            if r["outcome"] != "ok" and c not in ("method", "layout"):
                row.append(r["outcome"].upper() if c == "tokens_per_s_per_gpu" else "-")
            else:
                row.append(_cell_text(r[c], fmt))
        body.append(row)
        if r["outcome"] != "ok":
            oom_rows.append(i + 1)
    fig, ax = plt.subplots(figsize=(10.5, 0.22 * (len(body) + 1) + 0.5))
    ax.axis("off")
    tab = ax.table(cellText=body, colLabels=head, loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(7.5)
    tab.auto_set_column_width(list(range(len(head))))
    for (ri, _ci), cell in tab.get_celld().items():
        if ri == 0:
            cell.set_text_props(fontweight="bold")
        elif ri in oom_rows:
            cell.set_hatch("///")
            cell.set_edgecolor("#c44e52")
        elif bool(t["smallest_fitting_alpha"].iloc[ri - 1]):
            cell.set_facecolor("#eaf4ea")
    ax.set_title(f"{title}\n(green: the smallest alpha that fits in its mode; MFU Kwai: attention halved)", fontsize=9)
    paths = _fig._save(fig, out_dir, "kwai_table", t)
    md = out_dir / "kwai_table.md"
    md.write_text(kwai_table_markdown(t))
    return [*paths, md]


# -- scaling per model ----------------------------------------------------------------------


def _safe(name: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)) or "model"


def scaling_models(cells: pd.DataFrame) -> list[str]:
    """Models with cells on two GPU counts or more, one of them an ok single-GPU cell (the baseline)."""
    if cells.empty or "world_size" not in cells or "model" not in cells:
        return []
    out = []
    for m, g in cells.groupby("model", sort=True):
        ws = pd.to_numeric(g["world_size"], errors="coerce")
        ok = g["outcome"] == "ok" if "outcome" in g else pd.Series(True, index=g.index)
        if ws.nunique() > 1 and ((ws == 1) & ok).any():
            out.append(str(m))
    return out


SCALING_PANELS = (
    ("throughput_tokens_sec", "throughput (tokens/s)"),
    ("throughput_efficiency_percent", "throughput efficiency (%)"),
    ("relative_runtime_overhead_percent", "runtime overhead vs 1 GPU (%)"),
    ("peak_memory_scaling_factor", "peak memory / 1 GPU's"),
)


def _count_label(axis: str, unit: str) -> Callable[[dict[str, Any]], str]:
    """``1 GPU``, ``2 GPUs`` (or ranks) for a group of the scaling figure."""
    return lambda d: f"{d[axis]} {unit}" + ("s" if d[axis] > 1 else "")


def scaling_figures(cells: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    """One figure per model: the scaling table's numbers per GPU count and strategy (OOM hatched)."""
    from charllm.analysis.scaling import scaling_table

    table = scaling_table(cells)
    # a CPU run's ranks are processes, not GPUs, and it has no device memory to scale
    unit = "rank" if "gpu_type" in cells and bool((cells["gpu_type"].astype(str) == "cpu").all()) else "GPU"
    paths: list[Path] = []
    for model in scaling_models(cells):
        t = table[table["model"] == model].copy()
        series = t["strategy"].astype(str)
        if t["interconnect"].nunique(dropna=True) > 1:
            series = series + " (" + t["interconnect"].astype(str) + ")"
        t["strategy"] = series
        axis = f"{unit}s"
        t[axis] = t["num_devices"].astype(int)
        panels = [(col, label.replace("GPU", unit)) for col, label in SCALING_PANELS if t[col].notna().any()]
        if not panels:  # nothing measured for this model (every cell failed or ran out of memory)
            continue
        paths += _fig.grouped_panels(
            t,
            [axis],
            "strategy",
            out_dir,
            f"scaling_{_safe(model)}",
            f"{title}: {model}, scaling against 1 {unit}",
            panels=panels,
            group_label=_count_label(axis, unit),
        )
    return paths


# -- registration with draw_all ---------------------------------------------------------------


def _register() -> None:
    _fig.register_figure(
        "memory_alpha",
        lambda d: has_alpha_sweep(d.summary) and memory_column(d.summary) is not None,
        lambda d: memory_alpha_figure(d.summary, d.out_dir, f"{d.campaign}: memory against offload fraction"),
    )
    _fig.register_figure(
        "throughput_alpha",
        lambda d: has_alpha_sweep(d.summary) and "tokens_per_s_per_gpu" in d.summary,
        lambda d: throughput_alpha_figure(d.summary, d.out_dir, f"{d.campaign}: throughput against offload fraction"),
    )
    _fig.register_figure(
        "kwai_table",
        lambda d: (
            not d.summary.empty
            and "recompute_mode" in d.summary
            and (bool((d.summary["recompute_mode"] == "kwai").any()) or has_alpha_sweep(d.summary))
        ),
        lambda d: kwai_table_figure(d.summary, d.out_dir, f"{d.campaign}: recompute and offload"),
    )
    _fig.register_figure(
        "scaling",
        lambda d: bool(scaling_models(d.cells)),
        lambda d: scaling_figures(d.cells, d.out_dir, d.campaign),
    )


_register()

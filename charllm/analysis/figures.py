"""Figures of a campaign, drawn from its tables (PNG and PDF, plus the plotted data as CSV).

Analogues of CharLLM-PPT's figures:

- ``fig4_parallelism``: avg/peak GPU temperature, power, avg SM clock and efficiency per
  parallel layout at code 01000;
- ``fig8_optimisations``: the same per layout across optimisation codes;
- ``fig13_microbatch``: the same across micro batch sizes, efficiency normalised to the
  smallest micro batch of each layout;
- ``heatmap_temperature`` / ``heatmap_links`` (Figs 5, 17): one column per GPU (``host:slot``),
  one row per cell: GPU and memory temperature avg/peak, NVLink and PCIe bytes;
- ``fig15_kernels``: kernel-time breakdown by category per profiled rank;
- ``pareto``: step time against energy per step for every ok cell, Pareto front highlighted;
- ``drift``: a metric per measurement night per cell (scheduled campaigns);
- ``throughput``, ``loss``.

Cells that ran out of memory (or failed) are drawn as hatched bars labelled with their
outcome, never left out. Each figure function returns the paths it wrote; every figure has
a ``<stem>.csv`` with exactly the numbers it shows.

Every cell keeps one colour in every figure of a run (:func:`cell_colors`), every axis names
its unit, legends sit outside the plotting area or under the title (never over it), and the
loss plot keeps every line visible: curves that coincide (e.g. a cell with and without
activation recompute, which computes the same numbers) get distinct line styles and
markers, and a note says which ones coincide. Cells without GPU telemetry (the CPU demo)
get panels of what they did measure (step time, throughput) instead of empty GPU panels.
``draw_all(note=...)`` labels every figure and the report (e.g. recorded GPU data).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from charllm.analysis.aggregate import layout_label, read_table
from charllm.definitions import as_float
from charllm.outcomes import Outcome

EFFICIENCY = "efficiency_samples_per_s_mj"
OPT_NAMES = {"00000": "base", "10000": "cc", "01000": "act", "11000": "cc+act"}
KERNEL_CATEGORIES = ("matmul", "attention", "all-reduce", "reduce-scatter", "all-gather", "send/recv", "other")

# (column, axis label) of the four PPT panels, avg and peak drawn side by side
PANELS: tuple[tuple[str, str], ...] = (
    ("avg_gpu_temp_c", "avg GPU temp (°C)"),
    ("peak_gpu_temp_c", "peak GPU temp (°C)"),
    ("avg_power_w", "avg power (W)"),
    ("peak_power_w", "peak power (W)"),
    ("avg_sm_clock_mhz", "avg SM clock (MHz)"),
    (EFFICIENCY, "efficiency (samples / (s·MJ))"),
)
# what a run without GPU telemetry measures (the CPU demo): drawn instead of empty GPU panels
CPU_PANELS: tuple[tuple[str, str], ...] = (
    ("step_time_median_s", "median step time (s)"),
    ("tokens_per_s", "throughput (tokens/s)"),
    ("tokens_per_s_per_gpu", "throughput per rank (tokens/s)"),
    ("node_avg_cpu_util_pct", "avg CPU utilisation (%)"),
    ("node_peak_mem_used_bytes", "peak memory used on the node (GB)"),
    ("loss_last", "loss after the last step (nats/token)"),
)
# columns shown in other units than stored (the plotted data has the shown numbers)
_SCALE = {"node_peak_mem_used_bytes": 1e-9, "max_memory_allocated_bytes": 1e-9}
# axis labels (with units) of the metrics a drift chart may show
METRIC_LABELS = {
    EFFICIENCY: "efficiency (samples / (s·MJ))",
    "tokens_per_s": "throughput (tokens/s)",
    "step_time_median_s": "median step time (s)",
}
_GROUP_NAMES = {"model": "model", "layout": "layout", "micro_batch": "micro batch", "opt_code": "optimisation code"}

_NOTE: contextvars.ContextVar[str | None] = contextvars.ContextVar("charllm_figure_note", default=None)


@contextlib.contextmanager
def figure_note(note: str | None) -> Iterator[None]:
    """Every figure saved inside carries ``note`` under it (e.g. where the data comes from)."""
    token = _NOTE.set(note)
    try:
        yield
    finally:
        _NOTE.reset(token)


def cell_colors(names: Sequence[Any]) -> dict[str, Any]:
    """One colour per cell name, the same in every figure drawn from the same set of cells."""
    uniq = sorted({str(n) for n in names})
    if len(uniq) <= 10:
        cmap, n = plt.get_cmap("tab10"), 10
    else:
        cmap, n = plt.get_cmap("tab20"), 20
    return {name: cmap(i % n) for i, name in enumerate(uniq)}


def _save(fig: plt.Figure, out_dir: Path, stem: str, data: pd.DataFrame | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    note = _NOTE.get()
    if note:  # under everything already drawn (axis labels, a figure's own notes)
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        renderer = FigureCanvasAgg(fig).get_renderer() if not hasattr(fig.canvas, "get_renderer") else None
        bb = fig.get_tightbbox(renderer or fig.canvas.get_renderer())  # type: ignore[attr-defined]
        w, h = fig.get_figwidth(), fig.get_figheight()
        fig.text(bb.x0 / w, (bb.y0 - 0.06) / h, note, ha="left", va="top", fontsize=7, color="0.3", style="italic")
    paths = []
    for ext in ("png", "pdf"):
        p = out_dir / f"{stem}.{ext}"
        fig.savefig(p, dpi=130, bbox_inches="tight")
        paths.append(p)
    plt.close(fig)
    if data is not None:
        p = out_dir / f"{stem}.csv"
        data.to_csv(p, index=False)
        paths.append(p)
    return paths


# -- one row per cell --------------------------------------------------------------------


_CONFIG_COLUMNS = frozenset(
    (
        "repeat",
        "attempt",
        "n_layers",
        "hidden",
        "tp",
        "pp",
        "dp",
        "cp",
        "ep",
        "micro_batch",
        "global_batch",
        "seq_len",
        "world_size",
        "nodes",
    )
)


def cell_summary(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: the mean of each numeric column over its ok repeats.

    ``outcome`` is ``ok`` if any repeat is ok, else the first repeat's outcome (e.g. ``oom``).
    """
    if cells.empty:
        return cells.copy()
    df = cells.copy()
    if "layout" not in df:
        df["layout"] = [layout_label(r) for r in df.to_dict("records")]
    rows = []
    for _cid, g in df.groupby("cell_id", sort=False):
        ok = g[g["outcome"] == Outcome.OK]
        base = (ok if not ok.empty else g).iloc[0].to_dict()
        if not ok.empty:
            for col in ok.columns:
                if col in _CONFIG_COLUMNS:
                    continue
                if pd.api.types.is_numeric_dtype(ok[col]) and not pd.api.types.is_bool_dtype(ok[col]):
                    base[col] = ok[col].mean()
            base["outcome"] = Outcome.OK
        base["repeats"] = len(g)
        rows.append(base)
    out = pd.DataFrame(rows)
    order = [c for c in ("model", "layout", "micro_batch", "opt_code") if c in out]
    return out.sort_values(order, kind="stable").reset_index(drop=True)


# -- grouped bar panels ------------------------------------------------------------------


def _mark_outcome(ax: plt.Axes, x: float, width: float, label: str) -> None:
    """A hatched bar over the lower 45 % of the panel at ``x``, labelled with the outcome (e.g. OOM)."""
    tr = ax.get_xaxis_transform()  # x in data, y in axes fraction: works on linear and log axes
    ax.add_patch(
        plt.Rectangle(
            (x - width / 2, 0.0),
            width,
            0.45,
            transform=tr,
            facecolor="none",
            edgecolor="#c44e52",
            hatch="///",
            linewidth=0.8,
        )
    )
    ax.text(
        x,
        0.225,
        label.upper(),
        transform=tr,
        ha="center",
        va="center",
        rotation=90,
        fontsize=7,
        color="#c44e52",
        fontweight="bold",
    )


def _measured(summary: pd.DataFrame, col: str) -> bool:
    """Whether any ok cell has a finite value of ``col``."""
    if col not in summary or summary.empty:
        return False
    ok = summary[summary["outcome"] == Outcome.OK] if "outcome" in summary else summary
    vals = pd.to_numeric(ok[col], errors="coerce").to_numpy(float)
    return bool(np.isfinite(vals).any())


def panels_for(summary: pd.DataFrame, panels: Sequence[tuple[str, str]] = PANELS) -> list[tuple[str, str]]:
    """The panels the cells measured: the GPU panels they have values for; without GPU telemetry
    (a CPU run) what a CPU run measures (step time, throughput, ...); never a panel of nothing."""
    have = [p for p in panels if _measured(summary, p[0])]
    if have:
        return have
    cpu = [p for p in CPU_PANELS if _measured(summary, p[0])]
    return cpu or [("tokens_per_s", "throughput (tokens/s)")]


def grouped_panels(
    summary: pd.DataFrame,
    group_cols: Sequence[str],
    series_col: str | None,
    out_dir: Path,
    stem: str,
    title: str,
    panels: Sequence[tuple[str, str]] | None = None,
    normalise: str | None = None,
    group_label: Callable[[dict[str, Any]], str] | None = None,
    colors: dict[str, Any] | None = None,
) -> list[Path]:
    """Bars per group (x) and series (side by side) for each panel metric; OOM cells hatched.

    ``panels``: (column, axis label); by default :func:`panels_for` the cells (the GPU panels,
    or what a CPU run measures). ``normalise``: a column divided by its value at the group's
    first series (e.g. efficiency normalised to the smallest micro batch); the panel is labelled
    accordingly. Without series, each bar has its cell's colour (``colors``: cell name -> colour).
    """
    s = summary.copy()
    panels = list(panels) if panels is not None else panels_for(s)
    groups = list(dict.fromkeys(tuple(r) for r in s[list(group_cols)].itertuples(index=False)))
    series = sorted(s[series_col].dropna().unique().tolist()) if series_col else [None]
    nser = len(series)
    width = 0.8 / max(nser, 1)
    series_colors = plt.get_cmap("tab10")
    if colors is None and "cell_name" in s:
        colors = cell_colors(s["cell_name"].tolist())
    records: list[dict[str, Any]] = []
    ncols = 3 if len(panels) > 4 else min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig_w = max(7.0, 0.55 * len(groups) * max(nser, 1) + 3) * max(ncols, 2) / 2
    legend = bool(series_col and nser > 1)
    head_in = 0.32 + (0.26 if legend else 0.0)  # room for the title (and the legend under it)
    fig_h = 3.1 * nrows + head_in
    fig, axes = plt.subplots(nrows, ncols, figsize=(fig_w, fig_h), squeeze=False)
    labels = []
    for gkey in groups:
        gd = dict(zip(group_cols, gkey, strict=True))
        labels.append(group_label(gd) if group_label else "\n".join(str(v) for v in gkey))
    for pi, (col, ylabel) in enumerate(panels):
        ax = axes[pi // ncols][pi % ncols]
        pending: list[tuple[float, str]] = []
        for gi, gkey in enumerate(groups):
            mask = np.ones(len(s), bool)
            for c, v in zip(group_cols, gkey, strict=True):
                mask &= (s[c] == v).to_numpy()
            g = s[mask]
            ref = math.nan
            for si, ser in enumerate(series):
                x = gi + (si - (nser - 1) / 2) * width
                row = g if ser is None else g[g[series_col] == ser]
                if row.empty:
                    continue
                r = row.iloc[0]
                outcome = str(r.get("outcome"))
                val = as_float(r.get(col)) * _SCALE.get(col, 1.0) if outcome == Outcome.OK else math.nan
                if normalise and col == normalise and outcome == Outcome.OK:
                    if math.isnan(ref):
                        ref = val
                    val = val / ref if ref else math.nan
                rec = {
                    "group": labels[gi],
                    "series": ser,
                    "metric": col,
                    "value": val,
                    "outcome": outcome,
                    "cell_name": r.get("cell_name"),
                }
                records.append(rec)
                if outcome != Outcome.OK:
                    pending.append((x, outcome))
                    continue
                if ser is None and colors is not None:
                    color = colors.get(str(r.get("cell_name")), series_colors(0))
                else:
                    color = series_colors(si % 10)
                ax.bar(x, val, width=width, color=color)
        ax.set_xticks(range(len(groups)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(groups) - 0.4)  # the hatched outcome bars do not take part in autoscaling
        norm = normalise and col == normalise
        if norm:  # a ratio: no unit
            first = series[0] if series_col else ""
            ylabel = f"{ylabel.split(' (')[0]}, ratio to {_GROUP_NAMES.get(series_col or '', series_col)} {first}"
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        if pi // ncols == nrows - 1 or pi + ncols >= len(panels):
            ax.set_xlabel(" / ".join(_GROUP_NAMES.get(c, c) for c in group_cols), fontsize=8)
        if col.endswith("temp_c") or col.endswith("clock_mhz") or col.endswith("power_w"):
            vals = [r["value"] for r in records if r["metric"] == col and not math.isnan(r["value"])]
            if vals:
                ax.set_ylim(0, max(vals) * 1.15)
        if col == EFFICIENCY and not norm:
            vals = [r["value"] for r in records if r["metric"] == col and r["value"] > 0]
            if vals and max(vals) / min(vals) > 50:
                ax.set_yscale("log")
        for x, outcome in pending:
            _mark_outcome(ax, x, width, outcome)
    for pi in range(len(panels), nrows * ncols):
        axes[pi // ncols][pi % ncols].axis("off")
    top = 1.0 - head_in / fig_h
    fig.suptitle(title, y=1.0 - 0.08 / fig_h, va="top")
    if legend:
        handles = [plt.Rectangle((0, 0), 1, 1, color=series_colors(i % 10)) for i in range(nser)]
        names = [OPT_NAMES.get(str(x), str(x)) if series_col == "opt_code" else f"{series_col}={x}" for x in series]
        if series_col == "opt_code":
            names = [f"{x} ({OPT_NAMES[str(x)]})" if str(x) in OPT_NAMES else str(x) for x in series]
        fig.legend(
            handles,
            names,
            loc="upper center",
            bbox_to_anchor=(0.5, 1.0 - 0.3 / fig_h),
            fontsize=8,
            ncol=min(nser, 6),
            frameon=False,
        )
    fig.tight_layout(rect=(0, 0, 1, top))
    return _save(fig, out_dir, stem, pd.DataFrame(records))


def _model_layout_label(d: dict[str, Any]) -> str:
    return f"{d.get('model')}\n{d.get('layout')}" + (f" mb{d['micro_batch']}" if "micro_batch" in d else "")


def fig4_parallelism(
    summary: pd.DataFrame, out_dir: Path, title: str, code: str = "01000", colors: dict[str, Any] | None = None
) -> list[Path]:
    """Fig 4: one bar per (model, layout, micro batch) at optimisation code ``code``, in the cell's colour."""
    s = summary[summary["opt_code"] == code]
    return grouped_panels(
        s,
        ["model", "layout", "micro_batch"],
        None,
        out_dir,
        "fig4_parallelism",
        f"{title} (code {code})",
        group_label=_model_layout_label,
        colors=colors,
    )


def fig8_optimisations(summary: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    """Fig 8: per (model, layout, micro batch) the optimisation codes side by side."""
    s = _groups_with_variety(summary, ["model", "layout", "micro_batch"], "opt_code")
    return grouped_panels(
        s,
        ["model", "layout", "micro_batch"],
        "opt_code",
        out_dir,
        "fig8_optimisations",
        title,
        group_label=_model_layout_label,
    )


def fig13_microbatch(summary: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    """Fig 13: per (model, layout, code) the micro batch sizes; efficiency normalised to the smallest."""
    s = _groups_with_variety(summary, ["model", "layout", "opt_code"], "micro_batch")
    return grouped_panels(
        s,
        ["model", "layout", "opt_code"],
        "micro_batch",
        out_dir,
        "fig13_microbatch",
        title,
        normalise=EFFICIENCY,
        group_label=lambda d: f"{d['model']}\n{d['layout']} {d['opt_code']}",
    )


def _groups_with_variety(summary: pd.DataFrame, group_cols: list[str], series_col: str) -> pd.DataFrame:
    if summary.empty:
        return summary
    n = summary.groupby(group_cols, dropna=False)[series_col].transform("nunique")
    return summary[n > 1]


# -- per-GPU heatmaps --------------------------------------------------------------------


def gpu_label(host: Any, slot: Any) -> str:
    return f"{host}:{int(slot)}" if slot is not None and not pd.isna(slot) else f"{host}:?"


def _gpu_sort_key(label: str) -> tuple[str, int]:
    host, _, slot = label.rpartition(":")
    return host, int(slot) if slot.isdigit() else -1


def gpu_matrix(
    gpus: pd.DataFrame, cells: pd.DataFrame, value: Callable[[pd.DataFrame], pd.Series] | str
) -> pd.DataFrame:
    """Rows: cells (in ``cells`` order, named by cell_name); columns: GPUs ``host:slot``; mean over repeats."""
    names = dict(zip(cells["cell_id"], cells["cell_name"], strict=False))
    g = gpus[gpus["cell_id"].isin(names)].copy()
    g["gpu"] = [gpu_label(h, s) for h, s in zip(g["host"], g["gpu_index"], strict=True)]
    g["v"] = value(g) if callable(value) else g[value]
    m = g.groupby(["cell_id", "gpu"])["v"].mean().unstack("gpu")
    cols = sorted(set(g["gpu"]), key=_gpu_sort_key)
    order = [c for c in cells["cell_id"] if c in names]
    m = m.reindex(index=order, columns=cols)
    m.index = [names[c] for c in m.index]
    return m


def heatmaps(gpus: pd.DataFrame, summary: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    """Figs 5/17: per-GPU temperature and link-traffic heatmaps, one row per cell (all codes;
    the paper shows code 00000, which is the first block of rows here)."""
    rows = summary.sort_values(["opt_code", "model", "layout", "micro_batch"], kind="stable")
    paths = _heatmap_figure(
        gpus,
        rows,
        out_dir,
        "heatmap_temperature",
        title,
        [
            ("avg_gpu_temp_c", "avg GPU temp (°C)"),
            ("peak_gpu_temp_c", "peak GPU temp (°C)"),
            ("avg_mem_temp_c", "avg memory temp (°C)"),
            ("peak_mem_temp_c", "peak memory temp (°C)"),
        ],
    )
    paths += _heatmap_figure(
        gpus,
        rows,
        out_dir,
        "heatmap_links",
        title,
        [("nvlink_gb", "NVLink tx+rx (GB)"), ("pcie_gb", "PCIe tx+rx (GB)")],
    )
    return paths


def _derived(g: pd.DataFrame, metric: str) -> pd.Series:
    if metric == "nvlink_gb":
        return (g["nvlink_tx_bytes"] + g["nvlink_rx_bytes"]) / 1e9
    if metric == "pcie_gb":
        return (g["pcie_tx_bytes"] + g["pcie_rx_bytes"]) / 1e9
    return g[metric]


def _heatmap_figure(
    gpus: pd.DataFrame, rows: pd.DataFrame, out_dir: Path, stem: str, title: str, panels: Sequence[tuple[str, str]]
) -> list[Path]:
    mats = [gpu_matrix(gpus, rows, functools.partial(_derived, metric=m)) for m, _ in panels]
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    ncell, ngpu = mats[0].shape
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(max(5.0, 0.5 * ngpu + 3) * ncols, max(2.5, 0.4 * ncell + 1.8) * nrows), squeeze=False
    )
    outcome = dict(zip(rows["cell_name"], rows["outcome"], strict=False))
    records = []
    for pi, ((metric, label), m) in enumerate(zip(panels, mats, strict=True)):
        ax = axes[pi // ncols][pi % ncols]
        data = np.ma.masked_invalid(m.to_numpy(float))
        cmap = plt.get_cmap("inferno").with_extremes(bad="#dddddd")
        im = ax.imshow(data, aspect="auto", cmap=cmap)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label(label, fontsize=8)
        ax.set_xticks(range(ngpu), list(m.columns), rotation=90, fontsize=7)
        ax.set_yticks(range(ncell), list(m.index), fontsize=7)
        ax.set_xlabel("GPU (host:slot)", fontsize=8)
        ax.set_ylabel("cell", fontsize=8)
        ax.set_title(label, fontsize=9)
        for ri, name in enumerate(m.index):
            oc = outcome.get(name, Outcome.OK)
            if oc != Outcome.OK:
                ax.add_patch(
                    plt.Rectangle(
                        (-0.5, ri - 0.5), max(ngpu, 1), 1, fill=False, hatch="///", edgecolor="#c44e52", linewidth=0
                    )
                )
                ax.text(
                    (ngpu - 1) / 2,
                    ri,
                    oc.upper(),
                    ha="center",
                    va="center",
                    color="#c44e52",
                    fontsize=8,
                    fontweight="bold",
                )
            for ci, gpu in enumerate(m.columns):
                v = m.iat[ri, ci]
                records.append({"cell_name": name, "gpu": gpu, "metric": metric, "value": v, "outcome": oc})
                if ncell * ngpu <= 400 and not pd.isna(v):
                    ax.text(
                        ci,
                        ri,
                        f"{v:.0f}" if abs(v) >= 10 else f"{v:.2g}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="w" if data[ri, ci] < np.nanmean(m.to_numpy(float)) else "k",
                    )
    for pi in range(len(panels), nrows * ncols):
        axes[pi // ncols][pi % ncols].axis("off")
    fig.suptitle(f"{title}: per GPU (host:slot)", y=1.0, va="bottom")
    fig.tight_layout()
    return _save(fig, out_dir, stem, pd.DataFrame(records))


# -- kernels, Pareto, drift, throughput, loss -------------------------------------------


def fig15_kernels(kernels: pd.DataFrame, summary: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    """Fig 15: stacked kernel-time fractions by category, one bar per profiled (cell, rank)."""
    names = dict(zip(summary["cell_id"], summary["cell_name"], strict=False))
    k = kernels[kernels["cell_id"].isin(names)]
    k = k.groupby(["cell_id", "rank", "category"], as_index=False)["time_s"].mean()
    pos = {c: i for i, c in enumerate(summary["cell_id"])}
    bars = sorted(dict.fromkeys(zip(k["cell_id"], k["rank"], strict=True)), key=lambda b: (pos[b[0]], b[1]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(bars) + 3), 4.2))
    bottom = np.zeros(len(bars))
    records = []
    cmap = plt.get_cmap("tab10")
    totals = np.array([k[(k["cell_id"] == c) & (k["rank"] == r)]["time_s"].sum() for c, r in bars])
    for ci, cat in enumerate(KERNEL_CATEGORIES):
        vals = np.array(
            [k[(k["cell_id"] == c) & (k["rank"] == r) & (k["category"] == cat)]["time_s"].sum() for c, r in bars]
        )
        frac = np.divide(vals, totals, out=np.zeros_like(vals), where=totals > 0)
        ax.bar(range(len(bars)), frac, bottom=bottom, color=cmap(ci), label=cat)
        bottom += frac
        for (c, r), f, v in zip(bars, frac, vals, strict=True):
            records.append({"cell_name": names[c], "rank": int(r), "category": cat, "time_s": v, "fraction": f})
    ax.set_xticks(range(len(bars)), [f"{names[c]}\nrank {r}" for c, r in bars], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("fraction of GPU kernel time (0-1)")
    ax.set_xlabel("cell and profiled rank")
    ax.set_ylim(0, 1.0)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="kernel category", title_fontsize=7)
    ax.set_title(title)
    return _save(fig, out_dir, "fig15_kernels", pd.DataFrame(records))


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask of the points no other point beats in both x and y (both minimised)."""
    n = len(x)
    front = np.ones(n, bool)
    for i in range(n):
        better = (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        front[i] = not better.any()
    return front


def _energy_column(summary: pd.DataFrame) -> str:
    for col in ("energy_per_step_sampled_j", "energy_per_step_j"):
        if col in summary and np.isfinite(summary[col].astype(float)).any():
            return col
    return ""


def pareto_figure(summary: pd.DataFrame, out_dir: Path, title: str, colors: dict[str, Any] | None = None) -> list[Path]:
    """Step time vs energy per step of every ok cell, one Pareto front per workload.

    A workload is (model, global batch, sequence length): only cells doing the same work per
    step are comparable, so each gets its own front (a line through its cells, one line style
    per workload); each point has its cell's colour; OOM and failed cells are listed under
    the plot.
    """
    ecol = _energy_column(summary)
    colors = colors or cell_colors(summary["cell_name"].tolist())
    ok = summary[(summary["outcome"] == Outcome.OK)].copy()
    ok = ok[np.isfinite(ok["step_time_median_s"].astype(float)) & np.isfinite(ok[ecol].astype(float))]
    ok["workload"] = [
        f"{m} gb{int(g)} s{int(q)}" for m, g, q in zip(ok["model"], ok["global_batch"], ok["seq_len"], strict=True)
    ]
    fig, ax = plt.subplots(figsize=(8.4, 4.8))
    styles = ["-", "--", ":", "-."]
    parts = []
    several = ok["workload"].nunique() > 1
    for wi, (wl, g) in enumerate(ok.groupby("workload", sort=True)):
        x = g["step_time_median_s"].to_numpy(float)
        y = g[ecol].to_numpy(float) / 1e3
        front = pareto_front(x, y)
        order = np.argsort(x[front])
        ax.plot(
            x[front][order],
            y[front][order],
            styles[wi % len(styles)],
            color="0.25",
            linewidth=1.2,
            label=f"front: {wl}",
            zorder=1,
        )
        for xi, yi, on, r in zip(x, y, front, g.to_dict("records"), strict=True):
            ax.scatter(
                [xi],
                [yi],
                color=colors.get(str(r["cell_name"]), "0.5"),
                s=46 if on else 26,
                edgecolor="k" if on else "none",
                linewidth=0.6,
                zorder=2,
            )
            ax.annotate(
                (f"{r['model']} " if several else "") + f"{r['layout']} {r['opt_code']} mb{int(r['micro_batch'])}",
                (xi, yi),
                fontsize=6,
                xytext=(4, 3),
                textcoords="offset points",
            )
        parts.append(
            pd.DataFrame(
                {
                    "cell_name": g["cell_name"],
                    "workload": wl,
                    "step_time_s": x,
                    "energy_per_step_j": y * 1e3,
                    "on_front": front,
                    "outcome": Outcome.OK,
                }
            )
        )
    bad = summary[summary["outcome"] != Outcome.OK]
    if not bad.empty:
        txt = "not drawn: " + "; ".join(
            f"{n} ({o.upper()})" for n, o in zip(bad["cell_name"], bad["outcome"], strict=True)
        )
        fig.text(0.01, -0.02, txt, ha="left", va="top", fontsize=6, color="#c44e52", wrap=True)
        parts.append(pd.DataFrame({"cell_name": bad["cell_name"], "outcome": bad["outcome"]}))
    ax.set_xlabel("median step time (s)")
    ax.set_ylabel("energy per step, all GPUs (kJ)")
    ax.grid(alpha=0.3)
    if parts:
        ax.legend(
            fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="outlined: on the front", title_fontsize=7
        )
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out_dir, "pareto", pd.concat(parts, ignore_index=True) if parts else pd.DataFrame())


def drift_figure(
    cells: pd.DataFrame, out_dir: Path, title: str, metric: str = EFFICIENCY, colors: dict[str, Any] | None = None
) -> list[Path]:
    """A metric per measurement of each cell over time: the nightly repeats, one line per cell.

    One point per ok cell repeat at its ``measured_at`` (UTC); the data's ``night`` column is
    the UTC date. Falls back to tokens/s (then step time) where the cells carry no ``metric``.
    """
    for m in (metric, "tokens_per_s", "step_time_median_s"):  # CPU runs have no efficiency
        if m in cells and cells[m].notna().any():
            metric = m
            break
    else:
        return []
    colors = colors or cell_colors(cells["cell_name"].tolist())
    ok = cells[(cells["outcome"] == Outcome.OK) & cells["measured_at"].notna()].copy()
    ok["at"] = pd.to_datetime(ok["measured_at"], utc=True)
    ok["night"] = ok["at"].dt.normalize()
    ok["value"] = ok[metric].astype(float)
    data = ok.sort_values(["cell_name", "at"])[["cell_name", "repeat", "at", "night", "value"]]
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    for i, (name, g) in enumerate(data.groupby("cell_name", sort=True)):
        ax.plot(
            g["at"].dt.tz_convert(None),
            g["value"],
            "-",
            marker=markers[i % len(markers)],
            color=colors.get(str(name), "0.5"),
            label=f"{name} ({len(g)})",
        )
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_xlabel("measured at (UTC)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="cell (repeats)", title_fontsize=7)
    fig.autofmt_xdate()
    ax.set_title(title)
    fig.tight_layout()
    data = data.assign(
        night=data["night"].dt.strftime("%Y-%m-%d"),
        measured_at=data["at"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
        metric=metric,
    ).drop(columns=["at"])
    return _save(fig, out_dir, "drift", data)


def throughput_figure(
    cells: pd.DataFrame, out_dir: Path, title: str, colors: dict[str, Any] | None = None
) -> list[Path]:
    """Tokens/s per cell (mean over repeats, min-max bars) in the cell's colour; OOM and failed cells hatched."""
    names = sorted(cells["cell_name"].unique()) if not cells.empty else []
    colors = colors or cell_colors(names)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * max(1, len(names))), 4.4))
    pending = []
    records = []
    for i, name in enumerate(names):
        sub = cells[cells["cell_name"] == name]
        ok = sub[sub["outcome"] == Outcome.OK]
        if not ok.empty and "tokens_per_s" in ok:
            v = ok["tokens_per_s"]
            ax.bar(i, v.mean(), color=colors.get(str(name), "#4c72b0"))
            ax.errorbar(i, v.mean(), yerr=[[v.mean() - v.min()], [v.max() - v.mean()]], color="k", capsize=3)
            records.append({"cell_name": name, "tokens_per_s": v.mean(), "repeats": len(v), "outcome": Outcome.OK})
        else:
            pending.append((i, str(sub["outcome"].iloc[0])))
            records.append(
                {"cell_name": name, "tokens_per_s": math.nan, "repeats": 0, "outcome": str(sub["outcome"].iloc[0])}
            )
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("throughput (tokens/s, all ranks)")
    ax.set_xlabel("cell (bar: mean over ok repeats; whisker: min to max)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if pending and not any(r["outcome"] == Outcome.OK for r in records):
        ax.set_ylim(0, 1)
    ax.set_xlim(-0.6, len(names) - 0.4)
    for i, oc in pending:
        _mark_outcome(ax, i, 0.8, oc)
    fig.tight_layout()
    return _save(fig, out_dir, "throughput", pd.DataFrame(records))


def _same_curve(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    if len(a) != len(b) or a.empty:
        return False
    return bool(
        np.array_equal(a["step"].to_numpy(), b["step"].to_numpy())
        and np.allclose(a["loss"].to_numpy(float), b["loss"].to_numpy(float), rtol=1e-4, atol=1e-6, equal_nan=True)
    )


def loss_figure(
    steps: pd.DataFrame, cells: pd.DataFrame, out_dir: Path, title: str, colors: dict[str, Any] | None = None
) -> list[Path]:
    """Training loss by step for every ok cell and repeat, every line visible.

    Each cell has its colour and marker; curves that coincide with an earlier one (e.g. the
    same cell with and without activation recompute: the same arithmetic) are drawn dashed or
    dotted with their markers offset, and a note under the plot names them.
    """
    names = dict(zip(cells["cell_id"], cells["cell_name"], strict=False)) if not cells.empty else {}
    colors = colors or cell_colors(list(names.values()))
    fig, ax = plt.subplots(figsize=(8.4, 4.4))
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    styles = ["-", "--", ":", "-."]
    marker_of = {n: markers[i % len(markers)] for i, n in enumerate(sorted(set(names.values())))}
    drawn: list[tuple[str, pd.DataFrame, int]] = []  # label, curve, index of its group of identical curves
    groups: list[list[str]] = []
    if not steps.empty:
        for (cid, rep), g in steps.groupby(["cell_id", "repeat"], sort=True):
            g = g.sort_values("step")
            name = str(names.get(cid, cid))
            label = f"{name} r{rep}"
            gi = next((d[2] for d in drawn if _same_curve(d[1], g)), None)
            if gi is None:
                gi = len(groups)
                groups.append([])
            k = len(groups[gi])  # how many identical curves are already drawn under this one
            groups[gi].append(label)
            drawn.append((label, g, gi))
            n = len(g)
            every = max(1, n // 8)
            ax.plot(
                g["step"],
                g["loss"],
                linestyle=styles[k % len(styles)],
                linewidth=1.6 if k == 0 else 1.3,
                marker=marker_of.get(name, "o"),
                markersize=5,
                markevery=(min(k, every - 1) if every > 1 else 0, every),
                markerfacecolor="none" if k else colors.get(name, "0.5"),
                color=colors.get(name, "0.5"),
                label=label + (" (= " + groups[gi][0] + ")" if k else ""),
            )
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="cell, repeat", title_fontsize=7)
    same = [g for g in groups if len(g) > 1]
    if same:
        txt = "identical curves, drawn dashed/dotted over each other: " + "; ".join(" = ".join(g) for g in same)
        fig.text(0.01, -0.01, txt, ha="left", va="top", fontsize=6.5, color="0.25", wrap=True)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (cross-entropy, nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    data = steps[[c for c in ("cell_id", "repeat", "step", "phase", "loss") if c in steps]] if not steps.empty else None
    if data is not None:
        data = data.assign(cell_name=data["cell_id"].map(names))
    return _save(fig, out_dir, "loss", data)


# -- everything the data supports ---------------------------------------------------------


def _tables_from(tables_dir: Path | None, cells: pd.DataFrame) -> Path | None:
    if tables_dir is not None:
        return Path(tables_dir)
    hint = cells.attrs.get("tables_dir") if hasattr(cells, "attrs") else None
    return Path(hint) if hint else None


def _read(tables_dir: Path | None, name: str) -> pd.DataFrame:
    if tables_dir is None:
        return pd.DataFrame()
    p = tables_dir / f"{name}.parquet"
    return read_table(p) if p.is_file() else pd.DataFrame()


def _nights(cells: pd.DataFrame) -> int:
    if "measured_at" not in cells or cells.empty:
        return 0
    t = pd.to_datetime(cells["measured_at"], utc=True, errors="coerce").dropna()
    return int(t.dt.normalize().nunique())


def draw_all(
    cells: pd.DataFrame,
    steps: pd.DataFrame,
    out_dir: Path,
    campaign: str,
    *,
    gpus: pd.DataFrame | None = None,
    kernels: pd.DataFrame | None = None,
    tables_dir: Path | None = None,
    references: Sequence[Any] | None = None,
    schedule: str | None = None,
    report: bool = True,
    note: str | None = None,
) -> list[Path]:
    """Every figure the campaign's data supports, and ``report.md``; returns all paths.

    The per-GPU and kernel tables come from ``gpus``/``kernels``, else from ``tables_dir``
    (by default the directory ``aggregate`` wrote ``cells`` to). ``references`` and
    ``schedule`` default to the campaign file's (looked up by name in the campaigns folder).
    ``note`` is printed under every figure and at the top of the report (where the data comes
    from); cells without GPU telemetry get a note saying so.
    """
    out_dir = Path(out_dir)
    tdir = _tables_from(tables_dir, cells)
    if gpus is None:
        gpus = _read(tdir, "gpus")
    if kernels is None:
        kernels = _read(tdir, "kernels")
    if references is None or schedule is None:
        from charllm.analysis.reference import campaign_settings

        refs, sched = campaign_settings(campaign)
        references = refs if references is None else references
        schedule = sched if schedule is None else schedule
    summary = cell_summary(cells)
    if note is None and not summary.empty and not any(_measured(summary, c) for c, _ in PANELS):
        note = (
            "CPU run: no GPU telemetry, so no temperature, power, clock or energy; "
            "the panels show what it measured (step time, throughput, memory, loss)"
        )
    colors = cell_colors(cells["cell_name"].tolist()) if "cell_name" in cells else {}
    with figure_note(note):
        paths = _draw(cells, steps, out_dir, campaign, summary, gpus, kernels, schedule, colors)
    if report:
        from charllm.analysis.reference import check_references, write_report

        checks = check_references(references or [], cells)
        rp = write_report(out_dir, campaign, cells, checks, paths, gpus=gpus)
        if note:
            lines = rp.read_text().splitlines()
            rp.write_text("\n".join([*lines[:1], "", f"_{note}_", *lines[1:]]) + "\n")
        paths.append(rp)
    return paths


# -- the figure registry -------------------------------------------------------------------


@dataclass(frozen=True)
class FigureData:
    """Everything one :func:`draw_all` call has to draw from (what a figure's functions receive)."""

    campaign: str
    out_dir: Path
    cells: pd.DataFrame
    steps: pd.DataFrame
    summary: pd.DataFrame  # :func:`cell_summary` of ``cells``, GPU panel columns present (NaN where unmeasured)
    gpus: pd.DataFrame
    kernels: pd.DataFrame
    schedule: str | None
    colors: dict[str, Any]


@dataclass(frozen=True)
class Figure:
    """A figure :func:`draw_all` draws where ``applies_to`` says the data supports it."""

    stem: str  # the file stem (a figure may write several, e.g. ``heatmaps``: two)
    applies_to: Callable[[FigureData], bool]
    draw: Callable[[FigureData], list[Path]]  # writes under ``out_dir`` (it exists), returns the paths


#: stem -> figure, drawn in this order
FIGURES: dict[str, Figure] = {}


def register_figure(
    stem: str, applies_to: Callable[[FigureData], bool], draw: Callable[[FigureData], list[Path]]
) -> Figure:
    """Add (or replace) a figure of every campaign's run; returns it."""
    fig = FIGURES[stem] = Figure(stem, applies_to, draw)
    return fig


def _has_summary(d: FigureData) -> bool:
    return not d.summary.empty


def _varies(group_cols: list[str], series_col: str) -> Callable[[FigureData], bool]:
    return lambda d: _has_summary(d) and not _groups_with_variety(d.summary, group_cols, series_col).empty


register_figure(
    "throughput",
    lambda d: True,
    lambda d: throughput_figure(d.cells, d.out_dir, f"{d.campaign}: throughput per cell", colors=d.colors),
)
register_figure(
    "loss",
    lambda d: True,
    lambda d: loss_figure(d.steps, d.cells, d.out_dir, f"{d.campaign}: training loss", colors=d.colors),
)
register_figure(
    "fig4_parallelism",
    lambda d: _has_summary(d) and "opt_code" in d.summary and bool((d.summary["opt_code"] == "01000").any()),
    lambda d: fig4_parallelism(d.summary, d.out_dir, f"{d.campaign}: per parallel layout", colors=d.colors),
)
register_figure(
    "fig8_optimisations",
    _varies(["model", "layout", "micro_batch"], "opt_code"),
    lambda d: fig8_optimisations(d.summary, d.out_dir, f"{d.campaign}: per optimisation code"),
)
register_figure(
    "fig13_microbatch",
    _varies(["model", "layout", "opt_code"], "micro_batch"),
    lambda d: fig13_microbatch(d.summary, d.out_dir, f"{d.campaign}: per micro batch"),
)
register_figure(
    "heatmaps",
    lambda d: _has_summary(d) and not d.gpus.empty,
    lambda d: heatmaps(d.gpus, d.summary, d.out_dir, d.campaign),
)
register_figure(
    "fig15_kernels",
    lambda d: _has_summary(d) and not d.kernels.empty,
    lambda d: fig15_kernels(d.kernels, d.summary, d.out_dir, f"{d.campaign}: kernel time by category"),
)
register_figure(
    "pareto",  # CPU cells have no energy
    lambda d: _has_summary(d) and bool((d.summary["outcome"] == Outcome.OK).any()) and bool(_energy_column(d.summary)),
    lambda d: pareto_figure(d.summary, d.out_dir, f"{d.campaign}: time / energy per step", colors=d.colors),
)
register_figure(
    "drift",
    lambda d: _has_summary(d) and (bool(d.schedule) or _nights(d.cells) > 1),
    lambda d: drift_figure(d.cells, d.out_dir, f"{d.campaign}: nightly drift", colors=d.colors),
)
# Modules whose import registers more figures, loaded by name when draw_all first runs (they
# import this module, so this one names them instead of importing them: no import cycle).
# figures_kwai: memory_alpha, throughput_alpha, kwai_table, scaling_<model>.
FIGURE_MODULES: tuple[str, ...] = ("charllm.analysis.figures_kwai",)


def load_figure_modules() -> dict[str, Figure]:
    """Import :data:`FIGURE_MODULES` (once); every registered figure, in drawing order."""
    for module in FIGURE_MODULES:
        importlib.import_module(module)
    return FIGURES


def _draw(
    cells: pd.DataFrame,
    steps: pd.DataFrame,
    out_dir: Path,
    campaign: str,
    summary: pd.DataFrame,
    gpus: pd.DataFrame | None,
    kernels: pd.DataFrame | None,
    schedule: str | None,
    colors: dict[str, Any],
) -> list[Path]:
    if not summary.empty:
        for col in (
            EFFICIENCY,
            "avg_gpu_temp_c",
            "peak_gpu_temp_c",
            "avg_power_w",
            "peak_power_w",
            "avg_sm_clock_mhz",
            "step_time_median_s",
        ):
            if col not in summary:
                summary[col] = math.nan
    data = FigureData(
        campaign,
        out_dir,
        cells,
        steps,
        summary,
        gpus if gpus is not None else pd.DataFrame(),
        kernels if kernels is not None else pd.DataFrame(),
        schedule,
        colors,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for fig in list(load_figure_modules().values()):
        if fig.applies_to(data):
            paths += fig.draw(data)
    return paths

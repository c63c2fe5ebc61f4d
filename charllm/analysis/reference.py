"""Reference bands (ReFrame-style ``value, lower, upper, unit``) checked against a cells table,
and the per-run Markdown report written beside the figures.

A campaign's ``references`` are :class:`charllm.campaign.ReferenceBand` entries: a metric
(a column of ``cells.parquet``), the expected value, absolute lower and upper bounds, a unit
and a glob over cell names. Every ok cell repeat the glob matches is checked; a metric the
cell does not have is a violation too (a band that silently checks nothing is no check).
:func:`violations` returns the failed checks so that a task can fail or warn on them.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from charllm.definitions import METRIC_ALIASES
from charllm.outcomes import Outcome


@dataclass(frozen=True)
class Check:
    """One band checked on one cell repeat."""

    cell_name: str
    cell_id: str
    repeat: int
    metric: str
    measured: float
    value: float
    lower: float
    upper: float
    unit: str
    ok: bool
    status: str  # pass | fail | missing | no-cells

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _band(b: Any) -> dict[str, Any]:
    def get(k: str, default: Any = None) -> Any:
        return b.get(k, default) if isinstance(b, dict) else getattr(b, k, default)

    return {
        "metric": str(get("metric")),
        "value": float(get("value")),
        "lower": float(get("lower")),
        "upper": float(get("upper")),
        "unit": str(get("unit", "") or ""),
        "cells": str(get("cells", "*") or "*"),
    }


def check_references(references: Iterable[Any], cells: pd.DataFrame) -> list[Check]:
    """Checks of every band on every ok cell repeat its glob matches (OOM and failed cells are skipped)."""
    checks: list[Check] = []
    ok = cells[cells["outcome"] == Outcome.OK] if not cells.empty else cells
    for ref in references:
        b = _band(ref)
        hit = ok[[fnmatch.fnmatchcase(str(n), b["cells"]) for n in ok["cell_name"]]] if not ok.empty else ok
        if hit.empty:
            checks.append(
                Check(
                    b["cells"],
                    "",
                    -1,
                    b["metric"],
                    math.nan,
                    b["value"],
                    b["lower"],
                    b["upper"],
                    b["unit"],
                    False,
                    "no-cells",
                )
            )
            continue
        column = METRIC_ALIASES.get(b["metric"], b["metric"])  # an older name reads the one name
        for r in hit.to_dict("records"):
            v = r.get(column)
            measured = float(v) if isinstance(v, int | float) and v is not None else math.nan
            if math.isnan(measured):
                status, good = "missing", False
            else:
                good = b["lower"] <= measured <= b["upper"]
                status = "pass" if good else "fail"
            checks.append(
                Check(
                    str(r["cell_name"]),
                    str(r["cell_id"]),
                    int(r["repeat"]),
                    b["metric"],
                    measured,
                    b["value"],
                    b["lower"],
                    b["upper"],
                    b["unit"],
                    good,
                    status,
                )
            )
    return checks


def violations(checks: Iterable[Check]) -> list[Check]:
    """The checks that did not pass (out of band, metric missing, or no cell to check)."""
    return [c for c in checks if not c.ok]


def campaign_settings(name: str) -> tuple[list[Any], str | None]:
    """(references, schedule) of the campaign called ``name`` in the campaigns folder; empty if not found.

    Best effort, for callers that only know the campaign's name: a campaign file that does
    not load is skipped (its DAG shows that error; figures need not fail for it).
    """
    from charllm.campaign import discover, load_campaign, read_yaml
    from charllm.errors import ConfigError
    from charllm.paths import campaigns_dir

    d = campaigns_dir()
    if not d.is_dir():
        return [], None
    for p in discover(d):
        try:
            if read_yaml(p).get("name") != name:
                continue
            camp = load_campaign(p).campaign
        except ConfigError:
            continue
        return list(camp.references), camp.schedule
    return [], None


# -- the report ---------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        a = abs(v)
        if a >= 1e5 or (a < 1e-2 and a > 0):
            return f"{v:.3g}"
        return f"{v:.4g}" if a < 100 else f"{v:,.0f}"
    return str(v).replace("|", "\\|")


def markdown_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(none)_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in r) + " |")
    return "\n".join(lines) + "\n"


_CELL_COLS = (
    ("cell_name", "cell"),
    ("repeat", "rep"),
    ("outcome", "outcome"),
    ("layout", "layout"),
    ("opt_code", "code"),
    ("micro_batch", "mbs"),
    ("step_time_median_s", "step s"),
    ("tokens_per_s", "tokens/s"),
    ("energy_per_step_sampled_j", "J/step"),
    ("efficiency_samples_per_s_mj", "samples/(s·MJ)"),
    ("avg_gpu_temp_c", "avg °C"),
    ("peak_gpu_temp_c", "peak °C"),
    ("avg_power_w", "avg W"),
    ("energy_counter_over_sampled", "counter/sampled"),
)


def write_report(
    out_dir: Path,
    campaign: str,
    cells: pd.DataFrame,
    checks: Sequence[Check],
    figures: Sequence[Path] = (),
    gpus: pd.DataFrame | None = None,
) -> Path:
    """``report.md`` beside the figures: outcomes, cells, reference checks, GPU extremes, figure links."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bad = violations(checks)
    lines = [f"# Campaign `{campaign}`: run report", ""]
    if not cells.empty:
        counts = cells["outcome"].value_counts().to_dict()
        lines.append("Outcomes (cell x repeat): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ".")
        lines.append("")
    lines.append("## Reference checks")
    lines.append("")
    if not checks:
        lines.append("No reference bands in this campaign.")
    else:
        verdict = f"**{len(bad)} of {len(checks)} checks VIOLATED.**" if bad else f"All {len(checks)} checks pass."
        lines.append(verdict)
        lines.append("")
        cdf = pd.DataFrame([c.as_dict() for c in checks])
        cdf["result"] = ["ok" if c.ok else f"**{c.status.upper()}**" for c in checks]
        lines.append(
            markdown_table(cdf[["cell_name", "repeat", "metric", "measured", "lower", "upper", "unit", "result"]])
        )
    lines += ["", "## Cells", ""]
    if not cells.empty:
        have = [(c, h) for c, h in _CELL_COLS if c in cells.columns]
        t = cells[[c for c, _ in have]].copy()
        t.columns = [h for _, h in have]
        lines.append(markdown_table(t))
    if gpus is not None and not gpus.empty and not cells.empty:
        names = dict(zip(cells["cell_id"], cells["cell_name"], strict=False))
        g = gpus[gpus["cell_id"].isin(names)]
        if not g.empty:
            lines += ["", "## GPUs: hottest and coolest per cell", ""]
            rows = []
            for cid, grp in g.groupby("cell_id", sort=False):
                hot = grp.loc[grp["peak_gpu_temp_c"].idxmax()] if grp["peak_gpu_temp_c"].notna().any() else None
                cool = grp.loc[grp["peak_gpu_temp_c"].idxmin()] if grp["peak_gpu_temp_c"].notna().any() else None
                rows.append(
                    {
                        "cell": names[cid],
                        "gpus": int(grp[["host", "gpu_index"]].drop_duplicates().shape[0]),
                        "hottest": f"{hot['host']}:{int(hot['gpu_index'])}" if hot is not None else "",
                        "peak °C": hot["peak_gpu_temp_c"] if hot is not None else math.nan,
                        "coolest": f"{cool['host']}:{int(cool['gpu_index'])}" if cool is not None else "",
                        "its peak °C": cool["peak_gpu_temp_c"] if cool is not None else math.nan,
                        "throttle power cap s": float(grp.get("throttle_sw_power_cap_s", pd.Series([math.nan])).max()),
                        "throttle thermal s": float(
                            grp.get("throttle_hw_thermal_s", pd.Series([0.0])).max()
                            + grp.get("throttle_sw_thermal_s", pd.Series([0.0])).max()
                        ),
                    }
                )
            lines.append(markdown_table(pd.DataFrame(rows)))
    figs = [Path(p) for p in figures if str(p).endswith(".png")]
    if figs:
        lines += ["", "## Figures", ""]
        for p in figs:
            rel = os.path.relpath(p, out_dir)
            lines += [
                f"### {p.stem}",
                "",
                f"![{p.stem}]({rel}) ([PDF]({Path(rel).with_suffix('.pdf')}), [data]({Path(rel).with_suffix('.csv')}))",
                "",
            ]
    path = out_dir / "report.md"
    tmp = out_dir / f".report.md.{os.getpid()}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path

"""Kwai figures and tables from the one-H200 run of ``benchmarks/kwai_remat_gpu.py``.

Reads the run's ``sweep.json`` (recompute mode x alpha: peak memory over two optimizer steps
with the AdamW state present, i.e. ``max_memory_allocated`` after the second step; offloaded
and PCIe bytes; outcome), ``compare.json`` (``full`` at alpha 0 and ``kwai`` at its smallest
fitting alpha, fresh engines from the same seed, 20 steps) and the campaign's ``cells.json``,
and writes with :mod:`charllm.analysis.figures_kwai`:

- ``memory_alpha.{png,pdf,csv}``: memory against alpha per recompute mode, OOM hatched, fit + R^2;
- ``kwai_table.{png,pdf,csv,md}``: Kwai's table (method, tokens/s/GPU, MFU as Kwai counts it
  and ours, max memory): ``none`` at alpha 0 from the sweep, ``full`` and ``kwai`` from the
  comparison runs (median step after the first three);
- ``sweep_table.{csv,md}``: every swept cell (memory, offloaded GiB per step, PCIe TX over
  offloaded bytes where the 32-bit counter's reading is unambiguous, tokens/s of its 2nd step);
- ``numbers.json``: the numbers quoted in ``README.md``.

Usage: ``python benchmarks/kwai_figures.py --run RUN_DIR_OR_TGZ --cells docs/gpu/kwai-remat-1gpu/cells.json --out docs/kwai``

With ``--home CHARLLM_HOME_DIR_OR_TGZ`` (``docs/gpu/kwai-remat-1gpu-run/``: ``charllm run`` of the
campaign's alpha-0 cells, then the sweep): Kwai's table is the runner's cells table (the job's
outcome, OOM included; tokens/s, ``mfu``/``mfu_causal`` and memory after step 2 as the job
recorded them), the loss comparison is the runner's ``steps.parquet``, and the sweep's rows are
completed by the runner's cells (an alpha-0 cell the sweep did not run takes the job's outcome and
memory). ``--unwrapped-pcie``: the sweep's PCIe deltas were sampled every 5 ms and unwrapped
(``kwai_remat_gpu.py`` since the 17-layer run), so TX / offloaded bytes is read for every cell.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charllm.analysis import figures_kwai as fk
from charllm.analysis.aggregate import layout_label
from charllm.modelcat import ModelShape
from charllm.train.flops import causal_model_flops_per_token, model_flops_per_token, peak_flops


def _find(root: Path, name: str) -> Path | None:
    hits = sorted(root.rglob(name))
    return hits[0] if hits else None


def _cell_info(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for c in cells:
        par = c.get("parallel", {})
        out[c["name"]] = {
            "model": c["model"]["name"],
            "shape": ModelShape(**c["model"]),
            "seq_len": c["seq_len"],
            "global_batch": c["global_batch"],
            "world_size": c.get("world_size", 1),
            "gpu_type": c.get("gpu_type", "h200"),
            "precision": c.get("precision", "bf16"),
            "layout": layout_label(par),
        }
    return out


def _perf(info: dict[str, Any], step_s: list[float], skip: int) -> dict[str, float]:
    """tokens/s/GPU from the median step after ``skip``, and MFU as Kwai and as we count it."""
    steps = step_s[skip:] or step_s
    if not steps:
        return {}
    med = statistics.median(steps)
    tok = info["global_batch"] * info["seq_len"] / med / info["world_size"]
    peak = peak_flops(info["gpu_type"], info["precision"]) or math.nan
    shape, s = info["shape"], info["seq_len"]
    return {
        "step_time_median_s": med,
        "tokens_per_s_per_gpu": tok,
        "mfu_causal": causal_model_flops_per_token(shape, s) * tok / peak,
        "mfu": model_flops_per_token(shape, s) * tok / peak,
    }


def _tx_ratio(r: dict[str, Any]) -> float | None:
    """PCIe TX bytes over offloaded bytes in the cell's last step, where the reading is unambiguous.

    NVML's PCIe byte counters are 32-bit: a per-step delta is known modulo 2^32, so it is
    unwrapped only for steps that offloaded less than 2^32 B (the ``full`` cells); None otherwise.
    """
    off, pcie = r.get("offload") or [], r.get("pcie") or []
    if not off or not pcie:
        return None
    out, tx = float(off[-1][0]), float(pcie[-1][0])
    if not 0 < out < 2**32:
        return None
    return (tx % 2**32) / out


def sweep_summary(
    rows: list[dict[str, Any]], info: dict[str, dict[str, Any]], unwrapped_pcie: bool = False
) -> pd.DataFrame:
    recs = []
    for r in rows:
        i = info[r["cell"]]
        rec: dict[str, Any] = {
            "cell_name": r["cell"],
            "model": i["model"],
            "seq_len": i["seq_len"],
            "layout": i["layout"],
            "recompute_mode": r["recompute"],
            "offload_alpha": float(r["alpha"]),
            "outcome": r["outcome"],
            "error": r.get("error"),
        }
        if r["outcome"] == "ok":
            rec["max_memory_allocated_step2_bytes"] = float(r["max_memory_allocated_bytes"])
            off = r.get("offload") or []
            if off:
                rec["offload_bytes_per_step"] = float(off[-1][0])
            if unwrapped_pcie:
                rec["pcie_tx_over_offload"] = r.get("pcie_tx_over_offload")
                rec["pcie_rx_over_fetch"] = r.get("pcie_rx_over_fetch")
            else:
                rec["pcie_tx_over_offload"] = _tx_ratio(r)
            n = len(r.get("step_s") or [])
            rec.update(_perf(i, r.get("step_s") or [], 1 if n > 1 else 0))
            rec["source"] = "sweep: the 2nd of 2 steps" if n == 2 else f"sweep: {n} measured step(s)"
        recs.append(rec)
    return pd.DataFrame(recs)


def compare_summary(
    compare: dict[str, Any], sweep: pd.DataFrame, info: dict[str, dict[str, Any]]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Kwai's table rows: none at alpha 0 (sweep), full and kwai (comparison runs)."""
    recs, extra = [], {}
    none0 = sweep[(sweep["recompute_mode"] == "none") & (sweep["offload_alpha"] == 0.0)]
    if not none0.empty:
        recs.append(none0.iloc[0].to_dict())
    for key in ("full", "kwai"):
        r = compare.get(key) or {}
        if r.get("outcome") != "ok":
            continue
        i = info[r["cell"]]
        sw = sweep[sweep["cell_name"] == r["cell"]].iloc[0]
        rec = {
            "cell_name": r["cell"],
            "model": i["model"],
            "seq_len": i["seq_len"],
            "layout": i["layout"],
            "recompute_mode": sw["recompute_mode"],
            "offload_alpha": float(sw["offload_alpha"]),
            "outcome": "ok",
            "max_memory_allocated_step2_bytes": float(r["max_memory_allocated_bytes"]),
            "loss_last": float(r["losses"][-1]),
            **_perf(i, r["step_s"], 3),
            "source": "compare: median of steps 4-20",
        }
        recs.append(rec)
        extra[key] = {"losses": r["losses"], "cell": r["cell"]}
    if "full" in extra and "kwai" in extra:
        a, b = extra["full"]["losses"], extra["kwai"]["losses"]
        extra["max_rel_loss_diff"] = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=False))
    return pd.DataFrame(recs), extra


def _home_tables(home: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runner's cells and steps tables under a CHARLLM_HOME (its ``tables/<campaign>/``)."""
    cells_p, steps_p = _find(home / "tables", "cells.parquet"), _find(home / "tables", "steps.parquet")
    if cells_p is None or steps_p is None:
        raise SystemExit(f"no tables/*/cells.parquet and steps.parquet under {home}")
    return pd.read_parquet(cells_p), pd.read_parquet(steps_p)


def home_summary(cells: pd.DataFrame) -> pd.DataFrame:
    """Kwai's table rows from the runner's cells table (one row per cell, the job's numbers)."""
    s = cells.copy()
    s["source"] = [
        f"charllm run: {int(m)} measured steps" if o == "ok" else f"charllm run: {o}"
        for o, m in zip(s["outcome"], pd.to_numeric(s.get("measured_steps"), errors="coerce").fillna(0), strict=True)
    ]
    return s


def loss_comparison(steps: pd.DataFrame, cells: pd.DataFrame) -> dict[str, Any]:
    """kwai (alpha 0) against full (alpha 0): per-step losses from the same seed, largest relative difference."""
    ok = cells[cells["outcome"] == "ok"]
    pick: dict[str, str] = {}
    for mode in ("full", "kwai"):
        m = ok[(ok["recompute_mode"] == mode) & (pd.to_numeric(ok["offload_alpha"]).fillna(0) == 0)]
        if not m.empty:
            pick[mode] = str(m["cell_id"].iloc[0])
    if len(pick) < 2:
        return {}
    key = "cell_id" if "cell_id" in steps else "cell"
    curves = {
        mode: steps[steps[key] == cid].sort_values("step")[["step", "phase", "loss", "duration_s"]]
        for mode, cid in pick.items()
    }
    f, k = curves["full"], curves["kwai"]
    n = min(len(f), len(k))
    rel = [abs(a - b) / abs(a) for a, b in zip(f["loss"].iloc[:n], k["loss"].iloc[:n], strict=True)]
    meas = [i for i in range(n) if f["phase"].iloc[i] == "measure"]
    return {
        "steps": n,
        "measured_steps": len(meas),
        "max_rel_loss_diff_all_steps": max(rel),
        "max_rel_loss_diff_measured_steps": max(rel[i] for i in meas) if meas else None,
        "full_losses": [float(x) for x in f["loss"].iloc[:n]],
        "kwai_losses": [float(x) for x in k["loss"].iloc[:n]],
        "full_step_s": [float(x) for x in f["duration_s"].iloc[:n]],
        "kwai_step_s": [float(x) for x in k["duration_s"].iloc[:n]],
    }


def main_home(args: argparse.Namespace) -> int:
    """The 17-layer run: the runner's alpha-0 cells (Kwai's table, loss comparison) + the sweep (memory vs alpha)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = _cell_info(json.loads(Path(args.cells).read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        run, home = Path(args.run), Path(args.home)
        if home.is_file():
            with tarfile.open(home) as tf:
                tf.extractall(Path(tmp) / "home", filter="data")
            home = Path(tmp) / "home"
        cells, steps = _home_tables(home)
        sweep_p = _find(run, "sweep.json")
        if sweep_p is None:
            print(f"no sweep.json under {args.run}", file=sys.stderr)
            return 1
        rows = json.loads(sweep_p.read_text())
    sweep = sweep_summary(rows, info, args.unwrapped_pcie)
    runner = home_summary(cells)
    # an alpha-0 cell the sweep did not run takes the job's outcome and memory; cells neither ran are left out
    by_name = runner.set_index("cell_name")
    merged = []
    for _, r in sweep.iterrows():
        rec = r.to_dict()
        if rec["outcome"] == "not_run":
            if rec["cell_name"] not in by_name.index:
                continue
            j = by_name.loc[rec["cell_name"]]
            rec["outcome"] = j["outcome"]
            rec["source"] = j["source"]
            if j["outcome"] == "ok":
                rec["max_memory_allocated_step2_bytes"] = float(j["max_memory_allocated_step2_bytes"])
        merged.append(rec)
    sweep = pd.DataFrame(merged)
    title = f"{sweep['model'].iloc[0]} s={sweep['seq_len'].iloc[0]}, one H200"
    paths = fk.memory_alpha_figure(sweep, out, f"{title}: memory after step 2 against offload fraction")
    table = fk.kwai_table(sweep)
    idx = sweep.set_index("cell_name")
    for c in ("pcie_tx_over_offload", "pcie_rx_over_fetch", "source"):
        if c in idx:
            table[c] = idx.loc[table["cell_name"], c].values
    table.to_csv(out / "sweep_table.csv", index=False)
    (out / "sweep_table.md").write_text(fk.kwai_table_markdown(table))
    paths += fk.kwai_table_figure(runner, out, f"{title}: recompute modes (charllm run, 20 measured steps)")
    numbers: dict[str, Any] = {"fits": fit_numbers(out, lambda o: o == "oom")}
    tx = [float(x) for x in sweep.get("pcie_tx_over_offload", pd.Series(dtype=float)).dropna()]
    rx = [float(x) for x in sweep.get("pcie_rx_over_fetch", pd.Series(dtype=float)).dropna()]
    numbers["pcie_tx_over_offload"] = {"min": min(tx), "max": max(tx), "cells": len(tx)} if tx else None
    numbers["pcie_rx_over_fetch"] = {"min": min(rx), "max": max(rx), "cells": len(rx)} if rx else None
    kt = pd.read_csv(out / "kwai_table.csv")
    numbers["kwai_table"] = kt.to_dict("records")
    ok = kt[kt["outcome"] == "ok"]
    tok = {m: float(ok.loc[ok["recompute_mode"] == m, "tokens_per_s_per_gpu"].iloc[0]) for m in ("full", "kwai")}
    numbers["kwai_over_full_tokens_per_s"] = tok["kwai"] / tok["full"]
    numbers["loss"] = loss_comparison(steps, cells)
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1, default=str) + "\n")
    for p in [*paths, out / "sweep_table.csv", out / "sweep_table.md", out / "numbers.json"]:
        print(p)
    show = {k: v for k, v in numbers.items() if k not in ("kwai_table", "loss")}
    show["loss"] = {k: v for k, v in numbers["loss"].items() if not k.endswith(("_losses", "_step_s"))}
    print(json.dumps(show, indent=1, default=str))
    return 0


def fit_numbers(out: Path, is_oom: Any) -> dict[str, Any]:
    """Per recompute mode: the memory-vs-alpha fit (R^2, slope) and the alphas that ran and ran out
    of memory, from the ``memory_alpha.csv`` the figure wrote (``is_oom``: outcome -> bool)."""
    fits: dict[str, Any] = {}
    fit = pd.read_csv(out / "memory_alpha.csv")
    for mode, g in fit.groupby("recompute_mode"):
        fits[str(mode)] = {
            "r2": float(g["fit_r2"].iloc[0]),
            "slope_gib_per_alpha": float(g["fit_slope_per_alpha"].iloc[0]),
            "ok_alphas": sorted(g.loc[g["outcome"] == "ok", "offload_alpha"].tolist()),
            "oom_alphas": sorted(g.loc[g["outcome"].map(is_oom), "offload_alpha"].tolist()),
        }
    return fits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="the run's output folder or a .tar.gz of it")
    ap.add_argument("--cells", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--home", help="the runner's CHARLLM_HOME (folder or .tgz) of the same run: see the docstring")
    ap.add_argument("--unwrapped-pcie", action="store_true", help="the sweep's PCIe deltas are unwrapped (5 ms)")
    args = ap.parse_args()
    if args.home:
        return main_home(args)
    run = Path(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        if run.is_file():
            with tarfile.open(run) as tf:
                tf.extractall(tmp, filter="data")
            run = Path(tmp)
        sweep_p, compare_p = _find(run, "sweep.json"), _find(run, "compare.json")
        if sweep_p is None:
            print(f"no sweep.json under {args.run}", file=sys.stderr)
            return 1
        rows = json.loads(sweep_p.read_text())
        compare = json.loads(compare_p.read_text()) if compare_p else {}
    info = _cell_info(json.loads(Path(args.cells).read_text()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sweep = sweep_summary(rows, info)
    title = f"{sweep['model'].iloc[0]} s={sweep['seq_len'].iloc[0]}, one H200"
    paths = fk.memory_alpha_figure(sweep, out, f"{title}: memory after step 2 against offload fraction")
    table = fk.kwai_table(sweep)
    table["pcie_tx_over_offload"] = sweep.set_index("cell_name").loc[table["cell_name"], "pcie_tx_over_offload"].values
    table.to_csv(out / "sweep_table.csv", index=False)
    (out / "sweep_table.md").write_text(fk.kwai_table_markdown(table))
    numbers: dict[str, Any] = {"fits": fit_numbers(out, lambda o: o != "ok")}
    ratios = [float(x) for x in sweep.get("pcie_tx_over_offload", pd.Series(dtype=float)).dropna()]
    numbers["pcie_tx_over_offload_min"] = min(ratios) if ratios else None
    if compare:
        comp, extra = compare_summary(compare, sweep, info)
        paths += fk.kwai_table_figure(comp, out, f"{title}: recompute modes")
        kt = pd.read_csv(out / "kwai_table.csv")
        numbers["kwai_table"] = kt.to_dict("records")
        numbers["max_rel_loss_diff"] = extra.get("max_rel_loss_diff")
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1, default=str) + "\n")
    for p in [*paths, out / "sweep_table.csv", out / "sweep_table.md", out / "numbers.json"]:
        print(p)
    print(json.dumps(numbers, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A prepared results home for the campaign view: the demo campaign's catalog, tables and figures
written directly (no training), with every outcome the matrix shows.

The six demo cells (in the campaign file's order, which is the ``plan`` task's order):

- 0: ok, and two nightly repeats (r1, r2) on the two following nights (the drift chart);
- 1: ok, but slow: it violates the prepared reference band (a highlighted check);
- 2: oom;
- 3: failed (the job's message kept);
- 4: running (an attempt in flight);
- 5: not run.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "include" / "campaigns" / "demo.yaml"
OUTCOMES = ("ok", "ok", "oom", "failed", "running", None)
NIGHT0 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
BAND = {"metric": "tokens_per_s", "value": 5000.0, "lower": 4000.0, "upper": 1.0e9, "unit": "tokens/s", "cells": "*"}
FAILED_MESSAGE = "job local-test3 ended FAILED (exit code 1): RuntimeError: prepared failure"


def demo_cells() -> list[Any]:
    from charllm.campaign import load_campaign

    return list(load_campaign(DEMO).cells)


def _attempt_dir(home: Path, cell_id: str, repeat: int, outcome: str | None) -> Path:
    d = home / "results" / "cells" / cell_id / f"r{repeat}" / "a1"
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"cell_id": cell_id, "repeat": repeat, "outcome": outcome}) + "\n")
    (d / "stdout.log").write_text(f"charllm: job on localhost, cell {cell_id} repeat {repeat}\n")
    (d / "out").mkdir(exist_ok=True)
    (d / "out" / "steps.csv").write_text("step,loss\n0,6.24\n1,6.23\n")
    return d


def prepare_demo(home: Path, run_id: str) -> dict[str, Any]:
    """Catalog attempts (run ``run_id``), tables and a figures run for the demo; returns what was made."""
    import pandas as pd
    from sqlalchemy import select

    from charllm.analysis.figures import draw_all
    from charllm.catalog import AttemptRow, Catalog

    cells = demo_cells()
    cat = Catalog(f"sqlite:///{home / 'catalog.db'}")
    cat.register("demo", str(DEMO), [(c.cell_id, c.name, c.model_dump(mode="json")) for c in cells])
    rows: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    keys: list[tuple[int, int, str | None]] = [(i, 0, o) for i, o in enumerate(OUTCOMES)]
    keys += [(0, 1, "ok"), (0, 2, "ok")]
    with cat.session() as s:
        for i, rep, outcome in keys:
            c = cells[i]
            if outcome is None:
                continue
            if s.scalars(select(AttemptRow).where(AttemptRow.cell_id == c.cell_id, AttemptRow.repeat == rep)).first():
                continue
            at = NIGHT0 + timedelta(days=rep, minutes=i)
            d = _attempt_dir(home, c.cell_id, rep, outcome if outcome != "running" else None)
            s.add(
                AttemptRow(
                    cell_id=c.cell_id,
                    repeat=rep,
                    attempt=1,
                    campaign="demo",
                    run_id=run_id if rep == 0 else f"scheduled__2026-03-0{rep + 1}T02:00:00+00:00",
                    backend="local",
                    job_id=f"local-test{i}{rep}",
                    state="running" if outcome == "running" else "ended",
                    outcome=None if outcome == "running" else outcome,
                    message=FAILED_MESSAGE if outcome == "failed" else None,
                    result_dir=str(d),
                    submitted_at=at,
                    ended_at=None if outcome == "running" else at + timedelta(seconds=30),
                )
            )
            if outcome == "running":
                continue
            tps = {0: 5500.0 * (1 + 0.03 * rep), 1: 3000.0}.get(i, math.nan) if outcome == "ok" else math.nan
            rows.append(
                {
                    "campaign": "demo",
                    "cell_id": c.cell_id,
                    "repeat": rep,
                    "attempt": 1,
                    "outcome": outcome,
                    "job_id": f"local-test{i}{rep}",
                    "result_dir": str(d),
                    "measured_at": pd.Timestamp(at),
                    "cell_name": c.name,
                    "model": c.model["name"],
                    "tp": c.parallel.tp,
                    "pp": c.parallel.pp,
                    "dp": c.parallel.dp,
                    "cp": 1,
                    "ep": 1,
                    "fsdp": False,
                    "micro_batch": c.micro_batch,
                    "global_batch": c.global_batch,
                    "seq_len": c.seq_len,
                    "opt_code": c.opt_code,
                    "world_size": c.world_size,
                    "layout": f"TP{c.parallel.tp}PP{c.parallel.pp}"
                    + (f"DP{c.parallel.dp}" if c.parallel.dp > 1 else ""),
                    "tokens_per_s": tps,
                    "tokens_per_s_per_gpu": tps / c.world_size,
                    "step_time_median_s": c.global_batch * c.seq_len / tps if tps == tps else math.nan,
                    "loss_first": 6.24 if outcome == "ok" else math.nan,
                    "loss_last": 6.17 if outcome == "ok" else math.nan,
                }
            )
            if outcome == "ok":
                for k in range(8):
                    steps.append(
                        {
                            "cell_id": c.cell_id,
                            "repeat": rep,
                            "step": k,
                            "phase": "measured",
                            "loss": 6.24 - 0.01 * k - 0.002 * i,
                        }
                    )
    tables = home / "tables" / "demo"
    tables.mkdir(parents=True, exist_ok=True)
    cells_df = pd.DataFrame(rows).sort_values(["cell_id", "repeat"]).reset_index(drop=True)
    steps_df = pd.DataFrame(steps)
    cells_df.to_parquet(tables / "cells.parquet")
    steps_df.to_parquet(tables / "steps.parquet")
    fig_run = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run_id)  # as the figures DAG names it
    paths = draw_all(
        cells_df,
        steps_df,
        home / "figures" / "demo" / fig_run,
        "demo",
        gpus=pd.DataFrame(),
        kernels=pd.DataFrame(),
        references=[BAND],
        schedule="0 2 * * *",
    )
    return {"cells": cells, "figures_run": fig_run, "figures": [p.name for p in paths]}

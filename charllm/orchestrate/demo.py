"""``charllm demo`` (what ``make demo`` runs): the demo campaign through Airflow (``airflow dags test``), and a report.

Expects the environment of ``scripts/airflow-env.sh`` (SQLite metadata, the repo's
dags/ folder). Runs the campaign, then one more run the way a nightly one re-measures (new
repeats of the campaign's ``nightly`` cells, for the drift chart), draws the figures, puts
the recorded GPU campaign of ``docs/gpu/small-campaign`` beside it (its tables and figures,
labelled as recorded data) and prints where everything is and how to open the UI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from charllm.orchestrate.factory import dag_id_for
from charllm.paths import home

CAMPAIGN = "demo"
REPO = Path(__file__).resolve().parents[2]
RECORDED = REPO / "docs" / "gpu" / "small-campaign"
RECORDED_RUN = "recorded-h100-2026-11-22"
RECORDED_NOTE = (
    "Recorded GPU data: 1x NVIDIA H100 80GB HBM3 (a lent machine), 2026-11-22, from docs/gpu/small-campaign; "
    "not measured by this installation"
)
RECORDED_TABLES = ("cells", "steps", "gpus", "kernels")


def seed_recorded(root: Path | None = None) -> Path | None:
    """The recorded GPU campaign, ready to look at: its tables (unless this installation has
    tables of that campaign already) and its figures drawn from them, labelled as recorded.

    Returns the figures folder (``figures/<campaign>/recorded-h100-2026-11-22/``), or None when
    the repository's ``docs/`` is not there (an installed package).
    """
    import pandas as pd

    from charllm.analysis.figures import draw_all

    src = RECORDED / "tables"
    if not (src / "cells.parquet").is_file():
        return None
    root = root or home()
    cells = pd.read_parquet(src / "cells.parquet")
    name = str(cells["campaign"].iloc[0])
    tdir = root / "tables" / name
    if not (tdir / "cells.parquet").exists():
        tdir.mkdir(parents=True, exist_ok=True)
        for t in RECORDED_TABLES:
            if (src / f"{t}.parquet").is_file():
                shutil.copy2(src / f"{t}.parquet", tdir / f"{t}.parquet")
    out = root / "figures" / name / RECORDED_RUN
    if not (out / "report.md").exists():
        steps = pd.read_parquet(src / "steps.parquet")
        draw_all(cells, steps, out, name, tables_dir=src, note=RECORDED_NOTE)
    return out


def _dag_file(campaign: str) -> Path | None:
    """The DAG file of ``campaign`` in the repo's dags/ folder (parsing only it is quicker)."""
    path = REPO / "dags" / f"campaign_{campaign.replace('-', '_')}.py"
    return path if path.is_file() else None


def _dag_test(dag_id: str, dag_file: Path | None, conf: dict[str, object] | None = None) -> bool:
    """``airflow dags test DAG_ID [-f FILE] [--conf JSON]``, in this process: True when the run succeeded."""
    from airflow.cli.cli_parser import get_parser

    argv = ["dags", "test", dag_id]
    if dag_file is not None:
        argv += ["-f", str(dag_file)]
    if conf is not None:
        argv += ["--conf", json.dumps(conf)]
    print(f"\n$ airflow {' '.join(argv)}", flush=True)
    args = get_parser().parse_args(argv)
    try:
        args.func(args)
    except SystemExit as exc:  # "DagRun failed"
        return exc.code in (None, 0)
    return True


PHASE = "charllm-demo-phase"


def run_dags(campaign: str) -> int:
    """The demo's Airflow runs, one after the other in one process (one Airflow start-up, not
    three): the campaign DAG; a nightly-style run (new repeats of the campaign's ``nightly``
    cells, for the drift chart); the figures DAG (what the scheduler runs on ``aggregate``'s
    tables Asset event). Prints a ``charllm-demo-phase NAME SECONDS`` line after each."""
    dag_id = dag_id_for(campaign)
    dag_file = _dag_file(campaign)
    nightly = _nightly_conf(campaign)
    runs: list[tuple[str, str, dict[str, object] | None]] = [("campaign run", dag_id, None)]
    if nightly:
        runs.append(("nightly-style run", dag_id, nightly))
    runs.append(("figures", f"{dag_id}_figures", None))
    for name, dag, conf in runs:
        t0 = time.monotonic()
        ok = _dag_test(dag, dag_file, conf)
        print(f"{PHASE} {name} {time.monotonic() - t0:.1f}", flush=True)
        if not ok:
            return 1
    return 0


def _phases(text: str) -> list[tuple[str, float]]:
    out = []
    for line in text.splitlines():
        if line.startswith(PHASE + " "):
            name, _, secs = line.removeprefix(PHASE + " ").rpartition(" ")
            out.append((name, float(secs)))
    return out


def _nightly_conf(campaign: str) -> dict[str, object] | None:
    """What a scheduled run of the campaign would run, as a manual run's conf (None: no schedule)."""
    from charllm.ui.data import campaign_info

    info = campaign_info(campaign)
    if not info.schedule:
        return None
    return {"cells": info.nightly_cells, "repeats": info.nightly_repeats, "append": True}


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] == ["--run-dags"]:  # the child process: the Airflow runs themselves
        return run_dags(args[1] if len(args) > 1 else CAMPAIGN)
    campaign = args[0] if args else CAMPAIGN
    dag_id = dag_id_for(campaign)
    log_dir = home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{dag_id}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    nightly = _nightly_conf(campaign)
    print(f"charllm demo: running DAG {dag_id} through Airflow (airflow dags test; log: {log_path})", flush=True)
    if nightly:
        print(f"charllm demo: then a nightly-style run: {nightly['repeats']} new repeat(s) of {nightly['cells']}")
    print(f"charllm demo: then the figures (DAG {dag_id}_figures)", flush=True)
    t0 = time.monotonic()
    with log_path.open("w") as log:
        rc = subprocess.run(
            [sys.executable, "-m", "charllm.orchestrate.demo", "--run-dags", campaign],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        ).returncode
    wall = time.monotonic() - t0
    text = log_path.read_text(errors="replace")
    if rc != 0:
        print(text[-6000:])
        print(f"charllm demo: airflow dags test failed (exit {rc}); full log in {log_path}")
        return rc
    phases = _phases(text)
    t1 = time.monotonic()
    recorded = seed_recorded()
    phases.append(("recorded GPU figures", time.monotonic() - t1))
    import pandas as pd

    tables = home() / "tables" / campaign
    cells = pd.read_parquet(tables / "cells.parquet")
    cols = [
        c
        for c in ("cell_name", "repeat", "outcome", "tokens_per_s", "step_time_median_s", "loss_first", "loss_last")
        if c in cells.columns
    ]
    print()
    print(cells[cols].to_string(index=False))
    runs = sorted((home() / "figures" / campaign).glob("*/report.md"), key=lambda p: p.stat().st_mtime)
    print()
    print(f"charllm demo: the DAG runs succeeded in {wall:.0f} s")
    airflow_s = wall - sum(s for n, s in phases if n != "recorded GPU figures")
    print(
        "where the time went: "
        + ", ".join(f"{n} {s:.0f} s" for n, s in phases)
        + f", Airflow start-up and DAG parsing {max(airflow_s, 0):.0f} s"
    )
    print(f"results table : {tables / 'cells.parquet'}  (steps: {tables / 'steps.parquet'})")
    print(f"results store : {home() / 'results' / 'cells'}   catalog: {home() / 'catalog.db'}")
    if runs:
        folder = runs[-1].parent
        names = ", ".join(sorted(p.stem for p in folder.glob("*.png")))
        print(f"figures       : {folder}/ ({names}; each .png + .pdf + .csv)")
        print(f"report        : {runs[-1]}")
    if recorded is not None:
        print(f"GPU example   : {recorded}/ (figures of a recorded run on an H100, labelled as such)")
    print("the UI         : make ui   then open http://localhost:8080 (user/password printed by `airflow standalone`);")
    print(f"                 'Campaigns' in the navigation, or DAG {dag_id} -> tab 'Campaign': the matrix of cells x")
    print("                 repeats, the figures and the reference checks; Trigger runs the campaign (a form)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make demo`: run the demo campaign through Airflow (``airflow dags test``) and report.

Expects the environment of ``scripts/airflow-env.sh`` (SQLite metadata, the repo's
dags/ folder). Prints where the results table and figures are, and how to open the UI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from charllm.orchestrate.factory import dag_id_for
from charllm.paths import home

CAMPAIGN = "demo"


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    campaign = args[0] if args else CAMPAIGN
    dag_id = dag_id_for(campaign)
    log_dir = home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{dag_id}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    print(f"charllm demo: running DAG {dag_id} through Airflow (log: {log_path})", flush=True)
    t0 = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.run(
            ["airflow", "dags", "test", dag_id], stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
        if proc.returncode == 0:
            # what the scheduler runs on `aggregate`'s tables Asset event: the figures DAG
            print(f"charllm demo: drawing the figures (DAG {dag_id}_figures)", flush=True)
            proc = subprocess.run(
                ["airflow", "dags", "test", f"{dag_id}_figures"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ.copy(),
            )
    wall = time.monotonic() - t0
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        print(text[-6000:])
        print(f"charllm demo: airflow dags test failed (exit {proc.returncode}); full log in {log_path}")
        return proc.returncode
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
    print(f"charllm demo: both DAG runs succeeded in {wall:.0f} s")
    print(f"results table : {tables / 'cells.parquet'}  (steps: {tables / 'steps.parquet'})")
    print(f"results store : {home() / 'results' / 'cells'}   catalog: {home() / 'catalog.db'}")
    if runs:
        folder = runs[-1].parent
        names = ", ".join(sorted(p.stem for p in folder.glob("*.png")))
        print(f"figures       : {folder}/ ({names}; each .png + .pdf + .csv)")
        print(f"report        : {runs[-1]}")
    print("the UI         : make ui   then open http://localhost:8080 (user/password printed by `airflow standalone`),")
    print(f"                 find DAG {dag_id}, press Trigger and fill in the form")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

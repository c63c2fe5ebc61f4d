"""The demo campaign's wall time and the orchestration overhead per cell.

Runs the demo DAG through ``airflow dags test`` in a fresh Airflow home (SQLite) and a fresh
results home, then reads Airflow's task instances and the jobs' own marker files:

* job run time = from the job taking its local slot (``started``) to its exit code;
* sweep phase  = from the first ``cell.submit`` starting to the last ``cell.collect`` ending;
* overhead per cell = (sweep phase - sum of job run times) / cells: the local backend runs one
  job at a time, so this is what submission, the trigger's polling and collection add.

Run: .venv/bin/python benchmarks/demo_overhead.py
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace(" ", "T")).timestamp()


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="charllm-bench-"))
    af = tmp / "airflow-home"
    af.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(af),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{af / 'airflow.db'}",
        CHARLLM_HOME=str(tmp / "home"),
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
    )
    airflow = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, check=True)
    t0 = time.monotonic()
    run = subprocess.run([airflow, "dags", "test", "charllm_demo"], env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if run.returncode:
        raise SystemExit(run.stdout[-4000:] + run.stderr[-4000:])

    db = sqlite3.connect(af / "airflow.db")
    rows = db.execute(
        "select task_id, map_index, start_date, end_date from task_instance where dag_id='charllm_demo'"
    ).fetchall()
    ti = {(t, m): (_ts(s), _ts(e)) for t, m, s, e in rows if s and e}
    sys.path.insert(0, str(REPO))
    from charllm.catalog import Catalog

    cat = Catalog(f"sqlite:///{tmp / 'home' / 'catalog.db'}")
    jobs = {}
    for a in cat.attempts(campaign="demo"):
        tag = f"a{a.attempt}-{a.nonce}" if a.nonce else f"a{a.attempt}"  # JobIdentity.tag
        wd = tmp / "home" / "work" / "demo" / a.cell_id / f"r{a.repeat}" / tag
        sub = (wd / "jobid").stat().st_mtime
        started = (wd / "started").stat().st_mtime
        ended = (wd / "exitcode").stat().st_mtime
        jobs[a.cell_id] = (sub, started, ended)
    cells_start = min(v[0] for (t, _), v in ti.items() if t == "cell.submit")
    cells_end = max(v[1] for (t, _), v in ti.items() if t == "cell.collect")
    runs = sorted(e - st for _, st, e in jobs.values())
    first_job_start = min(st for _, st, _ in jobs.values())
    last_job_end = max(e for _, _, e in jobs.values())
    n = len(jobs)
    phase = cells_end - cells_start
    print(f"cells: {n}; job run times (s): " + ", ".join(f"{r:.2f}" for r in runs))
    print(
        f"sweep phase (first submit -> last collect): {phase:.2f} s; sum of job run times: {sum(runs):.2f} s "
        f"(jobs run one at a time on the local backend)"
    )
    print(
        f"before the first job started: {first_job_start - cells_start:.2f} s; "
        f"after the last job ended: {cells_end - last_job_end:.2f} s"
    )
    print(f"demo DAG wall time (airflow dags test, incl. start-up): {wall:.1f} s")
    print(
        f"orchestration overhead per cell ((sweep phase - sum of job run times) / cells): "
        f"{(phase - sum(runs)) / n:.2f} s (median job run {statistics.median(runs):.2f} s)"
    )


if __name__ == "__main__":
    main()

"""A 2,000-cell dry run through the real Airflow scheduler: time to plan and to render.

Starts ``airflow standalone`` (api-server, scheduler with the LocalExecutor, dag-processor,
triggerer) in a fresh Airflow home, on PostgreSQL when one answers on 127.0.0.1:5432 (a fresh
database, dropped afterwards) and on SQLite otherwise, with a campaign of 2,000 tiny cells;
triggers its DAG with ``{"dry_run": true}`` the way the UI does (``airflow dags trigger``) and
waits for the run. Prints, from the plan task's own log: the time to plan (load the campaign,
register its cells in the catalog, look their results up) and to render the 2,000 job scripts;
and from Airflow's metadata: the run's wall time, when ``plan`` started after the trigger.

Run: .venv/bin/python benchmarks/dryrun_scheduler.py [--cells 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
AIRFLOW = str(Path(sys.executable).parent / "airflow")
PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _campaign(include: Path, n: int) -> None:
    seqs = list(range(8, 208, 2))  # 100 sequence lengths
    gbs = list(range(1, n // len(seqs) + 1))
    data = {
        "name": "bench_dryrun",
        "cluster": "local-cpu",
        "model": "tiny",
        "precision": "fp32",
        "backend": "local",
        "steps": 2,
        "sweep": {"dp": [1], "micro_batch": [1], "seq_len": seqs, "global_batch": gbs},
    }
    (include / "campaigns" / "bench_dryrun.yaml").write_text(yaml.safe_dump(data))


def _pg_database() -> tuple[str | None, str | None]:
    try:
        from sqlalchemy import create_engine, text

        name = f"charllm_bench_{uuid.uuid4().hex[:8]}"
        eng = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        eng.dispose()
        return PG_ADMIN.rsplit("/", 1)[0] + "/" + name, name
    except Exception:  # no PostgreSQL here: SQLite
        return None, None


def _drop(name: str) -> None:
    from sqlalchemy import create_engine, text

    eng = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    eng.dispose()


def _af(env: dict[str, str], *args: str, timeout: int = 300) -> str:
    p = subprocess.run([AIRFLOW, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise SystemExit(f"airflow {' '.join(args)} failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    return p.stdout


def _json(text: str) -> list[dict]:
    """The JSON list in a CLI's stdout (log lines may come before it)."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("[")), None)
    return json.loads("\n".join(lines[start:])) if start is not None else []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="charllm-bench-dryrun-"))
    shutil.copytree(REPO / "include", tmp / "include")
    _campaign(tmp / "include", args.cells)
    dags = tmp / "dags"
    dags.mkdir()
    (dags / "campaign_bench_dryrun.py").write_text(
        '"""Airflow DAG."""\nfrom charllm.orchestrate.factory import campaign_dag\n\ndag = campaign_dag("bench_dryrun.yaml")\n'
    )
    af = tmp / "airflow-home"
    af.mkdir()
    pg_url, pg_name = _pg_database()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CHARLLM_"))}
    env.update(
        AIRFLOW_HOME=str(af),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__CORE__MAX_MAP_LENGTH="100000",
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=pg_url or f"sqlite:///{af / 'airflow.db'}",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        CHARLLM_HOME=str(tmp / "home"),
        CHARLLM_INCLUDE=str(tmp / "include"),
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    )
    dag_id = "charllm_bench_dryrun"
    print(f"metadata: {'PostgreSQL ' + pg_name if pg_url else 'SQLite'}; {args.cells} cells; folder {tmp}")
    _af(env, "db", "migrate", timeout=600)
    log = (tmp / "standalone.log").open("w")
    proc = subprocess.Popen(
        [AIRFLOW, "standalone"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        t_start = time.monotonic()
        while dag_id not in _af(env, "dags", "list", "-o", "plain"):
            if time.monotonic() - t_start > 600:
                raise SystemExit("the DAG was not parsed within 10 minutes")
            time.sleep(3)
        print(f"DAG parsed and listed {time.monotonic() - t_start:.1f} s after `airflow standalone` started")
        run_id = f"bench__{uuid.uuid4().hex[:8]}"
        t_trigger = time.time()
        _af(env, "dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps({"dry_run": True}))
        while True:
            runs = _json(_af(env, "dags", "list-runs", dag_id, "-o", "json"))
            mine = [r for r in runs if r["run_id"] == run_id]
            if mine and mine[0]["state"] in ("success", "failed"):
                break
            if time.time() - t_trigger > 1800:
                raise SystemExit("the run did not finish within 30 minutes")
            time.sleep(2)
        state = mine[0]["state"]
        tis = _json(_af(env, "tasks", "states-for-dag-run", dag_id, run_id, "-o", "json"))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        if pg_name:
            _drop(pg_name)
    plan_logs = sorted((af / "logs").rglob(f"dag_id={dag_id}/run_id={run_id}/task_id=plan/*.log"))
    text = plan_logs[-1].read_text() if plan_logs else ""
    planned = re.search(r"planned in ([0-9.]+) s", text)
    rendered = re.search(r"dry run: (\d+) job script\(s\) written under \S+ in ([0-9.]+) s", text)

    def ts(v: str | None) -> float | None:
        return datetime.fromisoformat(v).timestamp() if v else None

    by_task = {t["task_id"]: t for t in tis}
    plan_ti = by_task.get("plan", {})
    print(f"run {run_id}: {state}; {len(tis)} task instances")
    for t in tis:
        s, e = ts(t.get("start_date")), ts(t.get("end_date"))
        took = f"{e - s:7.2f} s" if s and e else "      -"
        print(f"  {t['task_id']:<22} {t['state'] or '-':<16} {took}")
    if planned:
        print(f"plan: {float(planned.group(1)):.2f} s to plan {args.cells} cells (load, register, look up results)")
    if rendered:
        n, secs = int(rendered.group(1)), float(rendered.group(2))
        print(f"render: {secs:.2f} s for {n} job scripts ({secs / max(n, 1) * 1000:.2f} ms each)")
    if plan_ti.get("start_date"):
        print(f"trigger -> plan started: {ts(plan_ti['start_date']) - t_trigger:.1f} s")  # type: ignore[operator]
    if mine[0].get("start_date") and mine[0].get("end_date"):
        print(f"DAG run wall time: {ts(mine[0]['end_date']) - ts(mine[0]['start_date']):.1f} s")  # type: ignore[operator]
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    if state != "success":
        raise SystemExit(f"the dry run ended {state}")


if __name__ == "__main__":
    main()

"""The demo campaign end to end through a real Airflow (``airflow dags test``) on the local backend.

Runs with Airflow's metadata in SQLite (the embedded default) and in PostgreSQL. Checks the
catalog rows, the Parquet table's values and the figures, then that a second run finds
every cell done and submits nothing.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.airflow


def _airflow_env(tmp: Path, db_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    af_home = tmp / "airflow-home"
    af_home.mkdir(exist_ok=True)
    env.update(
        AIRFLOW_HOME=str(af_home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=db_url or f"sqlite:///{af_home / 'airflow.db'}",
        CHARLLM_HOME=str(tmp / "charllm-home"),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    return env


def _airflow(env: dict[str, str], *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    airflow = str(Path(sys.executable).parent / "airflow")
    return subprocess.run([airflow, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _run_demo(tmp: Path, db_url: str | None, conf: str | None = None) -> tuple[dict[str, str], str]:
    env = _airflow_env(tmp, db_url)
    mig = _airflow(env, "db", "migrate")
    assert mig.returncode == 0, mig.stdout[-3000:] + mig.stderr[-3000:]
    run = _airflow(env, "dags", "test", "charllm_demo", *(["--conf", conf] if conf else []))
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-8000:]
    # what the scheduler does on the tables Asset event of `aggregate`: the figures DAG
    figs = _airflow(env, "dags", "test", "charllm_demo_figures")
    assert figs.returncode == 0, (figs.stdout + figs.stderr)[-8000:]
    return env, log + figs.stdout + figs.stderr


def _check_results(home: Path, log: str, n_cells: int = 6) -> None:
    import pandas as pd

    from charllm.catalog import Catalog

    cat = Catalog(f"sqlite:///{home / 'catalog.db'}")
    attempts = cat.attempts(campaign="demo")
    assert len(attempts) == n_cells
    assert {a.outcome for a in attempts} == {"ok"}
    assert all(a.job_id and a.job_id.startswith("local-") for a in attempts)
    assert all(Path(a.result_dir, "manifest.json").is_file() for a in attempts)

    cells = pd.read_parquet(home / "tables" / "demo" / "cells.parquet")
    assert len(cells) == n_cells and set(cells["outcome"]) == {"ok"}
    assert (cells["tokens_per_s"] > 0).all()
    steps = pd.read_parquet(home / "tables" / "demo" / "steps.parquet")
    for cid, g in steps.groupby("cell_id"):
        losses = g.sort_values("step")["loss"].tolist()
        assert all(math.isfinite(x) for x in losses), cid
        assert losses[-1] < losses[0], f"loss did not fall for {cid}: {losses}"

    figs = list((home / "figures" / "demo").rglob("*"))
    names = {p.name for p in figs if p.is_file()}
    assert {"throughput.png", "throughput.pdf", "loss.png", "loss.pdf"} <= names
    assert "figure: " in log and "throughput.png" in log
    # the task log shows the job's own output
    assert "charllm: job on" in log


def _rerun_submits_nothing(env: dict[str, str], home: Path) -> None:
    from charllm.catalog import Catalog

    before = len(Catalog(f"sqlite:///{home / 'catalog.db'}").attempts(campaign="demo"))
    run = _airflow(env, "dags", "test", "charllm_demo")
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-8000:]
    assert "0 cell repeat(s) to run" in log
    after = len(Catalog(f"sqlite:///{home / 'catalog.db'}").attempts(campaign="demo"))
    assert after == before
    work = home / "work" / ".jobs"
    assert len(list(work.iterdir())) == 6


def _figures_dag_created_unpaused(env: dict[str, str]) -> None:
    """``dags test`` wrote both DAGs to the metadata DB: the figures DAG starts unpaused, so the
    tables Asset event of a run triggered from the UI draws figures without a person unpausing it."""
    db = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:
        paused = dict(con.execute("SELECT dag_id, is_paused FROM dag WHERE dag_id LIKE 'charllm_demo%'").fetchall())
    print("is_paused:", paused)
    assert paused.get("charllm_demo_figures") == 0, paused


def _kill_training_under(root: Path, deadline_s: float) -> int | None:
    """SIGKILL the first training process whose working directory is under ``root`` (what the
    kernel's OOM killer or ``scancel -s KILL`` does to a job); its pid, or None by the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                cwd = os.readlink(proc / "cwd")
            except OSError:
                continue
            if b"charllm.train" in cmd and cwd.startswith(str(root)):
                os.kill(int(proc.name), signal.SIGKILL)
                return int(proc.name)
        time.sleep(0.05)
    return None


def _forced_rerun_whose_job_dies_fails_the_run(env: dict[str, str], home: Path) -> None:
    """The cell had an ``ok`` result; a forced re-run of it whose job is killed fails its run
    (the verdict judges this run's attempt, not the earlier ``ok``)."""
    import pandas as pd

    from charllm.catalog import Catalog

    cell = "tiny-tp1pp1dp1-mb4-gb8-s64-00000"
    cells = pd.read_parquet(home / "tables" / "demo" / "cells.parquet")
    cell_id = str(cells.loc[cells["cell_name"] == cell, "cell_id"].iloc[0])
    airflow = str(Path(sys.executable).parent / "airflow")
    conf = json.dumps({"cells": cell, "force": True})
    proc = subprocess.Popen(
        [airflow, "dags", "test", "charllm_demo", "--conf", conf],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        killed = _kill_training_under(home / "work", 300)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    print(f"killed training pid {killed}; dags test exit {proc.returncode}")
    assert killed is not None, out[-6000:]
    assert proc.returncode != 0, out[-6000:]
    assert "some cells produced no result" in out, out[-6000:]
    attempts = Catalog(f"sqlite:///{home / 'catalog.db'}").attempts(cell_id=cell_id)
    print("attempts of the cell:", [(a.attempt, a.outcome, a.run_id) for a in attempts])
    assert [a.outcome for a in sorted(attempts, key=lambda a: a.attempt)] == ["ok", "timeout"]


def test_demo_end_to_end_sqlite(tmp_path):
    env, log = _run_demo(tmp_path, None)
    home = Path(env["CHARLLM_HOME"])
    _check_results(home, log)
    _rerun_submits_nothing(env, home)
    _figures_dag_created_unpaused(env)
    _forced_rerun_whose_job_dies_fails_the_run(env, home)


@pytest.mark.postgres
def test_demo_end_to_end_postgres_metadata(tmp_path, postgres_url):
    # Airflow's metadata in PostgreSQL: the same DAG, tasks and mapped groups on two of the cells
    # (the SQLite test runs all six; the cells themselves do not touch Airflow's database)
    env, log = _run_demo(tmp_path, postgres_url, conf='{"cells": "*dp1-mb2*"}')
    _check_results(Path(env["CHARLLM_HOME"]), log, n_cells=2)


def test_dry_run_with_cell_filter_renders_and_submits_nothing(tmp_path):
    env = _airflow_env(tmp_path, None)
    assert _airflow(env, "db", "migrate").returncode == 0
    run = _airflow(env, "dags", "test", "charllm_demo", "--conf", '{"dry_run": true, "cells": "*dp1-mb2*"}')
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-8000:]
    home = Path(env["CHARLLM_HOME"])
    scripts = sorted(p.parent.name for p in (home / "dry-run" / "demo").rglob("job.sbatch"))
    assert scripts == ["tiny-tp1pp1dp1-mb2-gb8-s64-00000-r0", "tiny-tp1pp1dp1-mb2-gb8-s64-01000-r0"]
    assert not (home / "work" / ".jobs").exists()
    assert "2 cell repeat(s) to run" in log
    # a filter that matches nothing fails the run at once and names the cells it could have matched
    run = _airflow(env, "dags", "test", "charllm_demo", "--conf", '{"cells": "*dp8*"}')
    log = run.stdout + run.stderr
    assert run.returncode != 0, log[-8000:]
    assert "matches no cell of campaign demo" in log and "tiny-tp1pp1dp1-mb2-gb8-s64-00000" in log, log[-8000:]
    assert not (home / "work" / ".jobs").exists()

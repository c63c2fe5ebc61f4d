"""``charllm run`` and the DAG go through one lifecycle: the same job states give the same outcomes.

Both drive the Slurm backend (transport ``local``) against a fake scheduler on PATH
(``tests/fake_slurm``: ``sbatch``, ``sacct``, ``squeue``, ``scancel``), each with its own
scheduler state, results home and catalog, on a six-cell campaign whose jobs end, one
submission after the other, as the scenario says: node failure, pre-emption, a lost job (each
then completes), a time limit, an out-of-memory cell and a cell whose every job meets a node
failure (the attempt budget runs out). The first two cell submissions are refused for a QOS
submit limit: waited out, never a failed cell. Both run with a limit of two jobs in flight.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from charllm.campaign import load_campaign
from charllm.catalog import Catalog
from tests.fake_slurm import fake_slurm

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.airflow

SCENARIO = {  # cell index -> end state of each submission
    0: ["NODE_FAIL", "COMPLETED"],
    1: ["PREEMPTED", "COMPLETED"],
    2: ["LOST", "COMPLETED"],
    3: ["TIMEOUT"],
    4: ["OOM"],
    5: ["NODE_FAIL"],  # every time: three attempts (the budget), then the cell fails as lost
}
EXPECTED = {  # cell index -> outcomes of its attempts, in order
    0: ["lost", "ok"],
    1: ["lost", "ok"],
    2: ["lost", "ok"],
    3: ["timeout"],
    4: ["oom"],
    5: ["lost", "lost", "lost"],
}


def _campaign(include: Path) -> Path:
    data = {
        "name": "parity",
        "description": "the lifecycle parity test",
        "cluster": {
            "name": "fake-cluster",
            "gpu_type": "cpu",
            "gpus_per_node": 2,
            "nodes": 1,
            "partition": "debug",
            "time_limit": "00:10:00",
            "poll_interval_s": 0.5,
            "env_dir": "charllm-env",
            "workdir": "cluster-work",  # under each side's own $HOME: two fake clusters
        },
        "backend": "slurm",
        "connection_id": "fake_cluster",
        "model": "tiny",
        "precision": "fp32",
        "steps": 4,
        "sweep": {"dp": [1, 2], "micro_batch": [1, 2, 4], "global_batch": [8], "seq_len": [64]},
    }
    path = include / "campaigns" / "parity.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _env(tmp: Path, include: Path, side: str, scenario: dict) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CHARLLM_"))}
    af = tmp / side / "airflow-home"
    af.mkdir(parents=True)
    (tmp / side / "login-home").mkdir()
    env.update(
        AIRFLOW_HOME=str(af),
        AIRFLOW__CORE__DAGS_FOLDER=str(tmp / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{af / 'airflow.db'}",
        CHARLLM_HOME=str(tmp / side / "home"),
        HOME=str(tmp / side / "login-home"),
        CHARLLM_INCLUDE=str(include),
        CHARLLM_SLURM_TRANSPORT="local",
        CHARLLM_SUBMIT_LIMIT_BACKOFF_S="0.5",
        CHARLLM_MAX_JOBS_IN_FLIGHT="2",
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    fake = fake_slurm.install(tmp / side / "bin", tmp / side / "slurm", scenario)
    env["FAKE_SLURM_DIR"] = fake["FAKE_SLURM_DIR"]
    env["PATH"] = f"{tmp / side / 'bin'}:{env['PATH']}"
    return env


def _attempts(home: Path, names: dict[str, str]) -> dict[str, list[str | None]]:
    rows = Catalog(f"sqlite:///{home / 'catalog.db'}").attempts(campaign="parity")
    out: dict[str, list[str | None]] = {}
    for a in rows:
        out.setdefault(names[a.cell_id], []).append(a.outcome)
    return out


def test_cli_and_dag_give_the_same_outcomes_for_the_same_job_states(tmp_path, include_tmp):
    path = _campaign(include_tmp)
    lc = load_campaign(path)
    assert len(lc.cells) == 6
    names = {c.cell_id: c.name for c in lc.cells}
    scenario = {
        "run_s": 1.0,
        "default": ["COMPLETED"],
        "by_cell": {lc.cells[i].cell_id: states for i, states in SCENARIO.items()},
        "refuse_cell_submits": 2,
    }
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "campaign_parity.py").write_text(
        '"""Airflow DAG."""\nfrom charllm.orchestrate.factory import campaign_dag\n\ndag = campaign_dag("parity.yaml")\n'
    )
    expected = {lc.cells[i].name: outcomes for i, outcomes in EXPECTED.items()}

    # the shell
    cli_env = _env(tmp_path, include_tmp, "cli", scenario)
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "charllm"), "run", str(path)],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    cli_log = cli.stdout + cli.stderr
    assert cli.returncode == 1, cli_log[-6000:]  # a timeout and a lost cell: the run reports failures
    cli_attempts = _attempts(tmp_path / "cli" / "home", names)
    assert cli_attempts == expected, cli_log[-6000:]
    assert "QOSMaxSubmitJobPerUserLimit" in cli_log  # waited out, then submitted

    # the UI's DAG, through a real Airflow
    dag_env = _env(tmp_path, include_tmp, "dag", scenario)
    airflow = str(Path(sys.executable).parent / "airflow")
    mig = subprocess.run([airflow, "db", "migrate"], env=dag_env, capture_output=True, text=True, timeout=300)
    assert mig.returncode == 0, mig.stdout[-3000:] + mig.stderr[-3000:]
    run = subprocess.run(
        [airflow, "dags", "test", "charllm_parity"], env=dag_env, capture_output=True, text=True, timeout=900
    )
    dag_log = run.stdout + run.stderr
    assert run.returncode != 0  # the verdict task fails the run: two cells have no result
    dag_attempts = _attempts(tmp_path / "dag" / "home", names)
    assert dag_attempts == expected, dag_log[-8000:]
    assert "some cells produced no result" in dag_log
    assert "QOSMaxSubmitJobPerUserLimit" in dag_log

    # the same jobs on both fake clusters: one environment job, then the cells' submissions
    for side in ("cli", "dag"):
        jobs = fake_slurm.jobs(tmp_path / side / "slurm")
        per_cell: dict[str, int] = {}
        for j in jobs:
            per_cell[j["cell"]] = per_cell.get(j["cell"], 0) + 1
        env_jobs = [c for c in per_cell if c.startswith("env")]
        assert len(env_jobs) == 1 and per_cell[env_jobs[0]] == 1, (side, per_cell)
        assert {names[c]: n for c, n in per_cell.items() if c in names} == {k: len(v) for k, v in expected.items()} | {
            lc.cells[5].name: 3
        }, side
        # never more than two cell jobs in flight at once (the catalog's limit, on both sides)
        spans = [(j["submit"], j["end"] or j["submit"]) for j in jobs if j["cell"] in names]
        most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
        assert most <= 2, (side, most)
    # and the same tables
    import pandas as pd

    for side in ("cli", "dag"):
        cells = pd.read_parquet(tmp_path / side / "home" / "tables" / "parity" / "cells.parquet")
        assert sorted(cells["outcome"]) == sorted(["ok", "ok", "ok", "timeout", "oom", "lost"]), side

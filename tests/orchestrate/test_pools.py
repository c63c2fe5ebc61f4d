"""The per-cluster pool: which tasks run in it, and the pool itself in Airflow's metadata database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from charllm.orchestrate.pools import pool_for, wanted_pools


def test_a_pool_only_where_a_cluster_limits_its_jobs(monkeypatch):
    monkeypatch.delenv("CHARLLM_MAX_JOBS_IN_FLIGHT", raising=False)
    assert pool_for(SimpleNamespace(name="h200-4x8")) is None
    assert pool_for(SimpleNamespace(name="h200-4x8", max_jobs_in_flight=None)) is None
    assert pool_for(SimpleNamespace(name="h200-4x8", max_jobs_in_flight=16)) == "charllm_h200-4x8"
    monkeypatch.setenv("CHARLLM_MAX_JOBS_IN_FLIGHT", "4")  # the override the catalog enforces too
    assert pool_for(SimpleNamespace(name="dev-cluster")) == "charllm_dev-cluster"


def test_cell_tasks_of_a_limited_cluster_run_in_its_pool(monkeypatch):
    from charllm.orchestrate.factory import campaign_dag

    monkeypatch.setenv("CHARLLM_MAX_JOBS_IN_FLIGHT", "3")
    dag = campaign_dag("demo_slurm.yaml")
    pools = {t.task_id: t.pool for t in dag.tasks}
    assert pools["cell.submit"] == pools["cell.wait"] == "charllm_dev-cluster"
    assert pools["cell.collect"] == pools["plan"] == "default_pool"
    monkeypatch.delenv("CHARLLM_MAX_JOBS_IN_FLIGHT")
    assert {t.pool for t in campaign_dag("demo_slurm.yaml").tasks} == {"default_pool"}


@pytest.mark.airflow
def test_sync_pools_makes_them_with_deferred_tasks_included(tmp_path, include_tmp, monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CHARLLM_"))}
    af = tmp_path / "airflow-home"
    env.update(
        AIRFLOW_HOME=str(af),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{af / 'airflow.db'}",
        CHARLLM_INCLUDE=str(include_tmp),
        CHARLLM_MAX_JOBS_IN_FLIGHT="5",
    )
    bin_dir = Path(sys.executable).parent
    assert subprocess.run([bin_dir / "airflow", "db", "migrate"], env=env, capture_output=True).returncode == 0
    res = subprocess.run([sys.executable, "-m", "charllm.orchestrate.pools"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    monkeypatch.setenv("CHARLLM_MAX_JOBS_IN_FLIGHT", "5")
    assert set(wanted_pools(include_tmp / "campaigns")) >= {"charllm_dev-cluster", "charllm_local-cpu"}
    got = subprocess.run(
        [bin_dir / "airflow", "pools", "get", "charllm_dev-cluster", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert got.returncode == 0, got.stderr
    [pool] = json.loads(got.stdout)
    assert int(pool["slots"]) == 5 and str(pool["include_deferred"]).lower() == "true", pool

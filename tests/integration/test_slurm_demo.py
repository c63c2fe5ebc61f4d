"""The demo campaign end to end on the Slurm backend, through a real Airflow, over real SSH.

The install stage builds the training environment on the cluster as a Slurm job (a venv
with the pinned packages and charllm's source) and a second run skips it; the cells run as
Slurm jobs; the task logs carry the Slurm job ids, nodes and the jobs' own output.

Each test run gets its own campaign name: the Slurm backend re-attaches to a job with the
same identity (campaign, cell, repeat, attempt) wherever one exists on the cluster, so a
second run with a fresh catalog would otherwise adopt the jobs of the run before it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.airflow]


def _include_copy(tmp: Path) -> tuple[Path, str]:
    """include/ with demo_slurm renamed for this run; returns (folder, campaign name)."""
    inc = tmp / "include"
    shutil.copytree(REPO / "include", inc)
    suffix = uuid.uuid4().hex[:8]
    name = f"demo_slurm_{suffix}"
    camp = inc / "campaigns" / "demo_slurm.yaml"
    text = camp.read_text()
    assert "\nname: demo_slurm\n" in text and "\ndataset:" not in text
    # the cells train on the shipped corpus, prepared on the cluster by the dataset job
    text = text.replace("\nname: demo_slurm\n", f"\nname: {name}\n") + (
        "\ndataset:\n  kind: indexed\n  tokenizer: bytes\n"
        f"  path: charllm-data-{suffix}\n  corpus: [data/corpus/distributed-training.txt]\n"
    )
    camp.write_text(text)
    return inc, name


def _env(tmp: Path, cluster_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    af = tmp / "airflow-home"
    af.mkdir(exist_ok=True)
    env.update(cluster_env)
    env.update(
        AIRFLOW_HOME=str(af),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{af / 'airflow.db'}",
        CHARLLM_HOME=str(tmp / "charllm-home"),
        CHARLLM_INCLUDE=str(tmp / "include"),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    return env


def _airflow(env: dict[str, str], *args: str) -> tuple[int, str]:
    p = subprocess.run([str(Path(sys.executable).parent / "airflow"), *args], env=env, capture_output=True,
                       text=True, timeout=1500)
    return p.returncode, p.stdout + p.stderr


def test_demo_campaign_on_slurm_through_airflow(tmp_path, dev_cluster):
    _, name = _include_copy(tmp_path)
    dag_id = f"charllm_{name}"
    env = _env(tmp_path, dev_cluster.env)
    rc, log = _airflow(env, "db", "migrate")
    assert rc == 0, log[-3000:]
    rc, log = _airflow(env, "dags", "test", dag_id)

    from charllm.catalog import Catalog

    home = Path(env["CHARLLM_HOME"])
    attempts = Catalog(f"sqlite:///{home / 'catalog.db'}").attempts(campaign=name)
    if rc != 0:  # say which cell failed and why before the log's tail
        ended = [f"{a.cell_id} r{a.repeat} a{a.attempt} job {a.job_id}: {a.outcome} {a.message}" for a in attempts]
        problems = [ln for ln in log.splitlines() if "[error" in ln or "FAILED" in ln or "ended " in ln]
        pytest.fail("DAG run failed\n" + "\n".join(ended) + "\n--- errors ---\n" + "\n".join(problems[-40:])
                    + "\n--- log tail ---\n" + log[-6000:])
    assert "charllm: environment ready" in log or "was built by job" in log
    # the dataset was tokenized and indexed by a Slurm job, whose output reached the log
    assert "dataset job" in log and "submitted (key" in log and "--- dataset job" in log
    assert len(attempts) == 4
    assert {a.outcome for a in attempts} == {"ok"}, [(a.outcome, a.message) for a in attempts]
    assert all(a.job_id and a.job_id.isdigit() for a in attempts)
    # the job's own output, the node and the Slurm job id reached the task logs
    assert "slurm job" in log and "nodes=" in log
    import pandas as pd

    cells = pd.read_parquet(home / "tables" / name / "cells.parquet")
    assert len(cells) == 4 and (cells["tokens_per_s"] > 0).all()
    assert set(cells["nodes"]) == {dev_cluster.env.get("CHARLLM_SLURM_NODE", "charllm-node0")}

    # a second run: the environment job is skipped and no cell is submitted again
    rc, log2 = _airflow(env, "dags", "test", dag_id)
    assert rc == 0, log2[-8000:]
    assert "skipped" in log2 and "0 cell repeat(s) to run" in log2
    assert "was prepared by job" in log2  # the dataset job is not run again
    assert len(Catalog(f"sqlite:///{home / 'catalog.db'}").attempts(campaign=name)) == 4

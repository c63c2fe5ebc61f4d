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
import signal
import subprocess
import sys
import time
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
    p = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), *args], env=env, capture_output=True, text=True, timeout=1500
    )
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
        pytest.fail(
            "DAG run failed\n"
            + "\n".join(ended)
            + "\n--- errors ---\n"
            + "\n".join(problems[-40:])
            + "\n--- log tail ---\n"
            + log[-6000:]
        )
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


def _wait_for_a_job_id(catalog_url: str, campaign: str, timeout_s: float) -> list[str]:
    """Poll the results catalog until some cell attempt of ``campaign`` has a Slurm job id."""
    from sqlalchemy.exc import OperationalError

    from charllm.catalog import Catalog

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ids = [a.job_id for a in Catalog(catalog_url).attempts(campaign=campaign) if a.job_id]
        except OperationalError:  # the catalog's tables are created by the DAG's first task
            ids = []
        if ids:
            return ids
        time.sleep(0.5)
    return []


def test_orchestrator_killed_mid_campaign_resumes_without_duplicate_jobs(tmp_path, dev_cluster):
    """SIGKILL the whole Airflow process group while cells run; a new run re-attaches.

    The cluster keeps running the jobs (they are batch jobs, not children of the SSH
    session); the next DAG run finds each cell's live or finished job by its identity,
    submits nothing twice, and records each result once.
    """
    inc = tmp_path / "include"
    shutil.copytree(REPO / "include", inc)
    name = f"demo_slurm_kill_{uuid.uuid4().hex[:8]}"
    camp = inc / "campaigns" / "demo_slurm.yaml"
    camp.write_text(camp.read_text().replace("\nname: demo_slurm\n", f"\nname: {name}\n"))
    dag_id = f"charllm_{name}"
    env = _env(tmp_path, dev_cluster.env)
    rc, log = _airflow(env, "db", "migrate")
    assert rc == 0, log[-3000:]
    catalog_url = f"sqlite:///{Path(env['CHARLLM_HOME']) / 'catalog.db'}"

    first_log = tmp_path / "first-run.log"
    with first_log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "dags", "test", dag_id],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            seen = _wait_for_a_job_id(catalog_url, name, timeout_s=900)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # scheduler, task code and triggers: all of it
            proc.wait(timeout=60)
    assert seen, "no cell was submitted before the deadline:\n" + first_log.read_text()[-4000:]
    print(f"killed the orchestrator with job(s) {seen} submitted")

    rc, log2 = _airflow(env, "dags", "test", dag_id)
    from charllm.catalog import Catalog

    attempts = Catalog(catalog_url).attempts(campaign=name)
    assert rc == 0, [(a.cell_id, a.attempt, a.outcome, a.message) for a in attempts] + [log2[-6000:]]
    assert "re-attach" in log2, log2[-6000:]
    # one attempt per cell, each with a result; the jobs seen before the kill are among them
    assert len(attempts) == 4 and {a.attempt for a in attempts} == {1}
    assert {a.outcome for a in attempts} == {"ok"}
    assert set(seen) <= {a.job_id for a in attempts}
    # the cluster ran exactly one job per cell attempt
    acct = dev_cluster.slurm("sacct", "-a", "-X", "-n", "-P", "-S", "now-1days", "-o", "JobName,JobID,State")
    jobs = [ln.split("|") for ln in acct.splitlines() if ln.startswith(f"charllm.{name}.")]
    names = [j[0] for j in jobs if ".data" not in j[0]]
    print("\n".join("|".join(j) for j in jobs))
    assert len(names) == 4 and len(set(names)) == 4, jobs
    import pandas as pd

    cells = pd.read_parquet(Path(env["CHARLLM_HOME"]) / "tables" / name / "cells.parquet")
    assert len(cells) == 4 and not cells.duplicated(["cell_id", "repeat"]).any()

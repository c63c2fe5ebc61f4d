"""Faults of one campaign on the real Slurm cluster, checked in one run to keep the suite short.

1. ``charllm run`` on the same cells while a DAG run has them in flight: the two share the
   results catalog and its reservations, so the shell re-attaches to the DAG's jobs (and the
   DAG to nothing of the shell's): one job per cell on the cluster, one attempt per cell.
2. sshd down, with every open session cut, for longer than a poll interval while jobs end:
   the DAG's waits and collects and the shell's polls and collects wait the outage out (the
   log tails are best effort); no task fails or is retried.
3. A fresh catalog next to the finished jobs: attempt numbers start at 1 again, but the jobs
   carry the old catalog's nonces, so the new run submits its own job and records its own
   outputs instead of adopting an old job's as a new measurement.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.airflow]
OUTAGE_MIN_S = 20  # the dev-cluster profile polls every 5 s


def _env(tmp: Path, cluster_env: dict[str, str], home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CHARLLM_"))}
    af = tmp / "airflow-home"
    af.mkdir(exist_ok=True)
    env.update(cluster_env)
    env.update(
        AIRFLOW_HOME=str(af),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{af / 'airflow.db'}",
        CHARLLM_HOME=str(home),
        CHARLLM_INCLUDE=str(tmp / "include"),
        CHARLLM_TRANSPORT_PATIENCE_S="900",
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    return env


def _cell_jobs(cluster, name: str) -> list[list[str]]:
    acct = cluster.slurm("sacct", "-a", "-X", "-n", "-P", "-S", "now-1days", "-o", "JobName,JobID,State")
    return [ln.split("|") for ln in acct.splitlines() if ln.startswith(f"charllm.{name}.")]


def _sessions(cluster) -> list[int]:
    """The dev cluster's open SSH sessions: the children of its sshd listener (one per connection)."""
    pid = (Path(cluster.env["CHARLLM_DEV_CLUSTER_DIR"]) / "run" / "sshd.pid").read_text().strip()
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", pid], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _outage(cluster) -> None:
    """sshd down and every open session with it (a network cut, a rebooted login node)."""
    sessions = _sessions(cluster)
    cluster.stop_daemon("sshd")
    for pid in sessions:  # the sessions the listener forked for the tests' own connections
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass


def _wait_until(pred, timeout_s: float, what: str, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


def test_cli_beside_the_dag_sshd_outage_and_a_fresh_catalog(tmp_path, dev_cluster):
    from charllm.catalog import Catalog

    inc = tmp_path / "include"
    shutil.copytree(REPO / "include", inc)
    name = f"demo_slurm_faults_{uuid.uuid4().hex[:8]}"
    camp = inc / "campaigns" / "demo_slurm.yaml"
    camp.write_text(camp.read_text().replace("\nname: demo_slurm\n", f"\nname: {name}\n"))
    home = tmp_path / "charllm-home"
    env = _env(tmp_path, dev_cluster.env, home)
    airflow = str(Path(sys.executable).parent / "airflow")
    charllm = str(Path(sys.executable).parent / "charllm")
    mig = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert mig.returncode == 0, mig.stdout[-3000:] + mig.stderr[-3000:]
    catalog_url = f"sqlite:///{home / 'catalog.db'}"

    def attempts():
        try:
            return Catalog(catalog_url).attempts(campaign=name)
        except Exception:  # the catalog is created by the DAG's first tasks
            return []

    dag_log, cli_log = tmp_path / "dag.log", tmp_path / "cli.log"
    with dag_log.open("w") as dout, cli_log.open("w") as cout:
        dag = subprocess.Popen(
            [airflow, "dags", "test", f"charllm_{name}"], env=env, stdout=dout, stderr=subprocess.STDOUT
        )
        cli = None
        sshd_down = False
        try:
            # 1. the DAG has cells in flight; the shell runs the same campaign beside it
            _wait_until(lambda: [a for a in attempts() if a.job_id], 900, "the DAG's first job")
            cli = subprocess.Popen([charllm, "run", str(camp)], env=env, stdout=cout, stderr=subprocess.STDOUT)
            # 2. sshd down while jobs run and end (sacct here, as root, needs no sshd)
            _wait_until(lambda: any(j[2] == "RUNNING" for j in _cell_jobs(dev_cluster, name)), 600, "a running job")
            _outage(dev_cluster)
            sshd_down = True
            t0 = time.monotonic()
            _wait_until(
                lambda: (
                    time.monotonic() - t0 > OUTAGE_MIN_S
                    and any(j[2] == "COMPLETED" for j in _cell_jobs(dev_cluster, name))
                ),
                300,
                "a job to end during the outage",
            )
            outage_s = time.monotonic() - t0
            dev_cluster.start_daemon("sshd")
            sshd_down = False
            print(f"sshd was down for {outage_s:.0f} s")
            dag_rc = dag.wait(timeout=1200)
            cli_rc = cli.wait(timeout=600)
        finally:
            if sshd_down:
                dev_cluster.start_daemon("sshd")
            for p in (dag, cli):
                if p is not None and p.poll() is None:
                    p.kill()
    dlog, clog = dag_log.read_text(), cli_log.read_text()
    rows = attempts()
    assert dag_rc == 0, [(a.cell_id, a.attempt, a.outcome, a.message) for a in rows] + [dlog[-6000:]]
    assert cli_rc == 0, clog[-4000:]
    # one attempt and one job per cell: the shell submitted nothing the DAG had in flight
    assert len(rows) == 4 and {a.attempt for a in rows} == {1} and {a.outcome for a in rows} == {"ok"}
    jobs = _cell_jobs(dev_cluster, name)
    print("\n".join("|".join(j) for j in jobs))
    assert len(jobs) == 4 and len({j[0] for j in jobs}) == 4, jobs
    assert {a.job_id for a in rows} == {j[1] for j in jobs}
    assert "(submitted)" not in clog, clog[-3000:]
    # the outage was waited out: reported, and no task failed or was retried for it
    for who, text in (("DAG", dlog), ("shell", clog)):
        # the runner's or poller's "unreachable", or the transport's own bounded retry (which may
        # absorb a short outage before the runner sees one: how long depends on the back-off's jitter)
        marks = ("unreachable", "not available", "failed (attempt")
        seen = [ln.split("] ", 1)[-1][:150] for ln in text.splitlines() if any(m in ln for m in marks)]
        print(f"the {who} waited the outage out:\n  " + "\n  ".join(seen))
        assert seen, text[-6000:]
    assert "UP_FOR_RETRY" not in dlog and "TransportError" not in dlog.replace("TransportError(", ""), dlog[-6000:]

    # 3. a fresh catalog beside the old jobs: a new job for the same cell, its own outputs
    cell = rows[0]
    from charllm.campaign import load_campaign

    lc = load_campaign(camp)
    cell_name = next(c.name for c in lc.cells if c.cell_id == cell.cell_id)
    home2 = tmp_path / "charllm-home-2"
    env2 = {**env, "CHARLLM_HOME": str(home2)}
    fresh = subprocess.run(
        [charllm, "run", str(camp), "--cells", cell_name], env=env2, capture_output=True, text=True, timeout=900
    )
    assert fresh.returncode == 0, (fresh.stdout + fresh.stderr)[-4000:]
    [new] = Catalog(f"sqlite:///{home2 / 'catalog.db'}").attempts(campaign=name)
    assert new.attempt == 1 and new.outcome == "ok"
    assert new.job_id not in {a.job_id for a in rows}, "the fresh catalog adopted an old job"
    assert new.nonce and new.nonce != cell.nonce
    import json

    manifest = json.loads((Path(new.result_dir) / "manifest.json").read_text())
    assert manifest["job_id"] == new.job_id
    jobs_after = _cell_jobs(dev_cluster, name)
    assert len(jobs_after) == 5 and len({j[0] for j in jobs_after}) == 5, jobs_after

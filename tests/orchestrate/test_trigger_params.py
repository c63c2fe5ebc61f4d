"""Trigger parameters through a real Airflow (``airflow dags test``), and a campaign at the cell cap.

An unknown key (a typo for ``cells``) and a cell filter that matches nothing fail the run in
``check_params``, before any other task runs. A 10,000-cell campaign plans and renders in one
task (a dry run maps nothing), and its plan's 10,000 items are accepted for mapping with
``max_map_length`` raised (a plan over the limit fails with a message that says what to set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.airflow


def _env(tmp: Path, include: Path, dags: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CHARLLM_"))}
    af = tmp / "airflow-home"
    af.mkdir(exist_ok=True)
    env.update(
        AIRFLOW_HOME=str(af),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{af / 'airflow.db'}",
        CHARLLM_HOME=str(tmp / "charllm-home"),
        CHARLLM_INCLUDE=str(include),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        **extra,
    )
    return env


def _airflow(env: dict[str, str], *args: str, timeout: int = 600) -> tuple[int, str]:
    p = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    return p.returncode, p.stdout + p.stderr


def _ran(log: str, task: str) -> bool:
    return f"[DAG TEST] running task <TaskInstance: charllm_demo.{task} " in log


def test_unknown_params_and_empty_cell_filters_are_refused_before_anything_runs(tmp_path, include_tmp):
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "campaign_demo.py").write_text(
        '"""Airflow DAG."""\nfrom charllm.orchestrate.factory import campaign_dag\ndag = campaign_dag("demo.yaml")\n'
    )
    env = _env(tmp_path, include_tmp, dags)
    rc, log = _airflow(env, "db", "migrate")
    assert rc == 0, log[-3000:]

    rc, log = _airflow(env, "dags", "test", "charllm_demo", "--conf", json.dumps({"cell": "*mb2*", "dry_run": True}))
    assert rc != 0
    assert "unknown trigger parameter(s): 'cell' (did you mean 'cells'?)" in log, log[-5000:]
    assert _ran(log, "check_params")
    for task in ("install.submit", "prepare_dataset", "plan", "aggregate", "verdict"):
        assert not _ran(log, task), task
    assert not (tmp_path / "charllm-home" / "dry-run").exists()

    rc, log = _airflow(
        env, "dags", "test", "charllm_demo", "--conf", json.dumps({"cells": "*nosuch*", "dry_run": True})
    )
    assert rc != 0
    assert "the filter '*nosuch*' matches no cell of campaign demo" in log, log[-5000:]
    assert "tiny-tp1pp1dp1-mb2-gb8-s64-00000" in log  # a few of the campaign's cell names
    assert not _ran(log, "install.submit") and not _ran(log, "plan")

    # more cell repeats than Airflow maps: plan fails and says what to set (`tasks test` exits 0 either way)
    _, log = _airflow({**env, "AIRFLOW__CORE__MAX_MAP_LENGTH": "3"}, "tasks", "test", "charllm_demo", "plan")
    assert "6 cell repeats to run, more than Airflow maps into one DAG run (max_map_length 3)" in log, log[-4000:]
    assert "AIRFLOW__CORE__MAX_MAP_LENGTH" in log and "new_state=failed" in log


CAP = 10_000


def _cap_campaign(include: Path) -> str:
    """A campaign of exactly 10,000 tiny cells (100 sequence lengths x 100 global batches)."""
    data = {
        "name": "cap",
        "cluster": "local-cpu",
        "model": "tiny",
        "precision": "fp32",
        "backend": "local",
        "steps": 2,
        "sweep": {
            "dp": [1],
            "micro_batch": [1],
            "seq_len": list(range(8, 208, 2)),
            "global_batch": list(range(1, 101)),
        },
    }
    (include / "campaigns" / "cap.yaml").write_text(yaml.safe_dump(data))
    return "cap.yaml"


def test_a_campaign_at_the_cell_cap_plans_renders_and_maps(tmp_path, include_tmp):
    from charllm.campaign import load_campaign

    src = _cap_campaign(include_tmp)
    assert len(load_campaign(include_tmp / "campaigns" / src).cells) == CAP
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "campaign_cap.py").write_text(
        f'"""Airflow DAG."""\nfrom charllm.orchestrate.factory import campaign_dag\ndag = campaign_dag("{src}")\n'
    )
    env = _env(tmp_path, include_tmp, dags, AIRFLOW__CORE__MAX_MAP_LENGTH="100000")
    rc, log = _airflow(env, "db", "migrate")
    assert rc == 0, log[-3000:]

    # the dry run: every cell planned and rendered in one task, nothing mapped
    t0 = time.monotonic()
    rc, log = _airflow(env, "dags", "test", "charllm_cap", "--conf", json.dumps({"dry_run": True}), timeout=900)
    wall = time.monotonic() - t0
    assert rc == 0, log[-6000:]
    assert f"{CAP} cell repeat(s) to run" in log and f"dry run: {CAP} job script(s) written" in log
    scripts = list((tmp_path / "charllm-home" / "dry-run" / "cap").rglob("job.sbatch"))
    assert len(scripts) == CAP
    print(f"dry run of {CAP} cells through airflow dags test: {wall:.1f} s")

    # the real plan's items: accepted for mapping at 10,000 (plan has mapped dependants, so its
    # XCom goes to the execution API with mapped_length=10000, checked against max_map_length)
    _, log = _airflow(env, "tasks", "test", "charllm_cap", "plan", timeout=900)
    assert f"{CAP} cell repeat(s) to run" in log and "Pushing xcom" in log, log[-6000:]
    assert "new_state=success" in log and "Task failed" not in log, log[-6000:]

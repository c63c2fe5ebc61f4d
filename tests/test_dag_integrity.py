"""DAG files: they import without error, stay light, and a broken campaign only breaks its own DAG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from charllm.campaign import discover

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "pandas", "matplotlib")


def _dagbag_report(dags_dir: Path, env_extra: dict[str, str]) -> dict:
    """Fill a real Airflow DagBag in a fresh interpreter; report DAG ids, import errors, heavy modules."""
    code = textwrap.dedent(
        f"""
        import json, sys
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag(dag_folder={str(dags_dir)!r})
        print("REPORT" + json.dumps({{
            "dags": sorted(bag.dags),
            "errors": {{k: str(v) for k, v in bag.import_errors.items()}},
            "heavy": [m for m in {HEAVY!r} if m in sys.modules],
            "tasks": {{d: sorted(bag.dags[d].task_ids) for d in bag.dags}},
        }}))
        """
    )
    env = {**os.environ, **env_extra, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("REPORT")), None)
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(line[len("REPORT") :])


def test_every_campaign_has_a_dag_file():
    dag_sources = "\n".join(p.read_text() for p in (REPO / "dags").glob("*.py"))
    for p in discover(REPO / "include" / "campaigns"):
        assert f'campaign_dag("{p.name}")' in dag_sources, f"no DAG file for {p.name}"


def test_repo_dags_import_cleanly_and_light(tmp_path):
    rep = _dagbag_report(REPO / "dags", {"AIRFLOW_HOME": str(tmp_path)})
    assert rep["errors"] == {}
    assert "charllm_demo" in rep["dags"]
    assert rep["heavy"] == [], f"DAG parsing imported {rep['heavy']}"
    tasks = rep["tasks"]["charllm_demo"]
    for t in (
        "install.submit",
        "install.wait",
        "prepare_dataset",
        "plan",
        "cell.submit",
        "cell.wait",
        "cell.collect",
        "aggregate",
        "verdict",
    ):
        assert t in tasks
    # every campaign has its figures DAG, which only draws
    campaigns = [d for d in rep["dags"] if not d.endswith("_figures")]
    assert sorted(f"{d}_figures" for d in campaigns) == sorted(d for d in rep["dags"] if d.endswith("_figures"))
    assert rep["tasks"]["charllm_demo_figures"] == ["visualize"]


def test_figures_dag_is_scheduled_on_the_tables_asset():
    from charllm.campaign import load_campaign
    from charllm.orchestrate.factory import figures_dag, tables_asset

    lc = load_campaign(REPO / "include" / "campaigns" / "demo.yaml")
    asset = tables_asset(lc.name)
    fig = figures_dag(lc, lc.source, asset)
    assert fig.dag_id == "charllm_demo_figures"
    assert list(fig.timetable.asset_condition.objects) == [asset]


def test_broken_campaign_is_an_import_error_and_others_still_load(tmp_path, include_tmp):
    dags = tmp_path / "dags"
    dags.mkdir()
    (include_tmp / "campaigns" / "broken.yaml").write_text(
        (include_tmp / "campaigns" / "demo.yaml").read_text().replace("name: demo", "name: broken")
        + "\nunexpected_field: 1\n"
    )
    for stem in ("demo", "broken"):
        (dags / f"campaign_{stem}.py").write_text(
            f'"""Airflow DAG."""\nfrom charllm.orchestrate.factory import campaign_dag\n\ndag = campaign_dag("{stem}.yaml")\n'
        )
    rep = _dagbag_report(dags, {"AIRFLOW_HOME": str(tmp_path), "CHARLLM_INCLUDE": str(include_tmp)})
    assert rep["dags"] == ["charllm_demo", "charllm_demo_figures"]
    [(path, err)] = rep["errors"].items()
    assert path.endswith("campaign_broken.py")
    assert "broken.yaml" in err and "unexpected_field" in err and "unknown field" in err


@pytest.mark.parametrize("stem", [p.stem for p in discover(REPO / "include" / "campaigns")])
def test_dag_params_form(stem):
    from charllm.orchestrate.factory import campaign_dag

    dag = campaign_dag(f"{stem}.yaml")
    assert set(dag.params.keys()) >= {"cells", "repeats", "dry_run", "force"}
    assert dag.catchup is False
    assert dag.default_args["retries"] >= 1


def test_cells_carry_their_names_and_figures_dags_start_unpaused(tmp_path):
    """wait and collect are labelled by cell (not 0, 1, 2); the figures DAG is created unpaused."""
    code = textwrap.dedent(
        f"""
        import json
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag(dag_folder={str(REPO / "dags")!r})
        d, f = bag.dags["charllm_demo"], bag.dags["charllm_demo_figures"]
        print("REPORT" + json.dumps({{
            "templates": {{t: d.get_task(t).map_index_template for t in ("cell.submit", "cell.wait", "cell.collect")}},
            "paused": [d.is_paused_upon_creation, f.is_paused_upon_creation],
        }}))
        """
    )
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("REPORT")), None)
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    rep = json.loads(line[len("REPORT") :])
    print(rep)
    assert all(rep["templates"].values()), rep["templates"]
    # the campaign DAG keeps Airflow's default (a nightly GPU campaign starts only when a person unpauses it)
    assert rep["paused"] == [None, False]

"""Build one Airflow DAG from one campaign file.

The DAG: ``install`` (submit -> wait) -> ``prepare_dataset`` -> ``plan`` -> one mapped task group per
cell repeat (``submit`` -> ``wait`` (deferrable) -> ``collect``) -> ``aggregate`` ->
``verdict``; ``aggregate`` updates the campaign's tables Asset, on which a second DAG,
``charllm_<name>_figures``, is scheduled to draw the figures and the report. Parsing it reads only the YAML file: no network, no
catalog, no torch/pandas/matplotlib. A broken campaign file raises ConfigError here, so
Airflow shows it as that DAG file's import error and every other campaign still loads.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, Param, TriggerRule, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from charllm.campaign import load_campaign
from charllm.orchestrate.operators import CellJobSensor, EnvironmentJobSensor, collect_cell, runner_for
from charllm.paths import campaigns_dir

log = logging.getLogger(__name__)

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "charllm",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
}


def _resolve(campaign_file: str | Path) -> Path:
    p = Path(campaign_file)
    if not p.is_absolute() and not p.exists():
        p = campaigns_dir() / p
    return p.resolve()


def dag_id_for(name: str) -> str:
    return f"charllm_{name}"


def tables_asset(name: str) -> Asset:
    """The campaign's results tables (cells, steps, per-GPU, telemetry) as an Airflow Asset.

    ``aggregate`` updates it after every sweep; the campaign's figures DAG is scheduled on it.
    """
    return Asset(name=f"charllm_tables_{name}", uri=f"charllm://tables/{name}", group="charllm")


def campaign_dag(campaign_file: str | Path) -> DAG:
    """The DAG of one campaign file (``include/campaigns/<file>`` if relative)."""
    path = _resolve(campaign_file)
    lc = load_campaign(path)
    camp = lc.campaign
    src = str(path)
    doc = (
        f"### Campaign `{camp.name}`\n\n{camp.description}\n\n"
        f"File: `{src}` · cluster `{lc.cluster.name}` ({lc.cluster.gpu_type}) · backend `{camp.backend}` · "
        f"{len(lc.cells)} cells x {camp.repeats} repeats.\n\n"
        "Trigger with the form to choose cells (glob over names or hash prefixes), repeats, a dry run "
        "(render job scripts only) or a forced re-run of cells that already have valid results."
    )
    with DAG(
        dag_id=dag_id_for(camp.name),
        description=(camp.description or f"charllm campaign {camp.name}")[:200],
        doc_md=doc,
        schedule=camp.schedule,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        tags=["charllm", camp.backend, lc.cluster.gpu_type, *camp.tags],
        params={
            "cells": Param(
                "*",
                type="string",
                title="Cells",
                description="Comma-separated globs over cell names, or cell-hash prefixes; * for all.",
            ),
            "repeats": Param(camp.repeats, type="integer", minimum=1, maximum=100, title="Repeats"),
            "dry_run": Param(
                False, type="boolean", title="Dry run", description="Render the job scripts only; submit nothing."
            ),
            "force": Param(
                False,
                type="boolean",
                title="Force re-run",
                description="Run cells again even if they already have valid results.",
            ),
            "append": Param(
                False,
                type="boolean",
                title="Append repeats",
                description="Re-measure: add Repeats new repeats of each selected cell (what a "
                "scheduled run does with the campaign's nightly cells).",
            ),
        },
        render_template_as_native_obj=True,
    ) as dag:
        tables = tables_asset(camp.name)

        @task(task_id="submit")
        def install_submit() -> dict[str, Any]:
            return runner_for(src).install()

        @task_group(group_id="install")
        def install() -> Any:
            job = install_submit()
            return EnvironmentJobSensor(task_id="wait", campaign_file=src, job=job)

        @task(task_id="prepare_dataset")
        def prepare_dataset() -> dict[str, Any]:
            if get_current_context()["params"].get("dry_run"):
                log.info("dry run: the dataset is not prepared")
                return {"dry_run": True}
            return runner_for(src).prepare_dataset()

        @task(task_id="plan")
        def plan() -> list[dict[str, Any]]:
            ctx = get_current_context()
            p = ctx["params"]
            runner = runner_for(src)
            run_type = str(getattr(ctx.get("dag_run"), "run_type", "") or "")
            if run_type.lower().endswith("scheduled"):  # a nightly run: re-measure the nightly subset
                log.info("scheduled run: %d new repeat(s) of cells %r", camp.nightly.repeats, camp.nightly.cells)
                items = runner.plan(camp.nightly.cells, camp.nightly.repeats, append=True)
            else:
                items = runner.plan(
                    p.get("cells"),
                    int(p.get("repeats") or camp.repeats),
                    bool(p.get("force")),
                    append=bool(p.get("append")),
                )
            log.info(
                "%d cell repeat(s) to run: %s", len(items), ", ".join(f"{i['name']}#r{i['repeat']}" for i in items)
            )
            return items

        @task(task_id="submit", map_index_template="{{ cell_label }}")
        def submit(item: dict[str, Any]) -> dict[str, Any] | None:
            ctx = get_current_context()
            ctx["cell_label"] = f"{item['name']} r{item['repeat']}"  # type: ignore[typeddict-unknown-key]
            runner = runner_for(src)
            if ctx["params"].get("dry_run"):
                dest = (
                    runner.home
                    / "dry-run"
                    / camp.name
                    / ctx["run_id"].replace(":", "_")
                    / f"{item['name']}-r{item['repeat']}"
                )
                script = runner.render(item["cell_id"], item["repeat"], dest)
                log.info("dry run: wrote %s", script)
                return None
            return runner.ensure_submitted(
                item["cell_id"], item["repeat"], ctx["run_id"], new=bool(item.get("force"))
            ).as_dict()

        @task(task_id="collect")
        def collect(waited: dict[str, Any] | None) -> dict[str, Any]:
            return collect_cell(src, waited)

        @task_group(group_id="cell")
        def cell(item: dict[str, Any]) -> Any:
            handle = submit(item)
            waited = CellJobSensor(task_id="wait", campaign_file=src, item=item, handle=handle)
            return collect(waited.output)  # type: ignore[arg-type]

        @task(task_id="aggregate", trigger_rule=TriggerRule.ALL_DONE, outlets=[tables])
        def aggregate() -> dict[str, Any]:
            ctx = get_current_context()
            if ctx["params"].get("dry_run"):
                raise AirflowSkipException("dry run: nothing to aggregate")
            info = runner_for(src).aggregate()
            # the figures DAG draws into a folder named after this run
            ctx["outlet_events"][tables].extra = {
                "run_id": ctx["run_id"],
                "rows": info.get("rows"),
                "outcomes": info.get("outcomes"),
            }
            return info

        @task(task_id="verdict", trigger_rule=TriggerRule.ALL_DONE)
        def verdict(planned: list[dict[str, Any]]) -> dict[str, int]:
            if get_current_context()["params"].get("dry_run"):
                log.info("dry run: %d job script(s) rendered, nothing submitted", len(planned))
                return {"rendered": len(planned)}
            counts = runner_for(src).outcomes_of(planned)
            log.info("outcomes of the %d planned cell repeat(s): %s", len(planned), counts)
            bad = {k: v for k, v in counts.items() if k not in ("ok", "oom")}
            if bad:
                raise AirflowFailException(f"some cells produced no result: {bad}; see their task groups")
            return counts

        items = plan()
        install() >> prepare_dataset() >> items
        cells = cell.expand(item=items)
        agg = aggregate()
        cells >> agg
        agg >> verdict(items)  # type: ignore[arg-type]
    figures_dag(lc, src, tables)
    return dag


def figures_dag(lc: Any, src: str, tables: Asset) -> DAG:
    """``charllm_<name>_figures``: scheduled on the campaign's tables Asset, draws figures and the report.

    A run triggered by ``aggregate`` draws into ``figures/<campaign>/<that run's id>``; a
    manual run redraws from the current tables into a folder named after itself.
    """
    camp = lc.campaign
    with DAG(
        dag_id=f"{dag_id_for(camp.name)}_figures",
        description=f"Figures and report of campaign {camp.name}, redrawn whenever its tables change"[:200],
        doc_md=(
            f"### Figures of campaign `{camp.name}`\n\nScheduled on the Asset `{tables.name}` "
            f"(updated by `{dag_id_for(camp.name)}.aggregate`). Campaign file: `{src}`."
        ),
        schedule=[tables],
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        tags=["charllm", "figures", *camp.tags],
    ) as dag:

        @task(task_id="visualize")
        def visualize() -> list[str]:
            ctx = get_current_context()
            run_id = ctx["run_id"]
            for events in (ctx.get("triggering_asset_events") or {}).values():
                for ev in events:
                    run_id = (ev.extra or {}).get("run_id") or run_id
            paths = runner_for(src).visualize(run_id)
            if not paths:
                raise AirflowSkipException("no results in the tables yet: nothing to draw")
            for p in paths:
                log.info("figure: %s", p)
            return paths

        visualize()
    return dag

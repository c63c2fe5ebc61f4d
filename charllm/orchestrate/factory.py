"""Build one Airflow DAG from one campaign file.

The DAG: ``check_params`` (a setup task: the trigger's parameters, before anything runs) ->
``install`` (submit -> wait) -> ``prepare_dataset`` -> ``plan`` -> one mapped task group per
cell repeat (``submit`` -> ``wait`` (deferrable) -> ``collect``) -> ``aggregate`` ->
``verdict``; ``aggregate`` updates the campaign's tables Asset, on which a second DAG,
``charllm_<name>_figures``, is scheduled to draw the figures and the report. Parsing it reads only the YAML file: no network, no
catalog, no torch/pandas/matplotlib. A broken campaign file raises ConfigError here, so
Airflow shows it as that DAG file's import error and every other campaign still loads.

Every task calls a step of :class:`charllm.runner.CampaignRunner` (the lifecycle ``charllm
run`` goes through too). A dry run renders every job script in ``plan`` and maps no cells.
A cluster profile with ``max_jobs_in_flight`` puts each cell's ``submit`` and ``wait`` into
the Airflow pool ``charllm_<cluster>`` (``include_deferred``; made by
``python -m charllm.orchestrate.pools``), so a campaign does not flood a shared queue; the
catalog enforces the same limit across DAG runs and ``charllm run``.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, AssetAlias, Param, TriggerRule, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from charllm.campaign import check_unique_name, load_campaign
from charllm.errors import CharllmError
from charllm.orchestrate.operators import CellJobSensor, EnvironmentJobSensor, collect_cell, runner_for, submit_cell
from charllm.orchestrate.pools import pool_for
from charllm.outcomes import Outcome
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


PARAM_NAMES = ("cells", "repeats", "dry_run", "force", "append")
DEFAULT_MAX_MAP_LENGTH = 1024  # Airflow's [core] max_map_length when nothing sets it


def check_params(conf: dict[str, Any], known: tuple[str, ...] = PARAM_NAMES) -> None:
    """Refuse trigger parameters the form does not have (a typo would otherwise run the whole campaign)."""
    import difflib

    unknown = sorted(set(conf) - set(known))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise AirflowFailException(
        f"unknown trigger parameter(s): {', '.join(hints)}; this DAG takes {', '.join(known)}. Nothing was run."
    )


def max_map_length() -> int:
    """Airflow's limit on mapped task instances (``[core] max_map_length``)."""
    try:
        from airflow.configuration import conf

        return conf.getint("core", "max_map_length", fallback=DEFAULT_MAX_MAP_LENGTH)
    except Exception:  # a task runtime without airflow-core's configuration: Airflow's default
        return int(__import__("os").environ.get("AIRFLOW__CORE__MAX_MAP_LENGTH", DEFAULT_MAX_MAP_LENGTH))


def tables_asset(name: str) -> Asset:
    """The campaign's results tables (cells, steps, per-GPU, telemetry) as an Airflow Asset.

    ``aggregate`` updates it after every sweep; the campaign's figures DAG is scheduled on it.
    """
    return Asset(name=f"charllm_tables_{name}", uri=f"charllm://tables/{name}", group="charllm")


def campaign_dag(campaign_file: str | Path) -> DAG:
    """The DAG of one campaign file (``include/campaigns/<file>`` if relative)."""
    path = _resolve(campaign_file)
    lc = load_campaign(path)
    check_unique_name(path, lc.name)  # two files, one name: both DAGs fail, each naming the other file
    camp = lc.campaign
    src = str(path)
    doc = (
        f"### Campaign `{camp.name}`\n\n{camp.description}\n\n"
        f"File: `{src}` · cluster `{lc.cluster.name}` ({lc.cluster.gpu_type}) · backend `{camp.backend}` · "
        f"{len(lc.cells)} cells x {camp.repeats} repeats.\n\n"
        "Trigger with the form to choose cells (glob over names or hash prefixes), repeats, a dry run "
        "(render job scripts only) or a forced re-run of cells that already have valid results."
    )
    pool = pool_for(lc.cluster)
    pool_args: dict[str, Any] = {"pool": pool} if pool else {}
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
        rerun_alias = AssetAlias(name=f"charllm_tables_rerun_{camp.name}", group="charllm")

        @task(task_id="check_params")
        def check_params_task() -> dict[str, Any]:
            ctx = get_current_context()
            dag_run = ctx.get("dag_run")
            conf = dict(getattr(dag_run, "conf", None) or {})
            check_params(conf)
            p = ctx["params"]
            from charllm.runner import select_cells

            try:
                cells = select_cells(lc, p.get("cells"))  # the campaign this DAG was parsed from
            except CharllmError as err:
                raise AirflowFailException(f"{err}. Nothing was run.") from err
            log.info("trigger parameters ok: %s; %d cell(s) selected", {k: p.get(k) for k in PARAM_NAMES}, len(cells))
            return {k: p.get(k) for k in PARAM_NAMES}

        @task(task_id="submit")
        def install_submit() -> dict[str, Any]:
            if get_current_context()["params"].get("dry_run"):
                log.info("dry run: the environment is not built")
                return {"skipped": True, "dry_run": True}
            return runner_for(src).install()

        @task_group(group_id="install")
        def install(checked: Any) -> Any:
            job = install_submit()
            checked >> job
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
            t0 = time.monotonic()
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
            shown = ", ".join(f"{i['name']}#r{i['repeat']}" for i in items[:50])
            more = f", ... ({len(items)} in all)" if len(items) > 50 else ""
            log.info("%d cell repeat(s) to run: %s%s", len(items), shown, more)
            log.info("planned in %.2f s (campaign loaded, cells registered, results looked up)", time.monotonic() - t0)
            if p.get("dry_run"):
                # one task renders them all: a dry run of 10,000 cells maps no task instances
                t1 = time.monotonic()
                dest = runner.home / "dry-run" / camp.name / ctx["run_id"].replace(":", "_")
                paths = runner.render_all(items, dest)
                log.info(
                    "dry run: %d job script(s) written under %s in %.2f s; nothing submitted",
                    len(paths),
                    dest,
                    time.monotonic() - t1,
                )
                return []
            limit = max_map_length()
            if len(items) > limit:
                raise AirflowFailException(
                    f"{len(items)} cell repeats to run, more than Airflow maps into one DAG run (max_map_length "
                    f"{limit}): set AIRFLOW__CORE__MAX_MAP_LENGTH (scripts/airflow-env.sh sets 100000), or run "
                    "part of the campaign with the Cells filter"
                )
            return items

        @task(task_id="submit", map_index_template="{{ cell_label }}", **pool_args)
        def submit(item: dict[str, Any]) -> dict[str, Any] | None:
            ctx = get_current_context()
            ctx["cell_label"] = f"{item['name']} r{item['repeat']}"  # type: ignore[typeddict-unknown-key]
            return submit_cell(src, item, ctx["run_id"])

        @task(task_id="collect", outlets=[rerun_alias], map_index_template="{{ cell_label }}")
        def collect(waited: dict[str, Any] | None) -> dict[str, Any]:
            ctx = get_current_context()
            ctx["cell_label"] = cell_label(src, waited)  # type: ignore[typeddict-unknown-key]
            summary = collect_cell(src, waited)
            reaggregate_after_rerun(src, tables, rerun_alias)
            return summary

        @task_group(group_id="cell")
        def cell(item: dict[str, Any]) -> Any:
            handle = submit(item)
            waited = CellJobSensor(
                task_id="wait",
                campaign_file=src,
                item=item,
                handle=handle,
                map_index_template="{{ task.item['name'] }} r{{ task.item['repeat'] }}",
                **pool_args,
            )
            return collect(waited.output)  # type: ignore[arg-type]

        @task(task_id="aggregate", trigger_rule=TriggerRule.ALL_DONE_SETUP_SUCCESS, outlets=[tables])
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

        @task(task_id="verdict", trigger_rule=TriggerRule.ALL_DONE_SETUP_SUCCESS)
        def verdict(planned: list[dict[str, Any]]) -> dict[str, int]:
            if get_current_context()["params"].get("dry_run"):
                log.info("dry run: job scripts rendered by plan, nothing submitted")
                return {"rendered": len(planned)}
            counts = runner_for(src).outcomes_of(planned, get_current_context()["run_id"])
            log.info("outcomes of the %d planned cell repeat(s): %s", len(planned), counts)
            bad = {k: v for k, v in counts.items() if not Outcome(k).is_result}
            if bad:
                raise AirflowFailException(f"some cells produced no result: {bad}; see their task groups")
            return counts

        checked = check_params_task().as_setup()
        items = plan()
        install(checked) >> prepare_dataset() >> items
        cells = cell.expand(item=items)
        agg = aggregate()
        cells >> agg
        agg >> verdict(items)  # type: ignore[arg-type]
    figures_dag(lc, src, tables)
    return dag


def cell_label(src: str, waited: dict[str, Any] | None) -> str:
    """``<cell name> r<repeat>`` for the map index of a cell's ``collect`` ("" where unknown)."""
    try:
        w = waited or {}
        # a waited job carries its handle's identity; a cell with a valid result, the attempt's summary
        ident = (w.get("handle") or {}).get("identity") or w
        return f"{runner_for(src).cell(ident['cell_id']).name} r{ident['repeat']}"
    except Exception:  # a label is cosmetic: never fail the task for it
        return ""


def reaggregate_after_rerun(src: str, tables: Asset, alias: AssetAlias) -> None:
    """A cell collected after its run's ``aggregate`` ran (its task group was cleared): update the tables.

    Clearing a task group in the UI does not clear the tasks downstream of it, so without
    this the tables (and the figures) would miss the rerun cell until ``aggregate`` was
    cleared on its own. The tables Asset gets an event (through ``alias``) so the figures
    DAG redraws; nothing happens while the run's first ``aggregate`` is still to come.
    """
    ctx = get_current_context()
    ti = ctx.get("ti")
    states: dict[str, Any] = {}
    try:
        got = ti.get_task_states(dag_id=ti.dag_id, task_ids=["aggregate"], run_ids=[ctx["run_id"]])  # type: ignore[union-attr]
        states = dict(got.get(ctx["run_id"], {}))
    except Exception as err:  # an Airflow without this call: the first aggregate covers the cell
        log.debug("cannot read the state of aggregate: %s", err)
        return
    if states.get("aggregate") not in ("success", "failed", "skipped", "upstream_failed"):
        return
    log.info("this run's aggregate already ran (%s): updating the tables with this cell", states["aggregate"])
    info = runner_for(src).aggregate()
    ctx["outlet_events"][alias].add(
        tables, extra={"run_id": ctx["run_id"], "rows": info.get("rows"), "outcomes": info.get("outcomes")}
    )


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
        # unpaused: it only reacts to the campaign's own tables events (cheap, no GPUs). Paused,
        # as Airflow creates DAGs, it dropped every event until a person unpaused it, and the
        # events missed meanwhile are not replayed: a run triggered from the UI drew no figures
        is_paused_upon_creation=False,
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

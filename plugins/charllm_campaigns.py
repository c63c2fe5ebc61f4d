"""The charllm campaign view in Airflow's UI: an Airflow 3 plugin.

- a FastAPI app mounted at ``/charllm`` (``fastapi_apps``) that serves the pages, the figures,
  the attempt folders, a JSON matrix and the re-run actions;
- an external view on every DAG page (``destination: "dag"``, the tab "Campaign") showing
  ``/charllm/dags/<dag id>``, and a top-level "Campaigns" entry of the navigation.

Plugin apps are not protected by Airflow by default: every route here depends on Airflow's
own security dependency ``requires_access_dag`` (through ``get_user``), so a request needs the
user's JWT (the UI's ``_token`` cookie or a bearer token) and the user's permission on the
campaign's DAG (reading DAGs at all for the list of campaigns, which shows only the readable). The re-run actions clear
task instances through Airflow's REST API (``POST /api/v2/dags/{dag_id}/clearTaskInstances``)
with the user's own token: Airflow checks its permissions a second time there.

What is shown (catalog, tables, figures) is read by :mod:`charllm.ui.data`, drawn by
:mod:`charllm.ui.render`; this module adds what only Airflow knows: DAG runs, task instance
states, the ``plan`` task's list of cell repeats (the map index of each), next run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from sqlalchemy import select

from charllm.ui import data
from charllm.ui.render import IndexItem, Links, RunView, campaign_page, folder_page, index_page, not_campaign_page

log = logging.getLogger(__name__)

PREFIX = "/charllm"
_ACTIVE = {"queued", "scheduled", "running", "deferred", "up_for_retry", "up_for_reschedule", "restarting"}
_FAILED = {"failed", "upstream_failed"}

DagIdParam = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_.-]{1,250}$")]
RunIdParam = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,249}$")]
CellIdParam = Annotated[str, PathParam(pattern=r"^[0-9a-f]{8,64}$")]
RepeatParam = Annotated[int, PathParam(ge=0, le=100000)]

app = FastAPI(title="charllm campaigns", docs_url=None, redoc_url=None, openapi_url=None)

_catalog: Any = None


def _get_catalog() -> Any:
    global _catalog
    if _catalog is None:
        from charllm.catalog import Catalog

        _catalog = Catalog()
    return _catalog


def _links(request: Request) -> Links:
    root = str(request.scope.get("root_path", "") or "")
    airflow_root = root[: -len(PREFIX)] if root.endswith(PREFIX) else ""
    return Links(plugin=root.rstrip("/") + "/", airflow=airflow_root.rstrip("/") + "/")


def _html(text: str) -> HTMLResponse:
    return HTMLResponse(
        text,
        headers={
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'; frame-ancestors 'self'",
        },
    )


def _campaign_or_404(dag_id: str) -> str:
    name = data.campaign_of_dag(dag_id)
    if name is None or name not in data.known_campaigns(_get_catalog()):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no campaign for DAG {dag_id!r}")
    return name


def _may(user: Any, method: str, dag_id: str, entity: DagAccessEntity | None = None) -> bool:
    try:
        return bool(
            get_auth_manager().is_authorized_dag(
                method=method,  # type: ignore[arg-type]
                access_entity=entity,
                details=DagDetails(id=dag_id),
                user=user,
            )
        )
    except Exception:  # an auth manager that cannot decide: no
        return False


# -- what Airflow knows about a campaign's DAG -------------------------------------------------------


def _runs(session: Any, dag_id: str, limit: int = 25) -> list[Any]:
    from airflow.models.dagrun import DagRun

    return list(session.scalars(select(DagRun).where(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).limit(limit)))


def _plans(session: Any, dag_id: str, run_ids: list[str]) -> dict[str, dict[tuple[str, int], int]]:
    """run id -> (cell id, repeat) -> map index, from each run's ``plan`` XCom."""
    from airflow.models.xcom import XComModel

    if not run_ids:
        return {}
    out: dict[str, dict[tuple[str, int], int]] = {}
    rows = session.execute(
        select(XComModel.run_id, XComModel.value).where(
            XComModel.dag_id == dag_id,
            XComModel.run_id.in_(run_ids),
            XComModel.task_id == "plan",
            XComModel.key == "return_value",
            XComModel.map_index == -1,
        )
    ).all()
    for run_id, value in rows:
        out[run_id] = data.plan_index(XComModel.deserialize_value(type("X", (), {"value": value})()))
    return out


def _cell_states(session: Any, dag_id: str, run_ids: list[str]) -> dict[str, dict[int, list[str]]]:
    """run id -> map index -> the states of that cell repeat's task instances."""
    from airflow.models.taskinstance import TaskInstance

    out: dict[str, dict[int, list[str]]] = {}
    if not run_ids:
        return out
    rows = session.execute(
        select(TaskInstance.run_id, TaskInstance.map_index, TaskInstance.state).where(
            TaskInstance.dag_id == dag_id,
            TaskInstance.run_id.in_(run_ids),
            TaskInstance.task_id.in_(data.CELL_TASKS),
        )
    ).all()
    for run_id, idx, state in rows:
        out.setdefault(run_id, {}).setdefault(int(idx), []).append(
            str(state.value if hasattr(state, "value") else state)
        )
    return out


def _summarise(states: list[str]) -> str | None:
    if not states:
        return None
    for s in ("running", "deferred", "queued", "scheduled", "up_for_retry", "restarting", "up_for_reschedule"):
        if s in states:
            return s
    for s in ("failed", "upstream_failed"):
        if s in states:
            return s
    if all(s == "success" for s in states):
        return "success"
    return states[-1]


def _airflow_view(session: Any, dag_id: str, matrix: data.Matrix) -> list[RunView]:
    """Fill the matrix's Airflow fields (run, map index, task state); the run list with its failed cells."""
    runs = _runs(session, dag_id)
    run_ids = [r.run_id for r in runs]
    plans = _plans(session, dag_id, run_ids)
    states = _cell_states(session, dag_id, run_ids)
    live_runs = {r.run_id for r in runs if str(getattr(r.state, "value", r.state)) in ("queued", "running")}
    for e in matrix.entries():
        run = e.run_id if e.run_id in plans and e.key in plans[e.run_id] else None
        if run is None:
            run = next((rid for rid in run_ids if e.key in plans.get(rid, {})), None)
        if run is None:
            continue
        e.link_run = run
        e.map_index = plans[run][e.key]
        e.ti_state = _summarise(states.get(run, {}).get(e.map_index, []))
        if e.status == "not run" and e.ti_state in _ACTIVE and run in live_runs:
            e.status = "running"
    views = []
    for r in runs:
        plan = plans.get(r.run_id, {})
        failed = []
        for key, idx in sorted(plan.items(), key=lambda kv: kv[1]):
            ent = matrix.entry(*key)
            ti = _summarise(states.get(r.run_id, {}).get(idx, []))
            if ent is not None and (ent.status == "failed" or (ent.status == "not run" and ti in _FAILED)):
                failed.append(key)
        views.append(
            RunView(
                run_id=r.run_id,
                run_type=str(getattr(r.run_type, "value", r.run_type)),
                state=str(getattr(r.state, "value", r.state)),
                when=r.start_date or r.run_after or r.logical_date,
                planned=len(plan),
                failed=failed,
            )
        )
    return views


def _next_run(session: Any, dag_id: str) -> tuple[str | None, bool]:
    from airflow.models.dag import DagModel

    dm = session.scalar(select(DagModel).where(DagModel.dag_id == dag_id))
    if dm is None:
        return None, False
    nxt = getattr(dm, "next_dagrun_run_after", None) or getattr(dm, "next_dagrun", None)
    return (nxt.strftime("%Y-%m-%d %H:%M UTC") if nxt else None), bool(dm.is_paused)


def _matrix(name: str) -> tuple[data.CampaignInfo, data.Matrix]:
    cat = _get_catalog()
    info = data.campaign_info(name)
    matrix = data.build_matrix(
        info,
        data.catalog_attempts(cat, name),
        data.read_cells_table(name),
        catalog_names=data.catalog_cells(cat, name),
    )
    return info, matrix


# -- pages ------------------------------------------------------------------------------------


@app.get("/", dependencies=[Depends(requires_access_dag("GET"))])
def index(request: Request, user: GetUserDep) -> HTMLResponse:
    """Every campaign the user may read, with its outcome counts."""
    items = []
    for name in data.known_campaigns(_get_catalog()):
        if not _may(user, "GET", data.dag_id_for(name)):
            continue
        info, matrix = _matrix(name)
        items.append(
            IndexItem(
                info=info,
                cells=len(matrix.rows),
                counts=matrix.counts,
                source=matrix.source,
                figures=len(data.figure_runs(name)),
            )
        )
    cat_url = str(_get_catalog().url)
    shown = cat_url.split("@")[-1] if "@" in cat_url else cat_url  # never a password
    return _html(index_page(items, _links(request), shown))


@app.get("/dags/{dag_id}", dependencies=[Depends(requires_access_dag("GET"))])
def campaign(
    request: Request, dag_id: DagIdParam, user: GetUserDep, session: SessionDep, figures: str | None = None
) -> Response:
    """The campaign's matrix, DAG runs, figures and reference checks."""
    links = _links(request)
    name = data.campaign_of_dag(dag_id)
    if name is not None and name.endswith(data.FIGURES_SUFFIX):
        base = name[: -len(data.FIGURES_SUFFIX)]
        if base in data.known_campaigns(_get_catalog()):  # the figures DAG: show its campaign
            name, dag_id = base, data.dag_id_for(base)
            if not _may(user, "GET", dag_id):
                raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden")
    if name is None or name not in data.known_campaigns(_get_catalog()):
        return _html(not_campaign_page(dag_id, links))
    info, matrix = _matrix(name)
    runs = _airflow_view(session, dag_id, matrix)
    fig_runs = data.figure_runs(name)
    chosen = fig_runs[0] if fig_runs else None
    if figures is not None:
        chosen = next((r for r in fig_runs if r.name == figures), None)
        if chosen is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such figures run")
    report = data.read_report(name, chosen.name) if chosen else None
    recorded = next((r for r in fig_runs if r.recorded), None)
    note = None
    if matrix.source == "tables" and recorded is not None:
        rep = data.read_report(name, recorded.name)
        note = next((line for line in (rep.intro if rep else []) if "ecorded" in line), None)
    next_run, paused = _next_run(session, dag_id)
    figures_paused = _next_run(session, f"{dag_id}_figures")[1]
    page = campaign_page(
        info=info,
        matrix=matrix,
        links=links,
        runs=runs,
        fig_runs=fig_runs,
        chosen=chosen,
        report=report,
        can_edit=_may(user, "PUT", dag_id, DagAccessEntity.TASK_INSTANCE),
        next_run=next_run,
        paused=paused,
        figures_paused=figures_paused,
        recorded_note=note.replace("**", "") if note else None,
    )
    return _html(page)


@app.get("/dags/{dag_id}/matrix.json", dependencies=[Depends(requires_access_dag("GET"))])
def matrix_json(dag_id: DagIdParam, session: SessionDep) -> JSONResponse:
    """The matrix as JSON: every cell x repeat with its outcome, attempt, DAG run, map index and metrics."""
    name = _campaign_or_404(dag_id)
    _info, matrix = _matrix(name)
    runs = _airflow_view(session, dag_id, matrix)
    body = matrix.as_dict()
    body["runs"] = [
        {"run_id": r.run_id, "state": r.state, "run_type": r.run_type, "planned": r.planned, "failed": r.failed}
        for r in runs
    ]
    body["figures"] = [r.name for r in data.figure_runs(name)]
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@app.get("/dags/{dag_id}/figures/{run}/{filename}", dependencies=[Depends(requires_access_dag("GET"))])
def figure(dag_id: DagIdParam, run: str, filename: str) -> FileResponse:
    """One file of a figures run: only a name that the run's folder listing has."""
    name = _campaign_or_404(dag_id)
    p = data.figure_file(name, run, filename)
    if p is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such figure")
    media = {".png": "image/png", ".pdf": "application/pdf", ".csv": "text/csv", ".md": "text/markdown"}[p.suffix]
    return FileResponse(p, media_type=media, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


def _attempt_or_404(name: str, cell_id: str, repeat: int, attempt: int) -> tuple[data.AttemptView, Path]:
    a = data.attempt_of(data.catalog_attempts(_get_catalog(), name), cell_id, repeat, attempt)
    if a is None or not a.result_dir or not Path(a.result_dir).is_dir():
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such attempt folder")
    return a, Path(a.result_dir)


@app.get(
    "/dags/{dag_id}/attempts/{cell_id}/{repeat}/{attempt}/",
    dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.TASK_LOGS))],
)
def attempt_folder(
    request: Request, dag_id: DagIdParam, cell_id: CellIdParam, repeat: RepeatParam, attempt: RepeatParam
) -> HTMLResponse:
    """The files of one attempt folder (manifest, logs, outputs)."""
    name = _campaign_or_404(dag_id)
    a, root = _attempt_or_404(name, cell_id, repeat, attempt)
    info = data.campaign_info(name)
    cell_name = dict(info.cells).get(cell_id) or data.catalog_cells(_get_catalog(), name).get(cell_id, cell_id)
    return _html(
        folder_page(
            links=_links(request),
            dag_id=dag_id,
            campaign=name,
            name=cell_name,
            cell_id=cell_id,
            repeat=repeat,
            attempt=attempt,
            outcome=a.outcome,
            state=a.state,
            job_id=a.job_id,
            run_id=a.run_id,
            message=a.message,
            folder=str(root),
            files=data.list_files(root),
        )
    )


@app.get(
    "/dags/{dag_id}/attempts/{cell_id}/{repeat}/{attempt}/files/{rel:path}",
    dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.TASK_LOGS))],
)
def attempt_file(
    dag_id: DagIdParam, cell_id: CellIdParam, repeat: RepeatParam, attempt: RepeatParam, rel: str
) -> Response:
    """One file of an attempt folder, as plain text (or a download for binary files)."""
    name = _campaign_or_404(dag_id)
    _a, root = _attempt_or_404(name, cell_id, repeat, attempt)
    p = data.attempt_file(root, rel)
    if p is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such file in the attempt folder")
    text_like = p.suffix in {".json", ".csv", ".txt", ".log", ".sbatch", ".sh", ".out", ".err", ".md", ".yaml", ""}
    headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'"}
    if text_like:
        return FileResponse(p, media_type="text/plain; charset=utf-8", headers=headers)
    return FileResponse(p, media_type="application/octet-stream", filename=p.name, headers=headers)


# -- actions ----------------------------------------------------------------------------------------


def _user_token(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.cookies.get(COOKIE_NAME_JWT_TOKEN, "")


def _api_root(request: Request) -> str:
    configured = os.environ.get("CHARLLM_UI_API_URL")
    if configured:
        return configured.rstrip("/")
    root = str(request.scope.get("root_path", "") or "")
    airflow_root = root[: -len(PREFIX)] if root.endswith(PREFIX) else ""
    return f"{request.url.scheme}://{request.url.netloc}{airflow_root}".rstrip("/")


def _clear(request: Request, dag_id: str, run_id: str, task_ids: list[Any], paused: bool = False) -> JSONResponse:
    """Clear task instances of one DAG run through Airflow's REST API, as the requesting user."""
    import httpx

    url = f"{_api_root(request)}/api/v2/dags/{quote(dag_id, safe='')}/clearTaskInstances"
    body = {
        "dry_run": False,
        "dag_run_id": run_id,
        "task_ids": task_ids,
        "only_failed": False,
        "reset_dag_runs": True,
        "include_upstream": False,
        "include_downstream": False,
    }
    try:
        r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {_user_token(request)}"}, timeout=60)
    except httpx.HTTPError as err:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"Airflow's REST API did not answer: {err}")
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise HTTPException(r.status_code, f"clearTaskInstances refused: {detail}")
    tis = r.json().get("task_instances", [])
    log.info("cleared %d task instance(s) of %s %s: %s", len(tis), dag_id, run_id, task_ids)
    return JSONResponse(
        {
            "dag_id": dag_id,
            "dag_run_id": run_id,
            "task_ids": task_ids,
            "cleared": len(tis),
            "dag_paused": paused,  # a paused DAG's runs wait: the scheduler runs them once it is unpaused
            "task_instances": [
                {"task_id": t.get("task_id"), "map_index": t.get("map_index"), "state": t.get("state")} for t in tis
            ],
        }
    )


def _run_plan_or_404(session: Any, dag_id: str, run_id: str) -> dict[tuple[str, int], int]:
    from airflow.models.dagrun import DagRun

    if session.scalar(select(DagRun.id).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such DAG run")
    plan = _plans(session, dag_id, [run_id]).get(run_id)
    if not plan:
        raise HTTPException(
            status.HTTP_409_CONFLICT, "that run has no list of planned cells (its plan task did not run)"
        )
    return plan


_EDIT = Depends(requires_access_dag("PUT", DagAccessEntity.TASK_INSTANCE))


@app.post("/dags/{dag_id}/runs/{run_id}/cells/{cell_id}/{repeat}/rerun", dependencies=[_EDIT])
def rerun_cell(
    request: Request,
    dag_id: DagIdParam,
    run_id: RunIdParam,
    cell_id: CellIdParam,
    repeat: RepeatParam,
    session: SessionDep,
) -> JSONResponse:
    """Re-run one cell repeat of a DAG run: clear exactly its mapped instances (then aggregate and verdict)."""
    _campaign_or_404(dag_id)
    plan = _run_plan_or_404(session, dag_id, run_id)
    idx = plan.get((cell_id, repeat))
    if idx is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "that cell repeat is not planned in this run")
    return _clear(request, dag_id, run_id, data.clear_targets([idx]), paused=_next_run(session, dag_id)[1])


@app.post("/dags/{dag_id}/runs/{run_id}/rerun-failed", dependencies=[_EDIT])
def rerun_failed(request: Request, dag_id: DagIdParam, run_id: RunIdParam, session: SessionDep) -> JSONResponse:
    """Re-run every cell repeat of a DAG run that has no result (failed, timeout, cancelled, lost, or its tasks failed)."""
    name = _campaign_or_404(dag_id)
    plan = _run_plan_or_404(session, dag_id, run_id)
    _info, matrix = _matrix(name)
    runs = _airflow_view(session, dag_id, matrix)
    view = next((r for r in runs if r.run_id == run_id), None)
    failed = view.failed if view is not None else []
    if not failed:
        return JSONResponse(
            {"dag_id": dag_id, "dag_run_id": run_id, "task_ids": [], "cleared": 0, "task_instances": []}
        )
    return _clear(
        request, dag_id, run_id, data.clear_targets(plan[k] for k in failed), paused=_next_run(session, dag_id)[1]
    )


class CharllmCampaignsPlugin(AirflowPlugin):
    """The campaign view: a tab on each DAG page and a "Campaigns" entry in the navigation."""

    name = "charllm_campaigns"
    fastapi_apps = [{"app": app, "url_prefix": PREFIX, "name": "charllm campaigns"}]
    external_views = [
        {
            "name": "Campaigns",
            "href": "charllm/",
            "destination": "nav",
            "url_route": "campaigns",
            "nav_top_level": True,
        },
        {
            "name": "Campaign",
            "href": "charllm/dags/{DAG_ID}",
            "destination": "dag",
            "url_route": "campaign",
        },
    ]

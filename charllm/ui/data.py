"""What the campaign view shows, read from the results catalog, the tables and the figures folders.

Every name that arrives with a request (a campaign, a figures run, a figure file, a cell id,
a file of an attempt folder) is checked twice: against a strict pattern, and against what
exists (the campaign files, the catalog, the folder listings). A path is only ever built
from names found in a listing, never from the request's text.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charllm.definitions import as_float as _num
from charllm.outcomes import IN_FLIGHT_STATES
from charllm.paths import campaigns_dir, home

log = logging.getLogger(__name__)

DAG_PREFIX = "charllm_"
FIGURES_SUFFIX = "_figures"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}\Z")
FIGURE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}\.(?:png|pdf|csv|md)\Z")
FILE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}\Z")

# the matrix's outcome classes, in the order of the legend
# outcomes that are results of the cell (charllm.outcomes.RESULT_OUTCOMES), best first
RESULT_WORDS = ("ok", "oom", "skipped")
STATUSES = ("ok", "oom", "skipped", "failed", "running", "not run")
_LIVE_STATES = tuple(str(s) for s in IN_FLIGHT_STATES)  # reserved, submitted, running, job_ended

# (column of cells.parquet, label, unit, scale): the key metrics of a cell repeat
METRICS: tuple[tuple[str, str, str, float], ...] = (
    ("step_time_median_s", "step time", "s", 1.0),
    ("tokens_per_s_per_gpu", "tokens/s/GPU", "", 1.0),
    ("mfu", "MFU", "%", 100.0),
    ("energy_per_token_j", "energy/token", "mJ", 1000.0),
    ("peak_gpu_temp_c", "peak temp", "°C", 1.0),
)

# the figures in the order the view shows them (others follow by name)
FIGURE_ORDER = (
    "throughput",
    "loss",
    "drift",
    "pareto",
    "fig4_parallelism",
    "fig8_optimisations",
    "fig13_microbatch",
    "heatmap_temperature",
    "heatmap_links",
    "fig15_kernels",
)

# the task ids of one cell repeat (a mapped task group); a re-run cell's collect updates the tables itself
CELL_TASKS = ("cell.submit", "cell.wait", "cell.collect")


def campaign_of_dag(dag_id: str) -> str | None:
    """The campaign name of ``charllm_<name>`` (or of its figures DAG); None for other DAGs."""
    if not isinstance(dag_id, str) or not dag_id.startswith(DAG_PREFIX):
        return None
    name = dag_id[len(DAG_PREFIX) :]
    return name if SAFE_NAME.match(name) else None


def dag_id_for(campaign: str) -> str:
    return f"{DAG_PREFIX}{campaign}"


# -- campaign files -----------------------------------------------------------------------


@dataclass(frozen=True)
class CampaignInfo:
    """What the campaign file says (empty fields when the campaign has no file here)."""

    name: str
    description: str = ""
    source: str | None = None
    schedule: str | None = None
    nightly_cells: str = "*"
    nightly_repeats: int = 1
    repeats: int = 1
    backend: str = ""
    cluster: str = ""
    gpu_type: str = ""
    cells: tuple[tuple[str, str], ...] = ()  # (cell id, name), in the file's order
    error: str | None = None

    @property
    def dag_id(self) -> str:
        return dag_id_for(self.name)


_lock = threading.Lock()
_files_cache: dict[str, tuple[tuple[tuple[str, float], ...], dict[str, Path]]] = {}
_info_cache: dict[str, tuple[float, CampaignInfo]] = {}


def campaign_files(directory: Path | None = None) -> dict[str, Path]:
    """Campaign name -> its file in the campaigns folder (files that do not parse are left out)."""
    from charllm.campaign import discover, read_yaml
    from charllm.errors import ConfigError

    d = directory or campaigns_dir()
    if not d.is_dir():
        return {}
    paths = discover(d)
    key = tuple((str(p), p.stat().st_mtime) for p in paths)
    with _lock:
        hit = _files_cache.get(str(d))
        if hit and hit[0] == key:
            return dict(hit[1])
    out: dict[str, Path] = {}
    for p in paths:
        try:
            name = read_yaml(p).get("name")
        except ConfigError:
            continue
        if isinstance(name, str) and SAFE_NAME.match(name) and name not in out:
            out[name] = p
    with _lock:
        _files_cache[str(d)] = (key, out)
    return dict(out)


def campaign_info(name: str, directory: Path | None = None) -> CampaignInfo:
    """The campaign file's settings and cells; a bare info when there is no such file."""
    from charllm.campaign import load_campaign
    from charllm.errors import ConfigError

    path = campaign_files(directory).get(name)
    if path is None:
        return CampaignInfo(name=name)
    mtime = path.stat().st_mtime
    with _lock:
        hit = _info_cache.get(str(path))
        if hit and hit[0] == mtime:
            return hit[1]
    try:
        lc = load_campaign(path, check=False)
    except ConfigError as err:
        info = CampaignInfo(name=name, source=str(path), error=str(err))
    else:
        camp = lc.campaign
        info = CampaignInfo(
            name=name,
            description=camp.description,
            source=str(path),
            schedule=camp.schedule,
            nightly_cells=camp.nightly.cells,
            nightly_repeats=camp.nightly.repeats,
            repeats=camp.repeats,
            backend=camp.backend,
            cluster=lc.cluster.name,
            gpu_type=lc.cluster.gpu_type,
            cells=tuple((c.cell_id, c.name) for c in lc.cells),
        )
    with _lock:
        _info_cache[str(path)] = (mtime, info)
    return info


# -- the catalog and the tables --------------------------------------------------------------


@dataclass(frozen=True)
class AttemptView:
    """The fields of a catalog attempt the view needs (detached from any session)."""

    cell_id: str
    repeat: int
    attempt: int
    state: str
    outcome: str | None
    run_id: str | None
    job_id: str | None
    message: str | None
    result_dir: str | None


def catalog_campaigns(catalog: Any) -> list[str]:
    from sqlalchemy import select

    from charllm.catalog import CampaignRow

    with catalog.session() as s:
        return [n for n in s.scalars(select(CampaignRow.name)) if SAFE_NAME.match(n)]


def catalog_cells(catalog: Any, campaign: str) -> dict[str, str]:
    """Cell id -> name of the cells the catalog has registered for a campaign."""
    from sqlalchemy import select

    from charllm.catalog import CampaignCellRow, CellRow

    with catalog.session() as s:
        rows = s.execute(
            select(CellRow.cell_id, CellRow.name)
            .join(CampaignCellRow, CampaignCellRow.cell_id == CellRow.cell_id)
            .where(CampaignCellRow.campaign == campaign)
        ).all()
    return {str(cid): str(name) for cid, name in rows}


def catalog_attempts(catalog: Any, campaign: str) -> list[AttemptView]:
    return [
        AttemptView(
            cell_id=a.cell_id,
            repeat=int(a.repeat),
            attempt=int(a.attempt),
            state=str(a.state),
            outcome=str(a.outcome) if a.outcome else None,
            run_id=a.run_id,
            job_id=a.job_id,
            message=a.message,
            result_dir=a.result_dir,
        )
        for a in catalog.attempts(campaign=campaign)
    ]


_table_cache: dict[str, tuple[float, Any]] = {}


def tables_dir(campaign: str, root: Path | None = None) -> Path:
    return (root or home()) / "tables" / campaign


def read_cells_table(campaign: str, root: Path | None = None) -> Any:
    """``cells.parquet`` of a campaign as a DataFrame (None when there is none)."""
    p = tables_dir(campaign, root) / "cells.parquet"
    try:
        mtime = p.stat().st_mtime
    except OSError:
        return None
    with _lock:
        hit = _table_cache.get(str(p))
        if hit and hit[0] == mtime:
            return hit[1]
    import pandas as pd

    try:
        df = pd.read_parquet(p)
    except Exception as err:  # a table being rewritten, or broken: the view says so, it does not fail
        log.warning("could not read %s: %s", p, err)
        return None
    with _lock:
        _table_cache[str(p)] = (mtime, df)
    return df


# -- the matrix -------------------------------------------------------------------------------


@dataclass
class Entry:
    """One cell repeat: its outcome class, its attempt and its key metrics."""

    cell_id: str
    repeat: int
    status: str = "not run"  # one of STATUSES
    outcome: str | None = None  # the recorded word: ok, oom, failed, timeout, cancelled, lost
    attempt: int | None = None
    attempts: int = 0
    run_id: str | None = None  # the DAG run of the shown attempt
    job_id: str | None = None
    message: str | None = None
    has_folder: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    # False: a repeat beyond the campaign's ``repeats`` of a cell the nightly runs do not re-measure
    # (shown as a blank, not counted as "not run")
    expected: bool = True
    # filled in by the plugin from Airflow: the DAG run and map index of this cell repeat
    link_run: str | None = None
    map_index: int | None = None
    ti_state: str | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.cell_id, self.repeat


@dataclass
class Row:
    cell_id: str
    name: str
    entries: list[Entry]
    in_file: bool = True  # False: the catalog knows it, the campaign file no longer has it


@dataclass
class Matrix:
    campaign: str
    repeats: list[int]
    rows: list[Row]
    source: str  # "catalog", "tables" (recorded results only) or "none"

    @property
    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for r in self.rows:
            for e in r.entries:
                if e.expected or e.attempts:
                    out[e.status] = out.get(e.status, 0) + 1
        return out

    def entry(self, cell_id: str, repeat: int) -> Entry | None:
        for r in self.rows:
            if r.cell_id == cell_id:
                for e in r.entries:
                    if e.repeat == repeat:
                        return e
        return None

    def entries(self) -> Iterable[Entry]:
        for r in self.rows:
            yield from r.entries

    def as_dict(self) -> dict[str, Any]:
        return {
            "campaign": self.campaign,
            "source": self.source,
            "repeats": self.repeats,
            "counts": self.counts,
            "cells": [
                {
                    "cell_id": r.cell_id,
                    "name": r.name,
                    "in_file": r.in_file,
                    "repeats": [
                        {
                            "repeat": e.repeat,
                            "status": e.status,
                            "outcome": e.outcome,
                            "attempt": e.attempt,
                            "attempts": e.attempts,
                            "run_id": e.run_id,
                            "link_run": e.link_run,
                            "map_index": e.map_index,
                            "ti_state": e.ti_state,
                            "expected": e.expected,
                            "metrics": {k: v for k, v in e.metrics.items() if not math.isnan(v)},
                        }
                        for e in r.entries
                    ],
                }
                for r in self.rows
            ],
        }


def status_of(attempts: Sequence[AttemptView]) -> tuple[str, AttemptView | None]:
    """The outcome class of a cell repeat from its attempts, and the attempt that shows it.

    An attempt in flight makes it ``running``; else the best ended attempt: ok, then oom, then
    skipped (not run on purpose, e.g. GPU control denied), then the newest of the others
    (failed, timeout, cancelled, lost: all ``failed``).
    """
    if not attempts:
        return "not run", None
    by_new = sorted(attempts, key=lambda a: a.attempt, reverse=True)
    live = [a for a in by_new if not a.outcome and a.state in _LIVE_STATES]
    if live:
        return "running", live[0]
    for word in RESULT_WORDS:
        hit = [a for a in by_new if a.outcome == word]
        if hit:
            return word, hit[0]
    ended = [a for a in by_new if a.outcome]
    if ended:
        return "failed", ended[0]
    return "not run", by_new[0]


def _metric_values(row: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for col, _label, _unit, scale in METRICS:
        v = _num(row.get(col))
        if col == "tokens_per_s_per_gpu" and math.isnan(v):
            tps, ws = _num(row.get("tokens_per_s")), _num(row.get("world_size"))
            v = tps / ws if ws and ws > 0 else math.nan
        out[col] = v * scale if not math.isnan(v) else math.nan
    return out


def build_matrix(
    info: CampaignInfo,
    attempts: Sequence[AttemptView],
    cells_table: Any = None,
    catalog_names: Mapping[str, str] | None = None,
) -> Matrix:
    """Every cell (the file's, then any other the catalog or tables know) x every repeat.

    With no attempt in the catalog but a cells table (e.g. a recorded run copied in), the
    table's outcomes are shown, and ``source`` says so.
    """
    names: dict[str, str] = dict(info.cells)
    file_ids = set(names)
    for cid, n in (catalog_names or {}).items():
        names.setdefault(cid, n)
    table_rows: dict[tuple[str, int], dict[str, Any]] = {}
    if cells_table is not None and len(cells_table):
        for rec in cells_table.to_dict("records"):
            cid = str(rec.get("cell_id"))
            table_rows[(cid, int(rec.get("repeat") or 0))] = rec
            names.setdefault(cid, str(rec.get("cell_name") or cid))
    by_key: dict[tuple[str, int], list[AttemptView]] = {}
    for a in attempts:
        by_key.setdefault((a.cell_id, a.repeat), []).append(a)
        names.setdefault(a.cell_id, a.cell_id)
    source = "catalog" if attempts else ("tables" if table_rows else "none")
    keys = set(by_key) | (set(table_rows) if source == "tables" else set())
    n_rep = max([info.repeats, *(r + 1 for _, r in keys)])
    repeats = list(range(n_rep))
    nightly = [p.strip() for p in info.nightly_cells.split(",") if p.strip()] if info.schedule else []

    def re_measured(cid: str) -> bool:
        return any(fnmatch.fnmatchcase(names[cid], p) or cid.startswith(p) for p in nightly)

    rows: list[Row] = []
    order = [cid for cid, _ in info.cells] + sorted((c for c in names if c not in file_ids), key=lambda c: names[c])
    for cid in order:
        entries = []
        for rep in repeats:
            e = Entry(cell_id=cid, repeat=rep, expected=rep < info.repeats or re_measured(cid))
            tab = table_rows.get((cid, rep))
            if source == "tables" and tab is not None:
                word = str(tab.get("outcome") or "")
                e.status = word if word in RESULT_WORDS else "failed"
                e.outcome = word or None
                e.attempt = int(tab["attempt"]) if _num(tab.get("attempt")) == _num(tab.get("attempt")) else None
                e.attempts = 1
                e.job_id = str(tab.get("job_id") or "") or None
            else:
                rows_a = by_key.get((cid, rep), [])
                e.status, shown = status_of(rows_a)
                e.attempts = len(rows_a)
                if shown is not None:
                    e.outcome = shown.outcome
                    e.attempt = shown.attempt
                    e.run_id = shown.run_id
                    e.job_id = shown.job_id
                    e.message = shown.message
                    e.has_folder = bool(shown.result_dir) and Path(str(shown.result_dir)).is_dir()
            if tab is not None and str(tab.get("outcome")) == "ok":
                e.metrics = _metric_values(tab)
            entries.append(e)
        rows.append(Row(cell_id=cid, name=names[cid], entries=entries, in_file=cid in file_ids or not file_ids))
    return Matrix(campaign=info.name, repeats=repeats, rows=rows, source=source)


def known_campaigns(catalog: Any | None = None, root: Path | None = None) -> list[str]:
    """Campaigns with a file, a catalog entry or tables here, by name."""
    names = set(campaign_files())
    if catalog is not None:
        try:
            names |= set(catalog_campaigns(catalog))
        except Exception as err:  # an unreadable catalog must not hide the campaign files
            log.warning("catalog not readable: %s", err)
    t = (root or home()) / "tables"
    if t.is_dir():
        names |= {p.name for p in t.iterdir() if p.is_dir() and SAFE_NAME.match(p.name)}
    return sorted(names)


# -- figures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FigureRun:
    """A folder ``figures/<campaign>/<run>/`` with what it holds."""

    name: str
    mtime: float
    files: tuple[str, ...]

    @property
    def figures(self) -> list[str]:
        """The PNG stems, in the view's order."""
        stems = [f[:-4] for f in self.files if f.endswith(".png")]
        rank = {s: i for i, s in enumerate(FIGURE_ORDER)}
        return sorted(stems, key=lambda s: (rank.get(s, len(rank)), s))

    @property
    def recorded(self) -> bool:
        """A folder of figures drawn from recorded data shipped with the repository."""
        return self.name.startswith("recorded")


def figures_root(campaign: str, root: Path | None = None) -> Path:
    return (root or home()) / "figures" / campaign


def _listing(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if not p.is_symlink()]
    except OSError:
        return []


def figure_runs(campaign: str, root: Path | None = None) -> list[FigureRun]:
    """The figures folders of a campaign, newest first (by the newest file in each)."""
    if not SAFE_NAME.match(campaign):
        return []
    out = []
    for d in _listing(figures_root(campaign, root)):
        if not d.is_dir() or not SAFE_NAME.match(d.name):
            continue
        files = [p for p in _listing(d) if p.is_file() and FIGURE_FILE.match(p.name)]
        if not files:
            continue
        mtime = max(p.stat().st_mtime for p in files)
        out.append(FigureRun(d.name, mtime, tuple(sorted(p.name for p in files))))
    # recorded examples last: a run of this installation comes first
    return sorted(out, key=lambda r: (not r.recorded, r.mtime), reverse=True)


def figure_file(campaign: str, run: str, name: str, root: Path | None = None) -> Path | None:
    """The file ``name`` of figures run ``run``: only a name its folder listing has."""
    if not (SAFE_NAME.match(campaign) and SAFE_NAME.match(run) and FIGURE_FILE.match(name)):
        return None
    for r in figure_runs(campaign, root):
        if r.name == run and name in r.files:
            base = figures_root(campaign, root)
            p = base / r.name / name
            if p.is_file() and not p.is_symlink() and p.resolve().parent == (base / r.name).resolve():
                return p
    return None


# -- report.md ---------------------------------------------------------------------------------


@dataclass
class Report:
    """What the view shows of ``report.md``: its intro lines and the reference checks."""

    intro: list[str]
    verdict: str
    columns: list[str]
    checks: list[dict[str, str]]

    @property
    def violations(self) -> int:
        return sum(1 for c in self.checks if not c.get("_ok"))


def _split_row(line: str) -> list[str]:
    cells, cur, esc = [], "", False
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    for ch in body:
        if esc:
            cur += ch
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == "|":
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
    cells.append(cur.strip())
    return cells


def parse_report(text: str) -> Report:
    """The intro and the reference-check table of a ``report.md`` written by :func:`write_report`."""
    lines = text.splitlines()
    intro: list[str] = []
    i = 0
    while i < len(lines) and not lines[i].startswith("## "):
        s = lines[i].strip()
        if s and not s.startswith("# "):
            intro.append(s.replace("**", "").strip("_") if s.startswith("_") else s.replace("**", ""))
        i += 1
    verdict = ""
    columns: list[str] = []
    checks: list[dict[str, str]] = []
    while i < len(lines):
        if lines[i].strip() == "## Reference checks":
            i += 1
            while i < len(lines) and not lines[i].startswith("## "):
                s = lines[i].strip()
                if s.startswith("|"):
                    cells = _split_row(s)
                    if not columns:
                        columns = cells
                    elif not all(set(c) <= {"-", ":"} for c in cells):
                        rec = dict(zip(columns, cells, strict=False))
                        result = rec.get("result", "")
                        rec["result"] = result.strip("*")
                        rec["_ok"] = "1" if rec["result"].lower() in ("ok", "pass") else ""
                        checks.append(rec)
                elif s and not verdict:
                    verdict = s.replace("**", "")
                i += 1
            break
        i += 1
    checks.sort(key=lambda c: bool(c.get("_ok")))  # violations first
    return Report(
        intro=intro, verdict=verdict, columns=[c for c in columns if c != "result"] + ["result"], checks=checks
    )


def read_report(campaign: str, run: str, root: Path | None = None) -> Report | None:
    p = figure_file(campaign, run, "report.md", root)
    if p is None:
        return None
    try:
        return parse_report(p.read_text(errors="replace"))
    except OSError:
        return None


# -- attempt folders ----------------------------------------------------------------------------


def attempt_of(attempts: Sequence[AttemptView], cell_id: str, repeat: int, attempt: int) -> AttemptView | None:
    for a in attempts:
        if a.cell_id == cell_id and a.repeat == repeat and a.attempt == attempt:
            return a
    return None


def list_files(root: Path, limit: int = 400) -> list[tuple[str, int]]:
    """(relative path, size) of the regular files under ``root``; no links followed, safe names only."""
    out: list[tuple[str, int]] = []
    if not root.is_dir() or root.is_symlink():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        rel_dir = base.relative_to(root)
        dirnames[:] = sorted(
            d for d in dirnames if FILE_PART.match(d) and not (base / d).is_symlink() and not d.startswith(".")
        )
        for f in sorted(filenames):
            p = base / f
            if f.startswith(".") or not FILE_PART.match(f) or p.is_symlink() or not p.is_file():
                continue
            out.append(((rel_dir / f).as_posix(), p.stat().st_size))
            if len(out) >= limit:
                return out
    return out


def attempt_file(root: Path, rel: str) -> Path | None:
    """The file ``rel`` of an attempt folder: only a path its listing has."""
    if not rel or len(rel) > 1000 or not all(FILE_PART.match(part) for part in rel.split("/")):
        return None
    for name, _size in list_files(root):
        if name == rel:
            p = root / name
            if root.resolve() in p.resolve().parents:
                return p
    return None


# -- re-running cells -----------------------------------------------------------------------------


def plan_index(items: Any) -> dict[tuple[str, int], int]:
    """(cell id, repeat) -> map index, from the ``plan`` task's list of cell repeats."""
    out: dict[tuple[str, int], int] = {}
    if not isinstance(items, list):
        return out
    for i, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("cell_id"), str):
            try:
                out[(item["cell_id"], int(item.get("repeat", 0)))] = i
            except (TypeError, ValueError):
                continue
    return out


def clear_targets(map_indexes: Iterable[int]) -> list[Any]:
    """``task_ids`` for Airflow's clearTaskInstances: exactly the mapped instances of these cell repeats.

    Nothing downstream: a re-run cell's ``collect`` re-aggregates the tables when the run's
    ``aggregate`` has already run (and the figures DAG redraws on the tables' Asset event).
    """
    idx = sorted(set(int(i) for i in map_indexes))
    return [[t, i] for i in idx for t in CELL_TASKS]


__all__ = [
    "CELL_TASKS",
    "METRICS",
    "STATUSES",
    "AttemptView",
    "CampaignInfo",
    "Entry",
    "FigureRun",
    "Matrix",
    "Report",
    "build_matrix",
    "campaign_info",
    "campaign_of_dag",
    "clear_targets",
    "figure_file",
    "figure_runs",
    "known_campaigns",
    "parse_report",
    "plan_index",
]

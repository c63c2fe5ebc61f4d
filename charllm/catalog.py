"""The results catalog: campaigns, cells, attempts and outcomes, through SQLAlchemy.

SQLite by default (a file in the results home), PostgreSQL by URL. The catalog answers
the orchestrator's two questions: does this cell (and repeat) have a valid result, and is
a job for it already out there (so that nothing is submitted twice).

Every submission starts with :meth:`Catalog.reserve`: one atomic step, shared by the DAG and
``charllm run`` (and any number of either), that either takes a new attempt (a row in state
``reserved`` with a fresh nonce) or says why not: the cell repeat has a valid result, an
attempt of it is in flight (re-attach to it), or its cluster is at its limit of jobs in
flight. At most one attempt per cell repeat is in flight (reserved, submitted, running, or its
job ended and not yet collected), enforced by a partial unique index (``uq_attempts_active``)
that SQLite and PostgreSQL both have; the per-cluster limit counts attempts whose job may still
be queued or running, under a row lock on ``cluster_slots`` (PostgreSQL) or SQLite's write lock.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from charllm.errors import CharllmError
from charllm.outcomes import IN_FLIGHT_STATES, QUEUED_STATES, RESULT_OUTCOMES, AttemptState, Outcome
from charllm.paths import catalog_url

log = logging.getLogger(__name__)


class CatalogError(CharllmError):
    """The catalog could not record something."""


VALID_OUTCOMES = tuple(str(o) for o in RESULT_OUTCOMES)  # a cell with one of these is done
LIVE_STATES = (str(AttemptState.SUBMITTED), str(AttemptState.RUNNING))
_IN_FLIGHT = tuple(str(s) for s in IN_FLIGHT_STATES)
_QUEUED = tuple(str(s) for s in QUEUED_STATES)
_ACTIVE_INDEX = "uq_attempts_active"
_ACTIVE_WHERE = "state IN ('reserved', 'submitted', 'running', 'job_ended')"


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class CampaignRow(Base):
    __tablename__ = "campaigns"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class CellRow(Base):
    __tablename__ = "cells"
    cell_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class CampaignCellRow(Base):
    __tablename__ = "campaign_cells"
    campaign: Mapped[str] = mapped_column(ForeignKey("campaigns.name"), primary_key=True)
    cell_id: Mapped[str] = mapped_column(ForeignKey("cells.cell_id"), primary_key=True)


class AttemptRow(Base):
    __tablename__ = "attempts"
    __table_args__ = (
        UniqueConstraint("cell_id", "repeat", "attempt"),
        # at most one attempt of a cell repeat in flight, whoever submits it (DAG, CLI, two of them)
        Index(
            _ACTIVE_INDEX,
            "cell_id",
            "repeat",
            unique=True,
            sqlite_where=text(_ACTIVE_WHERE),
            postgresql_where=text(_ACTIVE_WHERE),
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cell_id: Mapped[str] = mapped_column(ForeignKey("cells.cell_id"), index=True)
    repeat: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    campaign: Mapped[str] = mapped_column(String(128))
    run_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    backend: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    state: Mapped[str] = mapped_column(String(32), default="submitted")
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    submitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # added later (see _migrate): the attempt's nonce (part of its job's identity), who reserved
    # it (host:pid:start), when that owner last said it is still submitting, and the cluster
    nonce: Mapped[str | None] = mapped_column(String(16), nullable=True)
    owner: Mapped[str | None] = mapped_column(String(256), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cluster: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)


class ClusterSlotRow(Base):
    """One row per cluster: reservations against a limit of jobs in flight lock it first."""

    __tablename__ = "cluster_slots"
    cluster: Mapped[str] = mapped_column(String(128), primary_key=True)
    ticks: Mapped[int] = mapped_column(Integer, default=0)


_ADDED_COLUMNS = {
    "nonce": "VARCHAR(16)",
    "owner": "VARCHAR(256)",
    "heartbeat_at": "TIMESTAMP",
    "cluster": "VARCHAR(128)",
}


class Reserved(enum.StrEnum):
    """What :meth:`Catalog.reserve` did."""

    NEW = "new"  # a new attempt is reserved for the caller: submit it
    IN_FLIGHT = "in_flight"  # an attempt is in flight already (``row``): re-attach, never submit another
    DONE = "done"  # the cell repeat has a valid result (``row``)
    THROTTLED = "throttled"  # the cluster has ``max_in_flight`` attempts in flight


@dataclass(frozen=True)
class Reservation:
    kind: Reserved
    row: AttemptRow | None = None
    in_flight: int = 0  # THROTTLED: attempts in flight on the cluster


def process_token() -> str:
    """``host:pid:start``: who reserved an attempt; a dead owner on this host is seen at once."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def owner_alive(owner: str | None) -> bool | None:
    """Whether the process that reserved an attempt still runs: True/False on this host, None elsewhere."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_s, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_s.isdigit():
        return None
    return _start_time(int(pid_s)) == start and start != "?"


class Catalog:
    """Thin, transactional access to the catalog tables."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or catalog_url()
        if self.url.startswith("sqlite:///"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(self.url, future=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            Base.metadata.create_all(self.engine)
            _migrate(self.engine)
        except OperationalError as err:
            raise CatalogError(f"cannot open the results catalog {self._where()}: {err.orig}") from err

    def _where(self) -> str:
        return (
            self.url.removeprefix("sqlite:///")
            if self.url.startswith("sqlite:///")
            else self.engine.url.render_as_string()
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        try:
            with Session(self.engine, expire_on_commit=False) as s, s.begin():
                yield s
        except OperationalError as err:
            # disk full, read-only file, a locked database past its timeout: say which catalog
            msg = str(err.orig)
            if "locked" in msg or "could not serialize" in msg or "deadlock" in msg:
                raise
            raise CatalogError(f"the results catalog {self._where()} failed: {msg}") from err

    # -- campaigns and cells -----------------------------------------------------------
    def register(self, campaign: str, source: str, cells: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        """Record a campaign and its cells (id, name, config); idempotent, a few queries for any number of cells.

        Two orchestrators registering the same new cells at once: the loser's insert meets the
        primary key and it looks again (then finds them).
        """
        for tries in range(5):
            try:
                return self._register(campaign, source, cells)
            except IntegrityError:
                if tries == 4:
                    raise
                time.sleep(0.05 * (tries + 1))

    def _register(self, campaign: str, source: str, cells: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        with self.session() as s:
            row = s.get(CampaignRow, campaign)
            if row is None:
                s.add(CampaignRow(name=campaign, source=source))
            else:
                row.last_seen = _now()
                row.source = source
            s.flush()
            ids = [c[0] for c in cells]
            known: set[str] = set()
            linked: set[str] = set()
            for chunk in _chunks(ids, 500):
                known |= set(s.scalars(select(CellRow.cell_id).where(CellRow.cell_id.in_(chunk))))
                linked |= set(
                    s.scalars(
                        select(CampaignCellRow.cell_id).where(
                            CampaignCellRow.campaign == campaign, CampaignCellRow.cell_id.in_(chunk)
                        )
                    )
                )
            new_cells = [CellRow(cell_id=i, name=n, config=c) for i, n, c in cells if i not in known]
            if new_cells:
                s.add_all(new_cells)
                s.flush()
            new_links = [CampaignCellRow(campaign=campaign, cell_id=i) for i in dict.fromkeys(ids) if i not in linked]
            if new_links:
                s.add_all(new_links)

    def results_of(self, cell_ids: Sequence[str]) -> dict[tuple[str, int], AttemptRow]:
        """(cell, repeat) -> its newest attempt with a result (ok, oom), for many cells in a few queries."""
        out: dict[tuple[str, int], AttemptRow] = {}
        with self.session() as s:
            for chunk in _chunks(list(cell_ids), 500):
                rows = s.scalars(
                    select(AttemptRow)
                    .where(AttemptRow.cell_id.in_(chunk), AttemptRow.outcome.in_(VALID_OUTCOMES))
                    .order_by(AttemptRow.attempt)
                )
                for r in rows:
                    out[(r.cell_id, r.repeat)] = r
        return out

    # -- attempts ----------------------------------------------------------------------
    def valid_result(self, cell_id: str, repeat: int, run_id: str | None = None) -> AttemptRow | None:
        """The newest attempt with a result (ok, oom); only one of run ``run_id`` if given (forced runs)."""
        with self.session() as s:
            return _valid(s, cell_id, repeat, run_id)

    def live_attempt(self, cell_id: str, repeat: int) -> AttemptRow | None:
        """The newest attempt that was submitted and has not ended."""
        with self.session() as s:
            return s.scalars(
                select(AttemptRow)
                .where(AttemptRow.cell_id == cell_id, AttemptRow.repeat == repeat)
                .where(AttemptRow.state.in_(LIVE_STATES))
                .order_by(AttemptRow.attempt.desc())
            ).first()

    def attempts(self, cell_id: str | None = None, campaign: str | None = None) -> list[AttemptRow]:
        with self.session() as s:
            q = select(AttemptRow).order_by(AttemptRow.cell_id, AttemptRow.repeat, AttemptRow.attempt)
            if cell_id:
                q = q.where(AttemptRow.cell_id == cell_id)
            if campaign:
                q = q.join(CampaignCellRow, CampaignCellRow.cell_id == AttemptRow.cell_id).where(
                    CampaignCellRow.campaign == campaign
                )
            return list(s.scalars(q))

    def new_attempt(self, cell_id: str, repeat: int, campaign: str, backend: str, run_id: str | None) -> int:
        """Reserve the next attempt number for a cell repeat (state ``reserved``).

        Two writers racing for the same number meet the unique constraint; the loser takes the next.
        """
        for _ in range(20):
            try:
                with self.session() as s:
                    last = s.scalar(
                        select(func.max(AttemptRow.attempt)).where(
                            AttemptRow.cell_id == cell_id, AttemptRow.repeat == repeat
                        )
                    )
                    n = (last or 0) + 1
                    s.add(
                        AttemptRow(
                            cell_id=cell_id,
                            repeat=repeat,
                            attempt=n,
                            campaign=campaign,
                            backend=backend,
                            run_id=run_id,
                            state=str(AttemptState.RESERVED),
                            nonce=secrets.token_hex(4),
                        )
                    )
                return n
            except IntegrityError:
                continue
        raise CatalogError(f"could not reserve an attempt for cell {cell_id} repeat {repeat}")

    def in_flight(self, cell_id: str, repeat: int) -> AttemptRow | None:
        """The attempt of a cell repeat that is reserved, submitted or running, if any."""
        with self.session() as s:
            return s.scalars(
                select(AttemptRow)
                .where(AttemptRow.cell_id == cell_id, AttemptRow.repeat == repeat)
                .where(AttemptRow.state.in_(_IN_FLIGHT))
                .order_by(AttemptRow.attempt.desc())
            ).first()

    def reserve(
        self,
        cell_id: str,
        repeat: int,
        *,
        campaign: str,
        backend: str,
        run_id: str | None,
        owner: str,
        force: bool = False,
        cluster: str | None = None,
        max_in_flight: int | None = None,
    ) -> Reservation:
        """Take the next attempt of a cell repeat for submission, atomically; or say why not.

        Not forced, a valid result makes it :attr:`Reserved.DONE`; forced, only a valid result
        of this same run does (a forced run measures each cell repeat once, not once per task
        retry). An attempt in flight (any owner) makes it :attr:`Reserved.IN_FLIGHT`: the caller
        re-attaches to that attempt's job. With ``max_in_flight``, a cluster that has that many
        attempts in flight makes it :attr:`Reserved.THROTTLED`.

        Race-safe on SQLite and PostgreSQL: the insert of the new row meets the partial unique
        index if another writer reserved the same cell repeat first (then we look again), the
        cluster count is taken under a lock on the cluster's ``cluster_slots`` row, and a valid
        result recorded while we reserved is checked once more after the commit (the new row
        is then deleted again).
        """
        done_run = run_id if force else None
        for _ in range(50):
            try:
                with self.session() as s:
                    if cluster and max_in_flight:
                        _lock_cluster(s, cluster)
                    live = s.scalars(
                        select(AttemptRow)
                        .where(AttemptRow.cell_id == cell_id, AttemptRow.repeat == repeat)
                        .where(AttemptRow.state.in_(_IN_FLIGHT))
                        .order_by(AttemptRow.attempt.desc())
                    ).first()
                    if live is not None:
                        return Reservation(Reserved.IN_FLIGHT, live)
                    if not force or done_run:
                        done = _valid(s, cell_id, repeat, done_run)
                        if done is not None:
                            return Reservation(Reserved.DONE, done)
                    if cluster and max_in_flight:
                        n = s.scalar(
                            select(func.count())
                            .select_from(AttemptRow)
                            .where(AttemptRow.cluster == cluster, AttemptRow.state.in_(_QUEUED))
                        )
                        if (n or 0) >= max_in_flight:
                            return Reservation(Reserved.THROTTLED, None, int(n or 0))
                    last = s.scalar(
                        select(func.max(AttemptRow.attempt)).where(
                            AttemptRow.cell_id == cell_id, AttemptRow.repeat == repeat
                        )
                    )
                    row = AttemptRow(
                        cell_id=cell_id,
                        repeat=repeat,
                        attempt=(last or 0) + 1,
                        campaign=campaign,
                        backend=backend,
                        run_id=run_id,
                        state=str(AttemptState.RESERVED),
                        nonce=secrets.token_hex(4),
                        owner=owner,
                        heartbeat_at=_now(),
                        cluster=cluster,
                    )
                    s.add(row)
                    s.flush()
            except IntegrityError:
                time.sleep(0.01)
                continue  # another writer reserved this cell repeat (or its attempt number) first
            except OperationalError as err:
                if "locked" not in str(err.orig) and "serialize" not in str(err.orig):
                    raise
                time.sleep(0.05)
                continue
            if not force or done_run:
                with self.session() as s:
                    done = _valid(s, cell_id, repeat, done_run)
                    if done is not None:  # recorded by another orchestrator while we reserved
                        s.execute(delete(AttemptRow).where(AttemptRow.id == row.id))
                        return Reservation(Reserved.DONE, done)
            return Reservation(Reserved.NEW, row)
        raise CatalogError(f"could not reserve an attempt for cell {cell_id} repeat {repeat}: too much contention")

    def take_over(self, row: AttemptRow, owner: str) -> bool:
        """Become the owner of a reserved attempt whose owner is gone (conditional update: one winner)."""
        with self.session() as s:
            res = s.execute(
                update(AttemptRow)
                .where(AttemptRow.id == row.id, AttemptRow.state == str(AttemptState.RESERVED))
                .where(AttemptRow.owner == row.owner if row.owner is not None else AttemptRow.owner.is_(None))
                .values(owner=owner, heartbeat_at=_now())
            )
            return bool(res.rowcount)  # type: ignore[attr-defined]

    def heartbeat(self, row_id: int) -> None:
        """The owner of a reserved attempt is still submitting it."""
        with self.session() as s:
            s.execute(update(AttemptRow).where(AttemptRow.id == row_id).values(heartbeat_at=_now()))

    def release(self, row_id: int) -> None:
        """Give a reservation up (nothing was submitted for it)."""
        with self.session() as s:
            s.execute(delete(AttemptRow).where(AttemptRow.id == row_id, AttemptRow.state == str(AttemptState.RESERVED)))

    def queued(self, cluster: str) -> list[AttemptRow]:
        """The attempts on a cluster whose job may still be queued or running (what its limit counts)."""
        with self.session() as s:
            return list(
                s.scalars(select(AttemptRow).where(AttemptRow.cluster == cluster, AttemptRow.state.in_(_QUEUED)))
            )

    def reserved_attempt(self, cell_id: str, repeat: int) -> AttemptRow | None:
        """A reserved attempt whose submission may or may not have gone through."""
        with self.session() as s:
            return s.scalars(
                select(AttemptRow)
                .where(
                    AttemptRow.cell_id == cell_id,
                    AttemptRow.repeat == repeat,
                    AttemptRow.state == str(AttemptState.RESERVED),
                )
                .order_by(AttemptRow.attempt.desc())
            ).first()

    def update_attempt(self, cell_id: str, repeat: int, attempt: int, **fields: Any) -> None:
        with self.session() as s:
            row = s.scalars(
                select(AttemptRow).where(
                    AttemptRow.cell_id == cell_id, AttemptRow.repeat == repeat, AttemptRow.attempt == attempt
                )
            ).one()
            for k, v in fields.items():
                setattr(row, k, v)
            if fields.get("outcome") and row.ended_at is None:
                row.ended_at = _now()

    def mark_job_ended(self, cell_id: str, repeat: int, attempt: int) -> bool:
        """The attempt's job reached a terminal state: out of the cluster's count, still in flight (conditional)."""
        with self.session() as s:
            res = s.execute(
                update(AttemptRow)
                .where(AttemptRow.cell_id == cell_id, AttemptRow.repeat == repeat, AttemptRow.attempt == attempt)
                .where(AttemptRow.state.in_(_QUEUED))
                .values(state=str(AttemptState.JOB_ENDED))
            )
            return bool(res.rowcount)  # type: ignore[attr-defined]

    def summary(self, campaign: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for a in self.attempts(campaign=campaign):
            key = a.outcome or a.state
            counts[key] = counts.get(key, 0) + 1
        return counts


def _chunks(items: list[str], n: int) -> list[list[str]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def _valid(s: Session, cell_id: str, repeat: int, run_id: str | None) -> AttemptRow | None:
    q = (
        select(AttemptRow)
        .where(AttemptRow.cell_id == cell_id, AttemptRow.repeat == repeat)
        .where(AttemptRow.outcome.in_(VALID_OUTCOMES))
        .order_by(AttemptRow.attempt.desc())
    )
    if run_id is not None:
        q = q.where(AttemptRow.run_id == run_id)
    return s.scalars(q).first()


def _lock_cluster(s: Session, cluster: str) -> None:
    """Serialise reservations on one cluster: a write to its row (row lock; SQLite's write lock)."""
    res = s.execute(
        update(ClusterSlotRow).where(ClusterSlotRow.cluster == cluster).values(ticks=ClusterSlotRow.ticks + 1)
    )
    if not res.rowcount:  # type: ignore[attr-defined]
        s.add(ClusterSlotRow(cluster=cluster, ticks=1))
        s.flush()  # a concurrent first insert raises IntegrityError: the caller tries again


def _migrate(engine: Engine) -> None:
    """Bring a catalog made by an older charllm up to date: new columns, the in-flight index.

    Columns are added with ``ALTER TABLE ... ADD COLUMN`` (nullable, so old rows read as
    before: no nonce, no owner). Before the partial unique index is created, older duplicate
    in-flight attempts of one cell repeat (possible before reservations existed) are ended as
    ``lost``, keeping the newest.
    """
    insp = inspect(engine)
    have = {c["name"] for c in insp.get_columns("attempts")}
    missing = {k: v for k, v in _ADDED_COLUMNS.items() if k not in have}
    indexes = {i["name"] for i in insp.get_indexes("attempts")}
    if not missing and _ACTIVE_INDEX in indexes and "uq_attempts_in_flight" not in indexes:
        return
    for name, sql_type in missing.items():
        if engine.dialect.name == "postgresql" and sql_type == "TIMESTAMP":
            sql_type = "TIMESTAMP WITH TIME ZONE"
        try:
            with engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE attempts ADD COLUMN {name} {sql_type}"))
        except DBAPIError:  # another process added it first
            if name not in {c["name"] for c in inspect(engine).get_columns("attempts")}:
                raise
    with engine.begin() as conn:
        if "uq_attempts_in_flight" in indexes:  # the first form of the index, without job_ended
            conn.execute(text("DROP INDEX IF EXISTS uq_attempts_in_flight"))
        if _ACTIVE_INDEX not in indexes:
            rows = conn.execute(
                select(AttemptRow.id, AttemptRow.cell_id, AttemptRow.repeat, AttemptRow.attempt)
                .where(AttemptRow.state.in_(_IN_FLIGHT))
                .order_by(AttemptRow.cell_id, AttemptRow.repeat, AttemptRow.attempt.desc())
            ).all()
            seen: set[tuple[str, int]] = set()
            for row_id, cell_id, repeat, attempt in rows:
                if (cell_id, repeat) in seen:
                    log.warning(
                        "catalog: attempt %d of %s r%d superseded by a newer one in flight", attempt, cell_id, repeat
                    )
                    conn.execute(
                        update(AttemptRow)
                        .where(AttemptRow.id == row_id)
                        .values(
                            state=str(AttemptState.ENDED),
                            outcome=str(Outcome.LOST),
                            message="superseded by a newer attempt in flight (catalog upgrade)",
                            ended_at=_now(),
                        )
                    )
                seen.add((cell_id, repeat))
    for idx in Base.metadata.tables["attempts"].indexes:
        try:
            idx.create(engine, checkfirst=True)
        except DBAPIError:  # another process created it first
            if idx.name not in {i["name"] for i in inspect(engine).get_indexes("attempts")}:
                raise


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def dumps(row: AttemptRow) -> str:
    return json.dumps({c.name: getattr(row, c.name) for c in AttemptRow.__table__.columns}, default=str)

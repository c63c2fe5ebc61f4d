"""The results catalog: campaigns, cells, attempts and outcomes, through SQLAlchemy.

SQLite by default (a file in the results home), PostgreSQL by URL. The catalog answers
the orchestrator's two questions: does this cell (and repeat) have a valid result, and is
a job for it already out there (so that nothing is submitted twice).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from charllm.errors import CharllmError
from charllm.paths import catalog_url


class CatalogError(CharllmError):
    """The catalog could not record something."""


VALID_OUTCOMES = ("ok", "oom")  # a cell with one of these is done; oom is a result, not an error
LIVE_STATES = ("submitted", "running")


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
    __table_args__ = (UniqueConstraint("cell_id", "repeat", "attempt"),)
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


class Catalog:
    """Thin, transactional access to the catalog tables."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or catalog_url()
        if self.url.startswith("sqlite:///"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(self.url, future=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    # -- campaigns and cells -----------------------------------------------------------
    def register(self, campaign: str, source: str, cells: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        """Record a campaign and its cells (id, name, config); idempotent."""
        with self.session() as s:
            row = s.get(CampaignRow, campaign)
            if row is None:
                s.add(CampaignRow(name=campaign, source=source))
            else:
                row.last_seen = _now()
                row.source = source
            s.flush()
            for cell_id, name, config in cells:
                if s.get(CellRow, cell_id) is None:
                    s.add(CellRow(cell_id=cell_id, name=name, config=config))
                s.flush()
                if s.get(CampaignCellRow, (campaign, cell_id)) is None:
                    s.add(CampaignCellRow(campaign=campaign, cell_id=cell_id))

    # -- attempts ----------------------------------------------------------------------
    def valid_result(self, cell_id: str, repeat: int) -> AttemptRow | None:
        with self.session() as s:
            return s.scalars(
                select(AttemptRow)
                .where(AttemptRow.cell_id == cell_id, AttemptRow.repeat == repeat)
                .where(AttemptRow.outcome.in_(VALID_OUTCOMES))
                .order_by(AttemptRow.attempt.desc())
            ).first()

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
                            state="reserved",
                        )
                    )
                return n
            except IntegrityError:
                continue
        raise CatalogError(f"could not reserve an attempt for cell {cell_id} repeat {repeat}")

    def reserved_attempt(self, cell_id: str, repeat: int) -> AttemptRow | None:
        """A reserved attempt whose submission may or may not have gone through."""
        with self.session() as s:
            return s.scalars(
                select(AttemptRow)
                .where(AttemptRow.cell_id == cell_id, AttemptRow.repeat == repeat, AttemptRow.state == "reserved")
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

    def summary(self, campaign: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for a in self.attempts(campaign=campaign):
            key = a.outcome or a.state
            counts[key] = counts.get(key, 0) + 1
        return counts


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def dumps(row: AttemptRow) -> str:
    return json.dumps({c.name: getattr(row, c.name) for c in AttemptRow.__table__.columns}, default=str)

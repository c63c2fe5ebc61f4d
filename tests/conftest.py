"""Shared fixtures: an isolated results home, include folder and catalog per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def charllm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CHARLLM_HOME", str(home))
    monkeypatch.delenv("CHARLLM_CATALOG_URL", raising=False)
    return home


@pytest.fixture
def include_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of include/ (campaigns, clusters, templates) that tests may edit."""
    dest = tmp_path / "include"
    shutil.copytree(REPO / "include", dest)
    monkeypatch.setenv("CHARLLM_INCLUDE", str(dest))
    return dest


# -- PostgreSQL (a server runs on the development machines; .ci/run starts it if it is down) -----

PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


def _pg_reachable() -> str | None:
    from sqlalchemy import create_engine, text

    try:
        eng = create_engine(PG_ADMIN_URL)
        with eng.connect() as c:
            c.execute(text("select 1"))
        eng.dispose()
        return None
    except Exception as err:  # any driver/connection error means "not reachable"
        return str(err).splitlines()[0]


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    import os
    import subprocess

    why = _pg_reachable()
    if why is not None:
        subprocess.run(["bash", str(REPO / "scripts" / "services.sh"), "postgres"], capture_output=True, timeout=180)
        why = _pg_reachable()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required on CI and could not be started: {why}")
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432 and could not be started: {why}")
    return PG_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> str:
    """A fresh, empty database for one test; dropped afterwards."""
    import uuid

    from sqlalchemy import create_engine, text

    name = f"charllm_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield postgres_admin_url.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()

"""Results store (atomic attempts, manifests) and the results catalog (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from charllm.backends.base import JobIdentity
from charllm.catalog import Catalog, Reserved
from charllm.errors import ResultError
from charllm.store import attempt_dir, commit_attempt, read_result, verify

STEPS_CSV = (
    "step,phase,start_unix_s,end_unix_s,duration_s,loss,tokens\n"
    "0,warmup,1.0,2.0,1.0,5.0,64\n"
    "1,measure,2.0,3.0,1.0,4.0,64\n"
)


def _job_dir(tmp: Path, outcome: str = "ok", steps: bool = True) -> None:
    (tmp / "out").mkdir(parents=True, exist_ok=True)
    (tmp / "out" / "result.json").write_text(json.dumps({"outcome": outcome, "metrics": {"tokens_per_s": 10.0}}))
    if steps:
        (tmp / "out" / "steps.csv").write_text(STEPS_CSV)
    (tmp / "stdout.log").write_text("hi\n")


def test_read_result_rejects_bad_results(tmp_path):
    with pytest.raises(ResultError, match="no out/result.json"):
        read_result(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "result.json").write_text("{not json")
    with pytest.raises(ResultError, match="unreadable"):
        read_result(tmp_path)
    (tmp_path / "out" / "result.json").write_text('{"outcome": "great"}')
    with pytest.raises(ResultError, match="outcome"):
        read_result(tmp_path)
    _job_dir(tmp_path, steps=False)
    with pytest.raises(ResultError, match="steps.csv"):
        read_result(tmp_path)


RECORDED = Path(__file__).parent / "data" / "gpu" / "h100-gpt3-125m"


def _recorded_ok(tmp: Path) -> Path:
    """A real ok output of a GPU job (result, steps, rank 0 telemetry, kernels)."""
    import shutil

    shutil.copytree(RECORDED, tmp / "out")
    return tmp / "out"


def test_recorded_gpu_output_passes(tmp_path):
    _recorded_ok(tmp_path)
    assert read_result(tmp_path)["outcome"] == "ok"


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_truncated_telemetry_parquet_is_not_ok(tmp_path, cut):
    out = _recorded_ok(tmp_path)
    tele = out / "telemetry" / "rank0.parquet"
    data = tele.read_bytes()
    tele.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ResultError, match=r"telemetry/rank0.parquet is unreadable"):
        read_result(tmp_path)


def test_missing_telemetry_of_a_rank_is_not_ok(tmp_path):
    out = _recorded_ok(tmp_path)
    (out / "telemetry" / "rank0.parquet").unlink()
    with pytest.raises(ResultError, match=r"telemetry/rank0.parquet is missing"):
        read_result(tmp_path)


@pytest.mark.parametrize("text", ["", "step,phase\n", "step,phase\n0,warmup\n", "\x00\x01garbage"])
def test_steps_csv_without_measured_steps_is_not_ok(tmp_path, text):
    out = _recorded_ok(tmp_path)
    (out / "steps.csv").write_text(text)
    with pytest.raises(ResultError, match="steps.csv"):
        read_result(tmp_path)


def test_commit_is_atomic_and_idempotent(tmp_path):
    ident = JobIdentity("c", "abc", 0, 1)

    def classify(d: Path):
        r = read_result(d)
        return r["outcome"], r, ""

    final, manifest = commit_attempt(tmp_path, ident, _job_dir, {"campaign": "c"}, classify)
    assert final == attempt_dir(tmp_path, ident)
    assert manifest["outcome"] == "ok" and manifest["metrics"]["tokens_per_s"] == 10.0
    assert "out/result.json" in manifest["files"]
    assert verify(final)["outcome"] == "ok"
    # a retried collect returns the committed attempt and does not fetch again
    again, _ = commit_attempt(tmp_path, ident, lambda d: (_ for _ in ()).throw(AssertionError("fetched")), {}, classify)
    assert again == final


def test_failed_fetch_leaves_nothing_behind(tmp_path):
    ident = JobIdentity("c", "abc", 0, 2)

    def broken_fetch(d: Path):
        _job_dir(d)
        raise OSError("connection dropped mid-copy")

    with pytest.raises(OSError):
        commit_attempt(tmp_path, ident, broken_fetch, {}, lambda d: ("ok", None, ""))
    assert not attempt_dir(tmp_path, ident).exists()
    assert list((tmp_path / "results" / ".staging").iterdir()) == []


def test_tampered_attempt_fails_verification(tmp_path):
    ident = JobIdentity("c", "abc", 0, 1)
    final, _ = commit_attempt(tmp_path, ident, _job_dir, {}, lambda d: ("ok", read_result(d), ""))
    (final / "out" / "steps.csv").write_text("truncated")
    with pytest.raises(ResultError, match="wrong size"):
        verify(final)


def _exercise_catalog(cat: Catalog) -> None:
    cat.register("camp", "camp.yaml", [("cell1", "n1", {"a": 1}), ("cell2", "n2", {"a": 2})])
    cat.register("camp", "camp.yaml", [("cell1", "n1", {"a": 1})])  # idempotent
    cat.register("other", "other.yaml", [("cell1", "n1", {"a": 1})])  # shared cell, stored once
    assert cat.valid_result("cell1", 0) is None
    a1 = cat.new_attempt("cell1", 0, "camp", "local", "run1")
    assert cat.reserved_attempt("cell1", 0).attempt == a1 == 1
    cat.update_attempt("cell1", 0, a1, state="submitted", job_id="j1")
    assert cat.live_attempt("cell1", 0).job_id == "j1"
    cat.update_attempt("cell1", 0, a1, state="ended", outcome="failed")
    assert cat.live_attempt("cell1", 0) is None and cat.valid_result("cell1", 0) is None
    a2 = cat.new_attempt("cell1", 0, "camp", "local", "run1")
    assert a2 == 2
    cat.update_attempt("cell1", 0, a2, state="ended", outcome="oom")
    assert cat.valid_result("cell1", 0).outcome == "oom"
    assert cat.summary("camp") == {"failed": 1, "oom": 1}
    assert len(cat.attempts(campaign="other")) == 2


def test_catalog_sqlite(tmp_path):
    _exercise_catalog(Catalog(f"sqlite:///{tmp_path / 'c.db'}"))


@pytest.mark.postgres
def test_catalog_postgresql(postgres_url):
    _exercise_catalog(Catalog(postgres_url))


# -- reservations: one attempt in flight per cell repeat, whoever asks ----------------------


def _reserve(cat: Catalog, cell: str, run: str, owner: str, **kw):
    return cat.reserve(cell, 0, campaign="camp", backend="slurm", run_id=run, owner=owner, cluster="cl", **kw)


def _exercise_reservations(cat: Catalog) -> None:
    cat.register("camp", "camp.yaml", [(f"c{i}", f"n{i}", {}) for i in range(4)])
    dag, cli = "host:1:100", "host:2:200"
    r = _reserve(cat, "c1", "dag-run", dag, max_in_flight=2)
    assert r.kind is Reserved.NEW and r.row.attempt == 1 and len(r.row.nonce) == 8 and r.row.state == "reserved"
    # another orchestrator on the same cell repeat: told what is in flight, never given a second attempt
    again = _reserve(cat, "c1", "cli-run", cli, max_in_flight=2)
    assert again.kind is Reserved.IN_FLIGHT and again.row.id == r.row.id
    # the cluster's limit of jobs in flight counts every cell on it
    assert _reserve(cat, "c2", "dag-run", dag, max_in_flight=2).kind is Reserved.NEW
    throttled = _reserve(cat, "c3", "cli-run", cli, max_in_flight=2)
    assert throttled.kind is Reserved.THROTTLED and throttled.in_flight == 2
    # a result makes it done for a plain run; a forced run measures again, once per run
    cat.update_attempt("c1", 0, 1, state="ended", outcome="ok", job_id="11")
    assert _reserve(cat, "c1", "cli-run", cli).kind is Reserved.DONE
    forced = _reserve(cat, "c1", "forced", cli, force=True)
    assert forced.kind is Reserved.NEW and forced.row.attempt == 2 and forced.row.nonce != r.row.nonce
    cat.update_attempt("c1", 0, 2, state="ended", outcome="ok")
    assert _reserve(cat, "c1", "forced", cli, force=True).kind is Reserved.DONE
    # a reservation whose owner is gone: exactly one taker
    orphan = _reserve(cat, "c3", "dag-run", "otherhost:9:9").row
    assert cat.take_over(orphan, cli) and not cat.take_over(orphan, dag)
    assert cat.in_flight("c3", 0).owner == cli
    cat.release(orphan.id)
    assert cat.in_flight("c3", 0) is None


def _race(url: str, n: int = 8) -> list[str]:
    """``n`` orchestrators (own catalog connections) reserve one cell repeat at the same moment."""
    import threading

    cats = [Catalog(url) for _ in range(n)]
    go = threading.Barrier(n)
    kinds: list[str] = []

    def one(i: int) -> None:
        go.wait()
        kinds.append(str(_reserve(cats[i], "c0", f"run{i}", f"host:{i}:1").kind))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return kinds


def test_reservations_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    _exercise_reservations(Catalog(url))
    kinds = _race(url)
    assert sorted(kinds).count("new") == 1 and set(kinds) <= {"new", "in_flight"}, kinds


@pytest.mark.postgres
def test_reservations_postgresql(postgres_url):
    _exercise_reservations(Catalog(postgres_url))
    kinds = _race(postgres_url)
    assert sorted(kinds).count("new") == 1 and set(kinds) <= {"new", "in_flight"}, kinds


def test_an_old_catalog_is_upgraded_in_place(tmp_path):
    """A catalog written before reservations: new columns added, duplicate live attempts settled, rows kept."""
    import sqlite3

    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE campaigns (name VARCHAR(128) PRIMARY KEY, source TEXT, first_seen DATETIME, last_seen DATETIME);
        CREATE TABLE cells (cell_id VARCHAR(32) PRIMARY KEY, name VARCHAR(256), config JSON, created DATETIME);
        CREATE TABLE campaign_cells (campaign VARCHAR(128), cell_id VARCHAR(32), PRIMARY KEY (campaign, cell_id));
        CREATE TABLE attempts (
            id INTEGER PRIMARY KEY AUTOINCREMENT, cell_id VARCHAR(32), repeat INTEGER, attempt INTEGER,
            campaign VARCHAR(128), run_id VARCHAR(256), backend VARCHAR(32), job_id VARCHAR(64),
            state VARCHAR(32), outcome VARCHAR(32), message TEXT, result_dir TEXT,
            submitted_at DATETIME, ended_at DATETIME, UNIQUE (cell_id, repeat, attempt));
        INSERT INTO cells VALUES ('c1', 'n1', '{}', '2026-01-01');
        INSERT INTO attempts (cell_id, repeat, attempt, campaign, backend, job_id, state, outcome, submitted_at)
        VALUES ('c1', 0, 1, 'camp', 'slurm', '101', 'ended', 'ok', '2026-01-01'),
               ('c1', 1, 1, 'camp', 'slurm', '102', 'submitted', NULL, '2026-01-01'),
               ('c1', 1, 2, 'camp', 'slurm', '103', 'submitted', NULL, '2026-01-01');
        """
    )
    con.commit()
    con.close()
    cat = Catalog(f"sqlite:///{path}")
    rows = {(a.repeat, a.attempt): a for a in cat.attempts(cell_id="c1")}
    assert rows[(0, 1)].outcome == "ok" and rows[(0, 1)].nonce is None  # old rows read as before
    assert rows[(1, 2)].state == "submitted"  # the newest live attempt stays in flight
    assert rows[(1, 1)].state == "ended" and rows[(1, 1)].outcome == "lost"
    assert cat.valid_result("c1", 0).job_id == "101"
    # and the in-flight index holds from now on
    assert _reserve(cat, "c1", "r", "h:1:1").kind is Reserved.DONE
    r1 = cat.reserve("c1", 1, campaign="camp", backend="slurm", run_id="r", owner="h:1:1")
    assert r1.kind is Reserved.IN_FLIGHT and r1.row.job_id == "103"
    Catalog(f"sqlite:///{path}")  # a second open finds nothing to do


def test_disk_full_while_collecting_names_the_path(tmp_path):
    import errno

    from charllm.errors import StorageError

    ident = JobIdentity("c", "abc", 0, 1, "n0nce")

    def full(d: Path):
        raise OSError(errno.ENOSPC, "No space left on device", str(d / "out" / "telemetry" / "rank0.parquet"))

    with pytest.raises(StorageError, match=r"cannot write .*/out/telemetry/rank0.parquet: no space left"):
        commit_attempt(tmp_path, ident, full, {}, lambda d: ("ok", None, ""))
    home = tmp_path / "ro"
    (home / "results").mkdir(parents=True)
    (home / "results").chmod(0o500)
    try:
        if os.geteuid() != 0:  # root writes anywhere: the permission case is only real for a user
            with pytest.raises(StorageError, match=r"cannot write .*results/.staging.*permission denied"):
                commit_attempt(home, ident, _job_dir, {}, lambda d: ("ok", None, ""))
    finally:
        (home / "results").chmod(0o700)
    # the attempt folder carries the nonce: a new catalog's attempt 1 never meets an old attempt 1's folder
    assert attempt_dir(tmp_path, ident).name == "a1-n0nce"
    assert attempt_dir(tmp_path, JobIdentity("c", "abc", 0, 1)).name == "a1"

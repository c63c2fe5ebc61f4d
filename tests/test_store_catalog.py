"""Results store (atomic attempts, manifests) and the results catalog (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charllm.backends.base import JobIdentity
from charllm.catalog import Catalog
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

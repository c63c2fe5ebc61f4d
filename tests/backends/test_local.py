"""The local backend runs real subprocesses; states, time limit, cancel, loss and re-attach."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from charllm.backends.base import JobIdentity, JobSpec, JobState, parse_time_limit
from charllm.backends.local import LocalBackend


def _wait(backend: LocalBackend, job_id: str, timeout_s: float = 30) -> JobState:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = backend.statuses([job_id])[job_id]
        if st.state.is_terminal:
            return st.state
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end: {st}")


def _spec(body: str, cell: str = "c0", attempt: int = 1) -> JobSpec:
    return JobSpec(JobIdentity("camp", cell, 0, attempt), "#!/bin/bash\n" + body + "\n", {"cell.json": "{}\n"})


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(tmp_path / "work", time_limit_s=30)


def test_time_limit_parsing():
    assert parse_time_limit("00:10:00") == 600
    assert parse_time_limit("1-00:00:01") == 86401
    assert parse_time_limit("30") == 1800
    assert parse_time_limit("05:00") == 300


def test_complete_and_outputs(backend, tmp_path):
    h = backend.submit(_spec("mkdir -p out; echo hello; echo oops >&2; cat cell.json > out/copy.json"))
    assert _wait(backend, h.job_id) is JobState.COMPLETED
    out, err = backend.tail(h)
    assert "hello" in out and "oops" in err
    dest = tmp_path / "fetched"
    backend.fetch(h, dest)
    assert (dest / "out" / "copy.json").read_text() == "{}\n"
    assert (dest / "job.sbatch").is_file()


def test_nonzero_exit_is_failed_with_code(backend):
    h = backend.submit(_spec("exit 3"))
    assert _wait(backend, h.job_id) is JobState.FAILED
    assert backend.statuses([h.job_id])[h.job_id].exit_code == 3


def test_time_limit_is_timeout(tmp_path):
    b = LocalBackend(tmp_path / "w", time_limit_s=1)
    h = b.submit(_spec("sleep 30"))
    assert _wait(b, h.job_id) is JobState.TIMEOUT


def test_job_spec_time_limit_overrides_backend_default(tmp_path):
    b = LocalBackend(tmp_path / "w", time_limit_s=3600)
    spec = _spec("sleep 30")
    spec = JobSpec(spec.identity, spec.script, spec.files, time_limit_s=1)
    h = b.submit(spec)
    assert _wait(b, h.job_id) is JobState.TIMEOUT


def test_cancel_running(backend):
    h = backend.submit(_spec("sleep 30"))
    deadline = time.monotonic() + 10
    while backend.statuses([h.job_id])[h.job_id].state is not JobState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    backend.cancel(h.job_id)
    assert _wait(backend, h.job_id) is JobState.CANCELLED


def test_vanished_process_is_lost(backend):
    h = backend.submit(_spec("sleep 30"))
    pid_file = Path(h.workdir) / "pid"
    deadline = time.monotonic() + 10
    while not pid_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(int(pid_file.read_text()), signal.SIGKILL)  # wrapper and job die without an exit code
    assert _wait(backend, h.job_id) is JobState.LOST


def test_resubmitting_same_identity_reattaches(backend):
    h1 = backend.submit(_spec("sleep 1"))
    h2 = backend.submit(_spec("sleep 1"))
    assert h1.job_id == h2.job_id
    assert backend.find(h1.identity) == h1
    h3 = backend.submit(_spec("true", attempt=2))
    assert h3.job_id != h1.job_id


def test_many_statuses_in_one_query(backend):
    handles = [backend.submit(_spec("true", cell=f"c{i}")) for i in range(10)]
    before = backend.query_count
    states = backend.statuses([h.job_id for h in handles] + ["local-doesnotexist"])
    assert backend.query_count == before + 1
    assert states["local-doesnotexist"].state is JobState.LOST
    assert len(states) == 11


def test_hostile_identity_is_data(backend):
    h = backend.submit(JobSpec(JobIdentity("camp", "c'; touch pwned", 0, 1), "#!/bin/bash\necho ok\n"))
    assert _wait(backend, h.job_id) is JobState.COMPLETED
    assert not (backend.root / "pwned").exists()


def test_jobs_queue_for_slots(tmp_path):
    b = LocalBackend(tmp_path / "w", time_limit_s=30, slots=1)
    first = b.submit(_spec("sleep 2", cell="a"))
    deadline = time.monotonic() + 10
    while b.statuses([first.job_id])[first.job_id].state is not JobState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # submitted once the first holds the slot (submitted together, either may take it first)
    second = b.submit(_spec("true", cell="b"))
    time.sleep(0.5)
    st = b.statuses([second.job_id])[second.job_id]
    assert st.state is JobState.PENDING and "slot" in st.reason
    assert _wait(b, second.job_id) is JobState.COMPLETED
    assert b.statuses([first.job_id])[first.job_id].state is JobState.COMPLETED

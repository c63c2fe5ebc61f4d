"""SlurmBackend against the real one-node dev cluster (slurmctld, slurmd, slurmdbd, sshd).

Every job is a few lines of bash. Jobs that must stay PENDING use ``--begin=now+1hour``,
so they take no CPU of the small node. The faults stop and restart real daemons through
``scripts/dev-cluster stop-daemon/start-daemon``; each test restarts what it stopped.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from charllm.backends.base import JobHandle, JobIdentity, JobSpec, JobState, JobStatus
from charllm.backends.slurm import SlurmBackend
from charllm.errors import SubmissionError, TransportError

DevCluster = Any  # tests/integration/conftest.py: DevCluster (conftest modules are not importable)

pytestmark = pytest.mark.slurm

RUN = uuid.uuid4().hex[:6]  # identities are unique per session: `find` must not see old runs
DONE = "mkdir -p out; echo '{}' > out/result.json"
# the fault tests below stop daemons; they are last in the file and restart what they stop


def script(body: str, *sbatch: str, time_limit: str = "00:03:00") -> str:
    header = "".join(f"#SBATCH {opt}\n" for opt in ("--cpus-per-task=1", "--mem=1", f"--time={time_limit}", *sbatch))
    return f"#!/bin/bash\n{header}{body}\n"


def ident(cell: str, campaign: str | None = None, attempt: int = 0) -> JobIdentity:
    return JobIdentity(campaign or f"it{RUN}", cell, 0, attempt)


def make_backend(cluster: DevCluster, **options: object) -> SlurmBackend:
    spec = {
        "kind": "slurm",
        "conn_id": cluster.conn_id,
        "workdir": "charllm-work",
        "partition": cluster.partition,
        "poll_interval_s": 1,
        "backoff_min_s": 0.5,
        "backoff_max_s": 4,
        **options,
    }
    return SlurmBackend.from_spec(spec)


@pytest.fixture(scope="module")
def backend(dev_cluster: DevCluster) -> Iterator[SlurmBackend]:
    b = make_backend(dev_cluster)
    yield b
    b.close()


@pytest.fixture(scope="module")
def submitted(backend: SlurmBackend) -> Iterator[list[JobHandle]]:
    """Every job this module submits; all cancelled at the end."""
    handles: list[JobHandle] = []
    yield handles
    for h in handles:
        try:
            backend.cancel(h.job_id)
        except (TransportError, SubmissionError):  # best-effort cleanup
            pass


@pytest.fixture(scope="module")
def submit(backend: SlurmBackend, submitted: list[JobHandle]) -> Callable[..., JobHandle]:
    def _submit(identity: JobIdentity, text: str, files: dict[str, str] | None = None) -> JobHandle:
        h = backend.submit(JobSpec(identity, text, files or {"cell.json": json.dumps({"cell": identity.cell_id})}))
        submitted.append(h)
        return h

    return _submit


@pytest.fixture(scope="module")
def timeout_job(submit: Callable[..., JobHandle]) -> JobHandle:
    """Submitted first, checked last: Slurm keeps time limits in minutes, so it takes ~1-1.5 min."""
    return submit(ident("timeout"), script("echo start; sleep 600", time_limit="00:00:05"))


def wait(
    backend: SlurmBackend, job_id: str, until: Callable[[JobStatus], bool], timeout_s: float = 60, every_s: float = 0.5
) -> JobStatus:
    end = time.monotonic() + timeout_s
    while True:
        st = backend.statuses([job_id])[job_id]
        if until(st):
            return st
        if time.monotonic() > end:
            raise AssertionError(f"job {job_id} still {st} after {timeout_s}s")
        time.sleep(every_s)


def terminal(st: JobStatus) -> bool:
    """Ended, and (unless it succeeded) its exit code is in accounting already."""
    return st.state.is_terminal and (st.state.is_success or st.exit_code is not None or st.state is JobState.LOST)


def running(st: JobStatus) -> bool:
    return st.state is JobState.RUNNING


# -- the happy path --------------------------------------------------------------------------


def test_submit_complete_fetch_tail(
    backend: SlurmBackend, submit: Callable[..., JobHandle], timeout_job: JobHandle, tmp_path: Path
) -> None:
    h = submit(ident("ok"), script(f"echo hi; echo warn >&2; sleep 1; {DONE}"))
    assert h.job_id.isdigit() and h.workdir == f"charllm-work/{h.identity.relpath}"
    st = wait(backend, h.job_id, terminal)
    assert (st.state, st.exit_code, st.signal) == (JobState.COMPLETED, 0, 0)
    assert st.nodes and st.elapsed_s is not None and st.elapsed_s >= 1
    out, err = backend.tail(h)
    assert out == "hi\n" and err == "warn\n"
    backend.fetch(h, tmp_path / "job")
    got = sorted(str(p.relative_to(tmp_path / "job")) for p in (tmp_path / "job").rglob("*") if p.is_file())
    assert got == ["cell.json", "job.sbatch", "jobid", "out/result.json", "stderr.log", "stdout.log"]
    assert json.loads((tmp_path / "job" / "cell.json").read_text()) == {"cell": "ok"}


def test_nonzero_exit_is_failed_with_its_code(backend: SlurmBackend, submit: Callable[..., JobHandle]) -> None:
    h = submit(ident("exit3"), script("echo oops >&2; exit 3"))
    st = wait(backend, h.job_id, terminal)
    assert (st.state, st.exit_code, st.signal) == (JobState.FAILED, 3, 0)
    assert backend.tail(h)[1] == "oops\n"


def test_killed_by_signal_reads_the_signal(backend: SlurmBackend, submit: Callable[..., JobHandle]) -> None:
    h = submit(ident("sig9"), script("kill -9 $$"))
    st = wait(backend, h.job_id, terminal)
    assert st.state is JobState.FAILED
    assert (st.exit_code, st.signal) == (0, 9)


def test_impossible_resources_are_refused(backend: SlurmBackend, submitted: list[JobHandle]) -> None:
    i = ident("toobig")
    with pytest.raises(SubmissionError, match=r"(?i)node configuration|not available|gres"):
        backend.submit(JobSpec(i, script("true", "--gres=gpu:99")))
    assert backend.find(i) is None


def test_submit_is_idempotent(dev_cluster: DevCluster, backend: SlurmBackend, submit: Callable[..., JobHandle]) -> None:
    i = ident("twice")
    h1 = submit(i, script("true", "--begin=now+1hour"))
    h2 = backend.submit(JobSpec(i, script("true", "--begin=now+1hour")))
    assert h2 == h1
    fresh = make_backend(dev_cluster)  # a restarted orchestrator: new process, new connection
    try:
        assert fresh.submit(JobSpec(i, "#!/bin/bash\ntrue\n")) == h1
        assert fresh.counters.by_command["sbatch"] == 0
    finally:
        fresh.close()
    backend.cancel(h1.job_id)
    st = wait(backend, h1.job_id, terminal)
    assert st.state is JobState.CANCELLED
    assert backend.submit(JobSpec(i, "#!/bin/bash\ntrue\n")) == h1  # finished jobs count too


def test_cancel_pending_and_running(backend: SlurmBackend, submit: Callable[..., JobHandle]) -> None:
    pending = submit(ident("cancel-pending"), script("sleep 600", "--begin=now+1hour"))
    run = submit(ident("cancel-running"), script("sleep 600"))
    st = backend.statuses([pending.job_id])[pending.job_id]
    assert st.state is JobState.PENDING and st.reason == "BeginTime"
    wait(backend, run.job_id, running, timeout_s=90)
    backend.cancel(pending.job_id)
    backend.cancel(run.job_id)
    for h in (pending, run):
        st = wait(backend, h.job_id, terminal)
        assert st.state is JobState.CANCELLED and not st.state.is_retryable
    backend.cancel(run.job_id)  # cancelling an ended job is not an error


def test_trigger_on_kill_scancels_the_waiting_job(backend: SlurmBackend, submit: Callable[..., JobHandle]) -> None:
    """Clearing or marking failed a deferred wait task: the triggerer calls on_kill, which scancels."""
    from charllm.orchestrate.triggers import JobTrigger

    run = submit(ident("trigger-kill"), script("sleep 600"))
    wait(backend, run.job_id, running, timeout_s=90)
    trigger = JobTrigger(backend.spec(), run.job_id, 1.0, handle=run.as_dict())
    _, kwargs = trigger.serialize()
    asyncio.run(JobTrigger(**kwargs).on_kill())  # as the triggerer rebuilds it from the database
    st = wait(backend, run.job_id, terminal)
    assert st.state is JobState.CANCELLED


def test_statuses_of_20_jobs_in_one_query(backend: SlurmBackend, submit: Callable[..., JobHandle]) -> None:
    handles = [submit(ident(f"many{i:02d}"), script("true", "--begin=now+1hour")) for i in range(20)]
    ids = [h.job_id for h in handles]
    trips, queries = backend.counters.round_trips, backend.query_count
    st = backend.statuses(ids)
    # one SSH round trip: sacct, plus squeue because they are PENDING (for the reason)
    assert backend.counters.round_trips - trips == 1
    assert backend.query_count - queries == 2
    assert {s.state for s in st.values()} == {JobState.PENDING}  # never LOST right after submission
    assert {s.reason for s in st.values()} == {"BeginTime"}

    # the async path, while the event loop keeps ticking (nothing blocks it)
    async def poll_with_heartbeat() -> tuple[dict[str, JobStatus], float]:
        gaps: list[float] = []

        async def heartbeat() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        beat = asyncio.create_task(heartbeat())
        try:
            first = await backend.astatuses(ids)  # connects
            again = await backend.astatuses(ids)  # reuses the connection
            assert again.keys() == first.keys()
        finally:
            beat.cancel()
            await backend.aclose()
        return first, max(gaps)

    ast, worst_gap_s = asyncio.run(poll_with_heartbeat())
    assert {s.state for s in ast.values()} == {JobState.PENDING}
    assert worst_gap_s < 0.25, f"event loop blocked for {worst_gap_s:.3f}s"

    for h in handles:
        backend.cancel(h.job_id)
    queries = backend.query_count
    st = wait(backend, ids[-1], terminal)
    st_all = backend.statuses(ids)
    assert {s.state for s in st_all.values()} == {JobState.CANCELLED}


def test_quoting_hostile_workdir_and_identity(
    dev_cluster: DevCluster, submit: Callable[..., JobHandle], tmp_path: Path
) -> None:
    hostile = 'it\'s "q"; touch PWNED $(touch PWNED2) `touch PWNED3`'
    b = make_backend(dev_cluster, workdir=f"charllm-work/quoting {RUN}/{hostile}")
    i = JobIdentity(f"camp {hostile}", "cell; rm -rf ~", 0, 0)
    try:
        h = b.submit(JobSpec(i, script(f'echo "$PWD"; {DONE}'), {"cell.json": "{}"}))
        assert b.submit(JobSpec(i, "#!/bin/bash\n")) == h
        st = wait(b, h.job_id, terminal, timeout_s=240)  # a busy one-node cluster may queue it
        assert st.state is JobState.COMPLETED
        out, _ = b.tail(h)
        assert out.rstrip("\n").endswith(h.workdir)
        b.fetch(h, tmp_path / "q")
        assert (tmp_path / "q" / "out" / "result.json").exists()
        _, found, _ = b.transport.run("find ~ -maxdepth 8 -name 'PWNED*'")  # names that start with it
        assert found == ""
        assert b.find(i) == h
    finally:
        b.close()


def test_host_keys_are_checked(dev_cluster: DevCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """known_hosts from the connection extra on both paths; a wrong or unknown key is refused at once."""
    base = json.loads(dev_cluster.env["AIRFLOW_CONN_CHARLLM_DEV_CLUSTER"])
    extra = {k: v for k, v in base["extra"].items() if k != "host_key"}
    port = base["port"]
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{port} ssh-ed25519 {_other_ed25519_key()}\n")
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    for name, known_hosts in (
        ("good", dev_cluster.env["CHARLLM_SSH_KNOWN_HOSTS"]),
        ("wrong", str(wrong)),
        ("empty", str(empty)),
    ):
        conn = {**base, "extra": {**extra, "known_hosts": known_hosts}}
        monkeypatch.setenv(f"AIRFLOW_CONN_CHARLLM_KH_{name.upper()}", json.dumps(conn))
    good = make_backend(dev_cluster, conn_id="charllm_kh_good")
    assert good.statuses(["1"])["1"].state is not None
    assert asyncio.run(good.astatuses(["1"]))["1"].state is not None
    good.close()
    for name in ("wrong", "empty"):
        b = make_backend(dev_cluster, conn_id=f"charllm_kh_{name}")
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="not retried"):
            b.statuses(["1"])
        with pytest.raises(TransportError, match="not retried"):
            asyncio.run(b.astatuses(["1"]))
        assert time.monotonic() - t0 < 5  # no back-off for a configuration error


def _other_ed25519_key() -> str:
    """The base64 of some Ed25519 public key that is not the dev cluster's."""
    import base64

    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + bytes(range(32))
    return base64.b64encode(blob).decode()


def test_time_limit_is_timeout(backend: SlurmBackend, timeout_job: JobHandle) -> None:
    st = wait(backend, timeout_job.job_id, terminal, timeout_s=150, every_s=2)
    assert st.state is JobState.TIMEOUT
    assert not st.state.is_success and not st.state.is_retryable


# -- faults ------------------------------------------------------------------------------------


def test_sshd_restart_during_polling(
    dev_cluster: DevCluster, backend: SlurmBackend, submit: Callable[..., JobHandle]
) -> None:
    h = submit(ident("sshd"), script("true", "--begin=now+1hour"))
    backend.statuses([h.job_id])  # a connection is open
    dev_cluster.stop_daemon("sshd")
    restarter: threading.Timer | None = None
    try:
        # established sessions outlive the listener, as with a real sshd restart
        assert backend.statuses([h.job_id])[h.job_id].state is JobState.PENDING
        # a new connection is refused: bounded retries, then TransportError
        quick = make_backend(dev_cluster, connect_tries=2, backoff_min_s=0.2, backoff_max_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="2 tries"):
            quick.statuses([h.job_id])
        with pytest.raises(TransportError):
            asyncio.run(quick.astatuses([h.job_id]))
        assert time.monotonic() - t0 < 10
        # sshd comes back while the back-off is running: the call recovers by itself
        patient = make_backend(dev_cluster, connect_tries=8, backoff_min_s=0.5, backoff_max_s=2)
        restarter = threading.Timer(2.0, dev_cluster.start_daemon, args=("sshd",))
        restarter.start()
        t0 = time.monotonic()
        assert patient.statuses([h.job_id])[h.job_id].state is JobState.PENDING
        assert time.monotonic() - t0 >= 1.5
        restarter.join()
        # and the async path, the same way
        dev_cluster.stop_daemon("sshd")
        restarter = threading.Timer(2.0, dev_cluster.start_daemon, args=("sshd",))
        restarter.start()
        fresh = make_backend(dev_cluster, connect_tries=8, backoff_min_s=0.5, backoff_max_s=2)
        st = asyncio.run(fresh.astatuses([h.job_id]))
        assert st[h.job_id].state is JobState.PENDING
        restarter.join()
        patient.close()
    finally:
        if restarter is not None:
            restarter.join()
        dev_cluster.start_daemon("sshd")


def test_slurmctld_restart_while_a_job_runs(
    dev_cluster: DevCluster, backend: SlurmBackend, submit: Callable[..., JobHandle]
) -> None:
    h = submit(ident("ctld"), script(f"sleep 25; {DONE}"))
    wait(backend, h.job_id, running, timeout_s=90)
    dev_cluster.stop_daemon("slurmctld")  # SIGTERM
    seen: list[str] = []
    t0 = time.monotonic()
    try:
        for _ in range(2):  # slurmdbd answers, but only slurmctld knows live jobs for sure
            try:
                seen.append(backend.statuses([h.job_id])[h.job_id].state.value)
            except TransportError as err:
                seen.append(f"TransportError: {err}")
            time.sleep(1)
    finally:
        dev_cluster.start_daemon("slurmctld")
    assert time.monotonic() - t0 < 40, "a poll hung on the missing controller"
    assert all(s in ("RUNNING", "UNKNOWN") or s.startswith("TransportError") for s in seen), seen
    st = wait(backend, h.job_id, terminal, timeout_s=90, every_s=1)
    assert st.state is JobState.COMPLETED, st


def test_slurmd_killed_during_a_job(
    dev_cluster: DevCluster, backend: SlurmBackend, submit: Callable[..., JobHandle]
) -> None:
    h = submit(ident("slurmd"), script("sleep 600"))
    wait(backend, h.job_id, running, timeout_s=90)
    dev_cluster.stop_daemon("slurmd", kill=True)
    seen: list[JobStatus] = []
    try:
        # slurmctld notices after SlurmdTimeout (30 s on the dev cluster), marks the node
        # DOWN, ends the job NODE_FAIL and requeues it (the script asks for --requeue)
        end = time.monotonic() + 100
        while time.monotonic() < end:
            st = backend.statuses([h.job_id])[h.job_id]
            seen.append(st)
            if st.state is not JobState.RUNNING:
                break
            time.sleep(2)
    finally:
        dev_cluster.start_daemon("slurmd")
    states = [s.state.value for s in seen]
    last = seen[-1]
    assert last.state in (JobState.NODE_FAIL, JobState.REQUEUED, JobState.PENDING), states
    if last.state is JobState.NODE_FAIL:  # not requeued: the caller resubmits
        assert last.state.is_retryable
    else:
        # requeued under the same id: not terminal, so the caller keeps waiting instead of
        # submitting a second copy; Slurm holds it ~2 min (BeginTime) before it reruns
        assert not last.state.is_terminal
        assert backend.statuses([h.job_id])[h.job_id].state in (JobState.PENDING, JobState.REQUEUED)
    backend.cancel(h.job_id)
    assert wait(backend, h.job_id, terminal).state is JobState.CANCELLED
    # and the node is back in service (ReturnToService=2)
    end = time.monotonic() + 30
    while True:
        nodes = dev_cluster.slurm("sinfo", "-h", "-o", "%T").split()
        if nodes and all(n in ("idle", "mixed", "allocated", "completing") for n in nodes):
            break
        assert time.monotonic() < end, f"node not back in service: {nodes}"
        time.sleep(1)

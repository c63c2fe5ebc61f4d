"""SlurmBackend logic without SSH: the local-shell transport, with the fake Slurm of ``tests/fake_slurm``
(``sbatch``, ``sacct``, ``squeue``, ``scancel``) on its ``PATH``.

Covers the spec round trip, the reconnect/back-off policy, idempotent submission (also when
the connection breaks right after sbatch ran) and the async status path. Broken connections
come from :class:`FlakyShell`, a local-shell transport whose primitives fail on demand: the
backend is driven through its public interface only.
"""

from __future__ import annotations

import asyncio
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
import pytest

from charllm.backends import make_backend
from charllm.backends.base import JobIdentity, JobSpec, JobState
from charllm.backends.slurm import SlurmBackend, SlurmConfig
from charllm.errors import ConfigError, ParseError, SubmissionError, TransportError
from charllm.transport import Backoff
from charllm.transport.local import LocalShellTransport
from charllm.transport.ssh import FATAL_SSH, RETRY_SSH
from tests.fake_slurm import fake_slurm

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash runs the stand-in cluster")

IDENT = JobIdentity("demo", "cell-a", 0, 0)
# jobs stay PENDING (reason Priority) for the whole test; ids count from 101
SCENARIO = {"first_id": 100, "start_s": 3600, "run_s": 7200}


class FlakyShell(LocalShellTransport):
    """The local shell, with SSH's error classes, whose command lines fail while ``failures`` lasts.

    ``sync``/``async_``: what runs a command line (default: the local shell); tests swap them to
    break a connection after a command, to forbid the blocking path, or to answer garbage.
    """

    retry_errors = RETRY_SSH
    fatal_errors = FATAL_SSH

    def __init__(self, home: Path, env: dict[str, str], backoff: Backoff) -> None:
        self.sleeps: list[float] = []
        self.asleeps: list[float] = []

        async def asleep(delay: float) -> None:
            self.asleeps.append(delay)

        super().__init__(home, env=env, command_timeout_s=30, backoff=backoff, sleep=self.sleeps.append, asleep=asleep)
        self.failures: list[BaseException] = []
        self.afailures: list[BaseException] = []
        self.sync: Callable[[str], tuple[int, str, str]] = super().exec_raw
        self.async_: Callable[[str], Any] = super().aexec_raw
        self.read_failures: list[BaseException] = []

    def exec_raw(self, line: str) -> tuple[int, str, str]:
        if self.failures:
            raise self.failures.pop(0)
        return self.sync(line)

    async def aexec_raw(self, line: str) -> tuple[int, str, str]:
        if self.afailures:
            raise self.afailures.pop(0)
        res: tuple[int, str, str] = await self.async_(line)
        return res

    def read_raw(self, path: str, last_bytes: int | None = None) -> bytes:
        if self.read_failures:
            raise self.read_failures[0]
        return super().read_raw(path, last_bytes)


def make(tmp_path: Path, **options: Any) -> SlurmBackend:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    fake = fake_slurm.install(tmp_path / "bin", tmp_path / "slurm", SCENARIO)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(home), "FAKE_SLURM_DIR": fake["FAKE_SLURM_DIR"]}
    config = SlurmConfig.from_spec({"conn_id": "fake", "workdir": "w d", "transport": "local", **options})
    backend = SlurmBackend(config, transport=FlakyShell(home, env, config.backoff()))
    backend.home = home  # type: ignore[attr-defined]
    return backend


def shell(backend: SlurmBackend) -> FlakyShell:
    assert isinstance(backend.transport, FlakyShell)
    return backend.transport


def calls(backend: SlurmBackend) -> list[str]:
    """The fake Slurm commands run so far, by name."""
    path = backend.home.parent / "slurm" / "calls.log"  # type: ignore[attr-defined]
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


# -- spec ------------------------------------------------------------------------------------


def test_spec_round_trip_and_make_backend() -> None:
    spec = {
        "kind": "slurm",
        "conn_id": "charllm_dev_cluster",
        "workdir": "charllm-work",
        "partition": "debug",
        "poll_interval_s": 20,
    }
    b = SlurmBackend.from_spec(spec)
    out = b.spec()
    assert {k: out[k] for k in spec} == spec
    again = make_backend(out)
    assert isinstance(again, SlurmBackend) and again.spec() == out
    assert again.poll_key == b.poll_key == "slurm:charllm_dev_cluster"
    import json

    assert json.loads(json.dumps(out)) == out  # serialisable as is (trigger kwargs)


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "slurm", "bogus": 1},
        {"kind": "local"},
        {"kind": "slurm", "partition": "a b"},
        {"kind": "slurm", "workdir": ""},
        {"kind": "slurm", "poll_interval_s": 0},
        {"kind": "slurm", "connect_tries": 0},
        {"kind": "slurm", "extra_sbatch_args": "--mem=1"},
    ],
)
def test_bad_specs(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SlurmBackend.from_spec(bad)


def test_backoff_is_bounded_and_jittered() -> None:
    b = SlurmBackend(SlurmConfig(backoff_min_s=1, backoff_max_s=30))
    assert b.transport.backoff == Backoff(5, 1, 30)  # the SSH transport's, one policy for sync and async
    for attempt in range(1, 12):
        delays = {b.transport.backoff.delay(attempt) for _ in range(50)}
        base = min(30, 2 ** (attempt - 1))
        assert all(0.5 * base <= d <= min(30, 1.5 * base) for d in delays)
        assert len(delays) > 1  # jittered


# -- reconnects ------------------------------------------------------------------------------


def test_transport_errors_retry_with_backoff_then_give_up(tmp_path: Path) -> None:
    b = make(tmp_path, connect_tries=4)
    t = shell(b)
    t.failures = [EOFError("eof"), paramiko.SSHException("banner"), ConnectionResetError("reset")]
    b.submit(JobSpec(IDENT, "#!/bin/bash\n"))
    assert len(t.sleeps) == 3

    t.failures = [ConnectionRefusedError("refused")] * 10
    t.sleeps.clear()
    with pytest.raises(TransportError, match="4 tries"):
        b.statuses(["101"])
    assert len(t.sleeps) == 3


@pytest.mark.parametrize(
    "err",
    [
        paramiko.AuthenticationException("denied"),
        paramiko.BadHostKeyException("h", paramiko.RSAKey.generate(1024), paramiko.RSAKey.generate(1024)),
    ],
)
def test_auth_failures_are_not_retried(tmp_path: Path, err: Exception) -> None:
    b = make(tmp_path)
    shell(b).failures = [err] * 10
    with pytest.raises(TransportError, match="not retried"):
        b.statuses(["1"])
    assert shell(b).sleeps == []


def test_file_errors_are_not_transport_errors(tmp_path: Path) -> None:
    b = make(tmp_path)
    h = b.submit(JobSpec(IDENT, "#!/bin/bash\n"))
    assert b.tail(h) == ("", "")  # no logs yet: FileNotFoundError means "empty", no retries
    assert shell(b).sleeps == []


# -- submit, find, cancel, fetch on the stand-in cluster -----------------------------------


def test_submit_stages_files_and_is_idempotent(tmp_path: Path) -> None:
    b = make(tmp_path)
    spec = JobSpec(IDENT, "#!/bin/bash\necho hi\n", {"cell.json": '{"a": 1}', "conf/x.yaml": "k: v\n"})
    h1 = b.submit(spec)
    job = b.home / "w d" / IDENT.relpath  # type: ignore[attr-defined]
    assert h1.workdir == f"w d/{IDENT.relpath}"
    assert (job / "job.sbatch").read_text() == spec.script
    assert (job / "cell.json").read_text() == '{"a": 1}'
    assert (job / "conf" / "x.yaml").read_text() == "k: v\n"
    assert (job / "jobid").read_text().strip() == h1.job_id
    h2 = b.submit(spec)
    assert h2 == h1
    assert calls(b).count("sbatch") == 1
    assert b.find(JobIdentity("demo", "cell-a", 0, 1)) is None


def test_submit_reattaches_when_the_connection_breaks_after_sbatch(tmp_path: Path) -> None:
    b = make(tmp_path)
    real = shell(b).sync
    broke: list[str] = []

    def breaks_after_sbatch(line: str) -> tuple[int, str, str]:
        res = real(line)
        if "sbatch" in line and "--parsable" in line and not broke:
            broke.append(line)
            raise EOFError("connection lost after sbatch ran")
        return res

    shell(b).sync = breaks_after_sbatch
    h = b.submit(JobSpec(IDENT, "#!/bin/bash\n"))
    assert broke and calls(b).count("sbatch") == 1
    assert h.job_id == "101"


def test_sbatch_refusal_is_a_submission_error_with_its_stderr(tmp_path: Path) -> None:
    b = make(tmp_path, extra_sbatch_args=["--mem=9999999G"])
    with pytest.raises(SubmissionError, match="Memory specification"):
        b.submit(JobSpec(IDENT, "#!/bin/bash\n"))


def test_statuses_cancel_fetch_tail(tmp_path: Path) -> None:
    b = make(tmp_path)
    h = b.submit(JobSpec(IDENT, "#!/bin/bash\n", {"cell.json": "{}"}))
    st = b.statuses([h.job_id, "999"])
    assert st[h.job_id].state is JobState.PENDING and st[h.job_id].reason == "Priority"
    assert st["999"].state is JobState.LOST
    assert b.query_count == 2 + 2  # find (squeue+sacct) + status (sacct, then squeue for PENDING)
    b.cancel(h.job_id)
    assert b.statuses([h.job_id])[h.job_id].state is JobState.CANCELLED
    job = b.home / h.workdir  # type: ignore[attr-defined]
    (job / "stdout.log").write_text("x" * 5000 + "END")
    (job / "out").mkdir()
    (job / "out" / "result.json").write_text("{}")
    (job / "link").symlink_to("/etc/passwd")
    out, err = b.tail(h, 10)
    assert out == "xxxxxxxEND" and err == ""
    dest = tmp_path / "fetched"
    b.fetch(h, dest)
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["cell.json", "job.sbatch", "jobid", "out/result.json", "stdout.log"]
    assert not (dest / "link").exists()
    assert stat.S_ISREG((dest / "out" / "result.json").stat().st_mode)


def test_statuses_of_many_jobs_is_one_round_trip_per_chunk(tmp_path: Path) -> None:
    b = make(tmp_path, max_ids_per_query=50)
    ids = [str(1000 + i) for i in range(120)]
    before = b.counters.round_trips
    st = b.statuses(ids)
    assert b.counters.round_trips - before == 3
    assert {s.state for s in st.values()} == {JobState.LOST}


# -- async ---------------------------------------------------------------------------------


def test_astatuses_uses_the_async_path_and_retries(tmp_path: Path) -> None:
    b = make(tmp_path, connect_tries=3)
    h = b.submit(JobSpec(IDENT, "#!/bin/bash\n"))

    def no_sync(line: str) -> tuple[int, str, str]:
        raise AssertionError("astatuses must not use the blocking transport")

    t = shell(b)
    t.afailures = [TimeoutError(), ConnectionResetError()]
    slept = t.asleeps
    t.sync = no_sync
    st = asyncio.run(b.astatuses([h.job_id]))
    assert st[h.job_id].state is JobState.PENDING
    assert len(slept) == 2

    t.afailures.extend([ConnectionResetError()] * 3)
    with pytest.raises(TransportError):
        asyncio.run(b.astatuses([h.job_id]))

    async def garbage(line: str) -> tuple[int, str, str]:
        return 0, "motd\n", ""

    t.async_ = garbage
    with pytest.raises(ParseError):
        asyncio.run(b.astatuses([h.job_id]))
    assert asyncio.run(b.astatuses([])) == {}


def test_bad_staged_file_name_is_rejected_before_any_remote_call(tmp_path: Path) -> None:
    b = make(tmp_path)
    with pytest.raises(ConfigError):
        b.submit(JobSpec(IDENT, "#!/bin/bash\n", {"../evil": "x"}))
    assert calls(b) == []


def test_unknown_host_key_is_rejected(tmp_path: Path) -> None:
    """The policy we install refuses unknown hosts with an error that is not retried."""
    from charllm.transport.ssh import HostKeyUnknown, RejectUnknownHosts

    key = paramiko.RSAKey.generate(1024)
    with pytest.raises(HostKeyUnknown) as exc:
        RejectUnknownHosts().missing_host_key(paramiko.SSHClient(), "[127.0.0.1]:2222", key)
    assert isinstance(exc.value, FATAL_SSH)
    assert "known_hosts" in str(exc.value)


def test_missing_connection_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_CHARLLM_NO_SUCH_CONN", raising=False)
    b = SlurmBackend(conn_id="charllm_no_such_conn")
    with pytest.raises(ConfigError, match="charllm_no_such_conn"):
        b.statuses(["1"])
    with pytest.raises(ConfigError, match="charllm_no_such_conn"):
        asyncio.run(b.astatuses(["1"]))


@pytest.mark.parametrize(
    "stderr",
    [
        "sbatch: error: QOSMaxSubmitJobPerUserLimit\nsbatch: error: Batch job submission failed: Job violates "
        "accounting/QOS policy (job submit limit, user's size and/or time limits)",
        "sbatch: error: AssocMaxSubmitJobLimit",
        "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy",
    ],
)
def test_submit_limit_refusals_are_their_own_error(tmp_path: Path, stderr: str) -> None:
    """Waited out and submitted again by the lifecycle, never a failed cell (unlike a refusal for resources)."""
    from charllm.errors import SubmitLimitError

    b = make(tmp_path)
    real = shell(b).sync

    def refuse(line: str) -> tuple[int, str, str]:
        if "sbatch" in line and "--parsable" in line:
            return 1, "", stderr
        return real(line)

    shell(b).sync = refuse
    with pytest.raises(SubmitLimitError, match="submit limit"):
        b.submit(JobSpec(IDENT, "#!/bin/bash\n"))
    assert b.find(IDENT) is None


def test_the_log_tail_tries_once(tmp_path: Path) -> None:
    b = make(tmp_path, connect_tries=5)
    h = b.submit(JobSpec(IDENT, "#!/bin/bash\n"))

    t = shell(b)
    t.failures = [ConnectionRefusedError("refused")] * 10
    t.read_failures = [ConnectionRefusedError("refused")]
    t.sleeps.clear()
    with pytest.raises(TransportError, match="1 tries"):
        b.tail(h, tries=1)
    assert t.sleeps == []


def test_local_transport_runs_the_slurm_commands_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transport 'local': sbatch/sacct/squeue of this machine (here the tests' fake scheduler), files in place."""
    env = fake_slurm.install(tmp_path / "bin", tmp_path / "slurm", {"run_s": 0.3})
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("FAKE_SLURM_DIR", env["FAKE_SLURM_DIR"])
    b = SlurmBackend.from_spec(
        {"kind": "slurm", "conn_id": "unused", "workdir": str(tmp_path / "w"), "transport": "local"}
    )
    ident = JobIdentity("demo", "cell-a", 0, 1, "abcd1234")
    h = b.submit(JobSpec(ident, "#!/bin/bash\n", {"cell.json": "{}"}))
    assert h.workdir == f"{tmp_path}/w/demo/cell-a/r0/a1-abcd1234" and (Path(h.workdir) / "cell.json").exists()
    assert b.submit(JobSpec(ident, "#!/bin/bash\n")) == h  # found by name: submitted once
    import time

    time.sleep(0.4)
    st = b.statuses([h.job_id])[h.job_id]
    assert st.state is JobState.COMPLETED and st.exit_code == 0
    assert asyncio.run(b.astatuses([h.job_id]))[h.job_id].state is JobState.COMPLETED
    b.fetch(h, tmp_path / "fetched")
    assert (tmp_path / "fetched" / "out" / "result.json").exists()
    assert [j["name"] for j in fake_slurm.jobs(tmp_path / "slurm")] == [ident.job_name]

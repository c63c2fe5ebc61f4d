"""SlurmBackend logic without SSH: the "remote" is a local bash with stand-in Slurm commands.

Covers the spec round trip, the reconnect/back-off policy, idempotent submission (also when
the connection breaks right after sbatch ran) and the async status path.
"""

from __future__ import annotations

import asyncio
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import paramiko
import pytest

from charllm.backends import make_backend
from charllm.backends.base import JobIdentity, JobSpec, JobState
from charllm.backends.slurm import SlurmBackend, SlurmConfig
from charllm.errors import ConfigError, ParseError, SubmissionError, TransportError

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash runs the stand-in cluster")

IDENT = JobIdentity("demo", "cell-a", 0, 0)

# A tiny fake scheduler in shell: jobs.txt holds "id|name|state|exit" lines.
FAKE_SLURM = r"""
timeout() { shift; "$@"; }
_fmt() { printf '%s|%s|%s|%s|00:00:01|node1|None|2026-11-22T03:00:00|2026-11-22T03:00:01|Unknown|%s\n' "$1" "$1" "$3" "$4" "$2"; }
sbatch() {
  name=""; for a in "$@"; do case "$a" in --job-name=*) name="${a#--job-name=}";; --mem=999999*) echo "sbatch: error: Memory specification can not be satisfied" >&2; return 1;; esac; done
  n=$(( $(cat "$HOME/next" 2>/dev/null || echo 100) + 1 )); echo "$n" > "$HOME/next"
  echo "$n|$name|PENDING|0:0" >> "$HOME/jobs.txt"; echo "sbatch" >> "$HOME/calls"; echo "$n"
}
squeue() {
  echo squeue >> "$HOME/calls"; name=""; ids=""
  while [ $# -gt 0 ]; do case "$1" in --name=*) name="${1#--name=}";; -j) shift; ids=",$1,";; esac; shift; done
  [ -f "$HOME/jobs.txt" ] || return 0
  while IFS='|' read -r id jn st ec; do
    if [ -n "$name" ] && [ "$jn" != "$name" ]; then continue; fi
    case "$ids" in "") ;; *",$id,"*) ;; *) continue;; esac
    printf '%s|%s|%s|Priority|||%s\n' "$id" "$id" "$st" "$jn"
  done < "$HOME/jobs.txt"
}
sacct() {
  echo sacct >> "$HOME/calls"; name=""; ids=""
  while [ $# -gt 0 ]; do case "$1" in --name=*) name="${1#--name=}";; -j) shift; ids=",$1,";; esac; shift; done
  [ -f "$HOME/jobs.txt" ] || return 0
  while IFS='|' read -r id jn st ec; do
    if [ -n "$name" ] && [ "$jn" != "$name" ]; then continue; fi
    case "$ids" in "") ;; *",$id,"*) ;; *) continue;; esac
    _fmt "$id" "$jn" "$st" "$ec"
  done < "$HOME/jobs.txt"
}
scancel() { echo scancel >> "$HOME/calls"; sed -i "s/^$1|\([^|]*\)|[^|]*|/$1|\1|CANCELLED|/" "$HOME/jobs.txt"; }
"""


class LocalSftp:
    """The few SFTP calls the backend makes, on a local directory."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def _p(self, path: str) -> Path:
        return self.home / path

    def open(self, path: str, mode: str = "rb") -> Any:
        return LocalFile(open(self._p(path), mode))

    def listdir_attr(self, path: str) -> list[paramiko.SFTPAttributes]:
        out = []
        for child in self._p(path).iterdir():
            attr = paramiko.SFTPAttributes.from_stat(child.lstat(), child.name)
            out.append(attr)
        return out


class LocalFile:
    def __init__(self, fh: Any) -> None:
        self.fh = fh

    def __enter__(self) -> LocalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def stat(self) -> Any:
        import os

        return os.fstat(self.fh.fileno())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)


def make(tmp_path: Path, **options: Any) -> SlurmBackend:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    backend = SlurmBackend(conn_id="fake", workdir="w d", **options)
    sleeps: list[float] = []
    backend._sleep = sleeps.append  # type: ignore[method-assign]
    backend.sleeps = sleeps  # type: ignore[attr-defined]

    def exec_raw(line: str) -> tuple[int, str, str]:
        backend.counters.round_trips += 1
        res = subprocess.run(
            ["bash", "-c", FAKE_SLURM + "\n" + line],
            cwd=home,
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
        )
        return res.returncode, res.stdout, res.stderr

    backend._exec_raw = exec_raw  # type: ignore[method-assign]
    backend._get_sftp = lambda: LocalSftp(home)  # type: ignore[assignment,method-assign,return-value]
    backend.home = home  # type: ignore[attr-defined]
    return backend


def calls(backend: SlurmBackend) -> list[str]:
    path = backend.home / "calls"  # type: ignore[attr-defined]
    return path.read_text().split() if path.exists() else []


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
    for attempt in range(1, 12):
        delays = {b._backoff_delay(attempt) for _ in range(50)}
        base = min(30, 2 ** (attempt - 1))
        assert all(0.5 * base <= d <= min(30, 1.5 * base) for d in delays)
        assert len(delays) > 1  # jittered


# -- reconnects ------------------------------------------------------------------------------


def test_transport_errors_retry_with_backoff_then_give_up(tmp_path: Path) -> None:
    b = make(tmp_path, connect_tries=4)
    real = b._exec_raw
    failures = [EOFError("eof"), paramiko.SSHException("banner"), ConnectionResetError("reset")]

    def flaky(line: str) -> tuple[int, str, str]:
        if failures:
            raise failures.pop(0)
        return real(line)

    b._exec_raw = flaky  # type: ignore[method-assign]
    b.submit(JobSpec(IDENT, "#!/bin/bash\n"))
    assert len(b.sleeps) == 3  # type: ignore[attr-defined]

    def dead(line: str) -> tuple[int, str, str]:
        raise ConnectionRefusedError("refused")

    b._exec_raw = dead  # type: ignore[method-assign]
    b.sleeps.clear()  # type: ignore[attr-defined]
    with pytest.raises(TransportError, match="4 tries"):
        b.statuses(["101"])
    assert len(b.sleeps) == 3  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "err",
    [
        paramiko.AuthenticationException("denied"),
        paramiko.BadHostKeyException("h", paramiko.RSAKey.generate(1024), paramiko.RSAKey.generate(1024)),
    ],
)
def test_auth_failures_are_not_retried(tmp_path: Path, err: Exception) -> None:
    b = make(tmp_path)

    def refuse(line: str) -> tuple[int, str, str]:
        raise err

    b._exec_raw = refuse  # type: ignore[method-assign]
    with pytest.raises(TransportError, match="not retried"):
        b.statuses(["1"])
    assert b.sleeps == []  # type: ignore[attr-defined]


def test_file_errors_are_not_transport_errors(tmp_path: Path) -> None:
    b = make(tmp_path)
    h = b.submit(JobSpec(IDENT, "#!/bin/bash\n"))
    assert b.tail(h) == ("", "")  # no logs yet: FileNotFoundError means "empty", no retries
    assert b.sleeps == []  # type: ignore[attr-defined]


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
    real = b._exec_raw
    broke = []

    def breaks_after_sbatch(line: str) -> tuple[int, str, str]:
        res = real(line)
        if "sbatch" in line and "--parsable" in line and not broke:
            broke.append(line)
            raise EOFError("connection lost after sbatch ran")
        return res

    b._exec_raw = breaks_after_sbatch  # type: ignore[method-assign]
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

    home = b.home  # type: ignore[attr-defined]
    failures = [TimeoutError(), ConnectionResetError()]
    slept: list[float] = []

    async def arun_once(line: str) -> tuple[int, str, str]:
        if failures:
            raise failures.pop(0)
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            FAKE_SLURM + "\n" + line,
            cwd=home,
            env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(), err.decode()

    async def asleep(delay: float) -> None:
        slept.append(delay)

    b._exec_raw = no_sync  # type: ignore[method-assign]
    b._arun_once = arun_once  # type: ignore[method-assign]
    b._asleep = asleep  # type: ignore[method-assign]
    st = asyncio.run(b.astatuses([h.job_id]))
    assert st[h.job_id].state is JobState.PENDING
    assert len(slept) == 2

    failures.extend([ConnectionResetError()] * 3)
    with pytest.raises(TransportError):
        asyncio.run(b.astatuses([h.job_id]))

    async def garbage(line: str) -> tuple[int, str, str]:
        return 0, "motd\n", ""

    b._arun_once = garbage  # type: ignore[method-assign]
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
    from charllm.backends.slurm import _FATAL_SSH, _HostKeyUnknown, _RejectUnknown

    key = paramiko.RSAKey.generate(1024)
    with pytest.raises(_HostKeyUnknown) as exc:
        _RejectUnknown().missing_host_key(paramiko.SSHClient(), "[127.0.0.1]:2222", key)
    assert isinstance(exc.value, _FATAL_SSH)
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
    real = b._exec_raw

    def refuse(line: str) -> tuple[int, str, str]:
        if "sbatch" in line and "--parsable" in line:
            return 1, "", stderr
        return real(line)

    b._exec_raw = refuse  # type: ignore[method-assign]
    with pytest.raises(SubmitLimitError, match="submit limit"):
        b.submit(JobSpec(IDENT, "#!/bin/bash\n"))
    assert b.find(IDENT) is None


def test_the_log_tail_tries_once(tmp_path: Path) -> None:
    b = make(tmp_path, connect_tries=5)
    h = b.submit(JobSpec(IDENT, "#!/bin/bash\n"))

    def dead(line: str) -> tuple[int, str, str]:
        raise ConnectionRefusedError("refused")

    b._exec_raw = dead  # type: ignore[method-assign]
    b._get_sftp = lambda: (_ for _ in ()).throw(ConnectionRefusedError("refused"))  # type: ignore[method-assign]
    b.sleeps.clear()  # type: ignore[attr-defined]
    with pytest.raises(TransportError, match="1 tries"):
        b.tail(h, tries=1)
    assert b.sleeps == []  # type: ignore[attr-defined]


def test_local_transport_runs_the_slurm_commands_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transport 'local': sbatch/sacct/squeue of this machine (here the tests' fake scheduler), files in place."""
    from tests.fake_slurm import fake_slurm

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

"""Slurm over SSH: stage a job directory, ``sbatch`` it, poll it with one batched query.

The connection comes from an Airflow SSH connection (``conn_id``): the synchronous path
(submit, find, cancel, fetch, tail, statuses) uses paramiko with the connection parsed by
:class:`~airflow.providers.ssh.hooks.ssh.SSHHook`; :meth:`SlurmBackend.astatuses`, which
triggers call on the triggerer's event loop, uses asyncssh through
:class:`~airflow.providers.ssh.hooks.ssh.SSHHookAsync` and never blocks the loop. Host keys
are checked: from the connection's ``known_hosts`` (a file) or ``host_key`` extra, else the
system's known_hosts; ``no_host_key_check: true`` must be asked for explicitly.

Command strings and parsers live in :mod:`charllm.backends.slurm_cmd`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import posixpath
import random
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import paramiko

from charllm.backends import slurm_cmd as cmd
from charllm.backends.base import (
    SCRIPT_NAME,
    STDERR_NAME,
    STDOUT_NAME,
    Backend,
    JobHandle,
    JobIdentity,
    JobSpec,
    JobStatus,
)
from charllm.errors import ConfigError, ResultError, SubmissionError, SubmitLimitError, TransportError
from charllm.shell import is_safe_name

log = logging.getLogger(__name__)

T = TypeVar("T")

# sbatch/scancel/squeue say this when slurmctld is down or restarting: retry later, not a refusal.
_CONTROLLER_DOWN = (
    "Unable to contact slurm controller",
    "Socket timed out on send/recv operation",
    "Slurm backup controller in standby mode",
    "Zero Bytes were transmitted or received",
)
# sbatch refusals for a per-user, account or QOS limit on jobs submitted (or in the queue):
# the job is fine, the queue is full for us. Waited out and submitted again, never a failed cell.
SUBMIT_LIMITS = (
    "QOSMaxSubmitJobPerUserLimit",
    "QOSMaxSubmitJobPerAccountLimit",
    "QOSGrpSubmitJobsLimit",
    "AssocMaxSubmitJobLimit",
    "AssocGrpSubmitJobsLimit",
    "MaxSubmitJobsPerUser",
    "MaxSubmitJobsPerAccount",
    "Job violates accounting/QOS policy",
    "job submit limit",
    "Slurm temporarily unable to accept job",
)
# scancel on a job that has ended: nothing to do.
_CANCEL_ALREADY_DONE = ("already completing or completed", "Invalid job id specified")


def is_submit_limit(stderr: str) -> bool:
    """sbatch's stderr says a submit limit (per user, account, QOS) refused the job."""
    low = stderr.lower()
    return any(s.lower() in low for s in SUBMIT_LIMITS)


@dataclass(frozen=True)
class SlurmConfig:
    """The serialisable spec of a :class:`SlurmBackend` (``{"kind": "slurm", ...}``)."""

    conn_id: str = "charllm_dev_cluster"
    workdir: str = "charllm-work"  # relative to the login home, or absolute
    partition: str | None = None
    poll_interval_s: float = 20.0
    extra_sbatch_args: tuple[str, ...] = ()
    find_lookback_days: int = 14  # how far back `find` asks sacct for finished jobs by name
    connect_tries: int = 5  # attempts per operation before TransportError
    backoff_min_s: float = 1.0
    backoff_max_s: float = 30.0
    connect_timeout_s: float = 15.0
    command_timeout_s: float = 120.0
    max_ids_per_query: int = 500  # keeps one sacct command line well under ARG_MAX
    # "ssh": through the Airflow connection; "local": the Slurm commands of this machine (Airflow
    # on a login node; the tests' fake scheduler on PATH), files read and written in place
    transport: str = "ssh"

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SlurmConfig:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in spec.items() if k != "kind"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError("<backend spec>", unknown[0], f"unknown slurm backend option (known: {sorted(known)})")
        if "extra_sbatch_args" in data:
            args = data["extra_sbatch_args"]
            if isinstance(args, str) or not all(isinstance(a, str) for a in args):
                raise ConfigError("<backend spec>", "extra_sbatch_args", "must be a list of strings")
            data["extra_sbatch_args"] = tuple(args)
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not self.conn_id:
            raise ConfigError("<backend spec>", "conn_id", "must name an Airflow SSH connection")
        cmd.normalize_workdir(self.workdir)
        if self.partition is not None and not is_safe_name(self.partition):
            raise ConfigError("<backend spec>", "partition", f"{self.partition!r} is not a Slurm partition name")
        for name in ("poll_interval_s", "backoff_min_s", "backoff_max_s", "connect_timeout_s", "command_timeout_s"):
            if float(getattr(self, name)) <= 0:
                raise ConfigError("<backend spec>", name, "must be > 0")
        if self.connect_tries < 1 or self.max_ids_per_query < 1 or self.find_lookback_days < 1:
            raise ConfigError("<backend spec>", "connect_tries", "counts must be >= 1")
        if self.transport not in ("ssh", "local"):
            raise ConfigError("<backend spec>", "transport", f"{self.transport!r} is not 'ssh' or 'local'")

    def as_spec(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra_sbatch_args"] = list(self.extra_sbatch_args)
        return {"kind": "slurm", **d}


# -- what counts as "the connection broke" ------------------------------------------------
#
# These mean the SSH connection itself is broken, refused or wedged, so the operation is
# retried on a fresh connection with a bounded, jittered back-off (the SSH provider's
# remote-job trigger makes the same call):
#   * paramiko.SSHException: banner/handshake/protocol failures, "SSH session not active",
#     channel open failures (sshd MaxSessions/MaxStartups under load);
#   * asyncssh.Error: disconnects, lost connections, ChannelOpenError (async path);
#   * EOFError: the server closed the stream mid-read (sshd restarted, node rebooted), and
#     a channel that closed without an exit status;
#   * OSError from the socket: refused/reset (ConnectionError), timeouts (TimeoutError,
#     also a wedged command), DNS (socket.gaierror), paramiko's NoValidConnectionsError and
#     "Socket is closed" (no errno).
# Not retried, because a reconnect cannot fix them: authentication failures and unknown or
# changed host keys (configuration; raised at once as TransportError), and OSErrors with an
# errno from SFTP such as ENOENT or EACCES (a file problem, passed through as is).
class _HostKeyUnknown(paramiko.SSHException):
    """The server's host key is not in the known_hosts we were given."""

    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(
            f"host key of {hostname} ({key.get_name()}) is not in the connection's known_hosts; "
            "add it (ssh-keyscan) or point the connection extra `known_hosts` at a file that has it"
        )


_FATAL_SSH: tuple[type[BaseException], ...] = (
    _HostKeyUnknown,
    paramiko.AuthenticationException,
    paramiko.BadHostKeyException,
    asyncssh.HostKeyNotVerifiable,
    asyncssh.PermissionDenied,
    asyncssh.IllegalUserName,
)
_RETRY_SSH: tuple[type[BaseException], ...] = (paramiko.SSHException, asyncssh.Error, EOFError, OSError)


class _RejectUnknown(paramiko.MissingHostKeyPolicy):
    """paramiko's RejectPolicy, with an error we can tell apart from a dropped connection."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise _HostKeyUnknown(hostname, key)


class _ChannelDied(EOFError):
    """The command's channel closed without an exit status (sshd or the session died)."""


def _is_retryable_oserror(err: OSError) -> bool:
    """Socket trouble, not a file problem reported through SFTP."""
    return err.errno is None or isinstance(err, (ConnectionError, TimeoutError, socket.gaierror))


class _LocalFiles:
    """The few SFTP calls the backend makes, on this machine's file system (transport ``local``)."""

    def __init__(self, home: str) -> None:
        self.home = home

    def _p(self, path: str) -> str:
        return os.path.join(self.home, path)

    def open(self, path: str, mode: str = "rb") -> Any:
        return _LocalFile(open(self._p(path), mode))

    def listdir_attr(self, path: str) -> list[paramiko.SFTPAttributes]:
        root = self._p(path)
        return [paramiko.SFTPAttributes.from_stat(os.lstat(os.path.join(root, n)), n) for n in os.listdir(root)]

    def get_channel(self) -> None:
        return None


class _LocalFile:
    def __init__(self, fh: Any) -> None:
        self.fh = fh

    def __enter__(self) -> _LocalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def stat(self) -> os.stat_result:
        return os.fstat(self.fh.fileno())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)


@dataclass
class _Counters:
    """Slurm commands issued by this backend, and SSH round trips."""

    by_command: collections.Counter[str] = field(default_factory=collections.Counter)
    round_trips: int = 0

    def add(self, name: str, n: int = 1) -> None:
        self.by_command[name] += n


class SlurmBackend(Backend):
    """Jobs as Slurm batch jobs on a cluster reached over SSH."""

    name = "slurm"

    def __init__(self, config: SlurmConfig | None = None, **options: Any) -> None:
        if config is None:
            config = SlurmConfig.from_spec(options)
        elif options:
            raise TypeError("give either a SlurmConfig or keyword options, not both")
        config.validate()
        self.config = config
        self.workdir = cmd.normalize_workdir(config.workdir)
        self.counters = _Counters()
        self._lock = threading.RLock()
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._aconn: asyncssh.SSHClientConnection | None = None
        self._aconn_loop: asyncio.AbstractEventLoop | None = None
        self._alock: asyncio.Lock | None = None
        self._sleep: Callable[[float], None] = time.sleep  # tests make back-off instant

    # -- spec -------------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SlurmBackend:
        kind = spec.get("kind", "slurm")
        if kind != "slurm":
            raise ConfigError("<backend spec>", "kind", f"expected 'slurm', got {kind!r}")
        return cls(SlurmConfig.from_spec(spec))

    def spec(self) -> dict[str, Any]:
        return self.config.as_spec()

    @property
    def poll_key(self) -> str:
        """All jobs behind one SSH connection are polled with one query."""
        return f"slurm:{self.config.conn_id}"

    @property
    def query_count(self) -> int:
        """Scheduler queries issued (sacct + squeue), for the polling benchmark."""
        return sum(self.counters.by_command[k] for k in ("sacct", "squeue"))

    def job_dir(self, identity: JobIdentity) -> str:
        return cmd.job_dir(self.workdir, identity)

    # -- the Backend API ---------------------------------------------------------------

    def find(self, identity: JobIdentity) -> JobHandle | None:
        directory = self.job_dir(identity)
        line = cmd.build_find(directory, identity.job_name, self.config.find_lookback_days)
        _, out, err = self._run(line)
        self.counters.add("squeue")
        self.counters.add("sacct")
        job_id = cmd.parse_find(out, err, identity.job_name).choose()
        if job_id is None:
            return None
        return JobHandle(self.name, job_id, directory, identity)

    def submit(self, spec: JobSpec) -> JobHandle:
        """Stage ``job.sbatch`` and ``spec.files`` over SFTP, then sbatch, at most once.

        sbatch itself is never retried blindly: after a broken connection the next attempt
        starts with :meth:`find`, which sees the job if sbatch had run.
        """
        identity = spec.identity
        directory = self.job_dir(identity)
        for name in spec.files:
            cmd.check_file_name(name)
        sbatch = cmd.build_sbatch(
            directory, identity, partition=self.config.partition, extra_args=self.config.extra_sbatch_args
        )
        last: BaseException | None = None
        for attempt in range(1, self.config.connect_tries + 1):
            # find() first, on every attempt: if a previous attempt's connection broke after
            # sbatch ran, the job is there (by name, or in the jobid file) and we re-attach.
            existing = self.find(identity)
            if existing is not None:
                log.info("re-attaching to Slurm job %s for %s", existing.job_id, identity.job_name)
                return existing
            self._stage(directory, spec)
            try:
                rc, out, err = self._exec_once(sbatch)
            except TransportError as exc:
                if isinstance(exc.__cause__, _FATAL_SSH):
                    raise
                last = exc
                self._backoff(attempt, exc)
                continue
            self.counters.add("sbatch")
            if rc != 0:
                if any(s in err for s in _CONTROLLER_DOWN):
                    raise TransportError(f"sbatch could not reach slurmctld: {err.strip()}")
                if is_submit_limit(err):
                    raise SubmitLimitError(f"sbatch refused {identity.job_name} for a submit limit: {err.strip()}")
                raise SubmissionError(f"sbatch refused {identity.job_name}: {err.strip() or out.strip()}")
            job_id = cmd.parse_sbatch(out)
            log.info("submitted %s as Slurm job %s", identity.job_name, job_id)
            return JobHandle(self.name, job_id, directory, identity)
        raise TransportError(f"submitting {identity.job_name} failed {self.config.connect_tries} times: {last}")

    def statuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """One SSH round trip (one sacct, squeue only if needed) per chunk of ids."""
        ids = list(dict.fromkeys(str(j) for j in job_ids))
        result: dict[str, JobStatus] = {}
        for chunk in self._chunks(ids):
            _, out, err = self._run(cmd.build_status(chunk))
            result.update(self._read_status(out, err, chunk))
        return result

    async def astatuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """One SSH round trip per :attr:`SlurmConfig.max_ids_per_query` ids, on asyncssh.

        Safe on a triggerer's event loop: nothing here blocks it, and the connection is
        kept open between calls (one TCP/SSH handshake, not one per poll).
        """
        ids = list(dict.fromkeys(str(j) for j in job_ids))
        result: dict[str, JobStatus] = {}
        for chunk in self._chunks(ids):
            _, out, err = await self._arun(cmd.build_status(chunk))
            result.update(self._read_status(out, err, chunk))
        return result

    def cancel(self, job_id: str) -> None:
        """``scancel``; a job that has ended (or that Slurm forgot) is not an error."""
        rc, _, err = self._run(cmd.build_cancel(job_id))
        self.counters.add("scancel")
        if rc == 0 or any(s in err for s in _CANCEL_ALREADY_DONE):
            return
        if any(s in err for s in _CONTROLLER_DOWN):
            raise TransportError(f"scancel {job_id} could not reach slurmctld: {err.strip()}")
        raise SubmissionError(f"scancel {job_id} failed (exit {rc}): {err.strip()}")

    def fetch(self, handle: JobHandle, dest: Path) -> None:
        """Copy the job directory (script, logs, staged files, ``out/``) to ``dest``."""
        dest = Path(dest)
        try:
            files = self._retry(lambda: self._list_tree(handle.workdir), "list job dir")
        except FileNotFoundError as err:
            raise ResultError(f"job directory {handle.workdir!r} of job {handle.job_id} is missing") from err
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        for rel in files:
            target = (dest / rel).resolve()
            if root not in target.parents:  # a remote name cannot escape dest
                raise ResultError(f"refusing to write {rel!r} outside {dest}")
            remote = posixpath.join(handle.workdir, rel)
            data = self._retry(functools.partial(self._read_remote, remote), "fetch")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def tail(self, handle: JobHandle, n_bytes: int = 4000, tries: int | None = None) -> tuple[str, str]:
        def read(name: str) -> str:
            path = posixpath.join(handle.workdir, name)
            try:
                data = self._retry(lambda: self._read_remote(path, last_bytes=n_bytes), "tail", tries)
            except FileNotFoundError:
                return ""
            return data.decode("utf-8", errors="replace")

        return read(STDOUT_NAME), read(STDERR_NAME)

    # -- helpers above the transport ---------------------------------------------------

    def _chunks(self, ids: list[str]) -> list[list[str]]:
        n = self.config.max_ids_per_query
        return [ids[i : i + n] for i in range(0, len(ids), n)]

    def _read_status(self, out: str, err: str, chunk: list[str]) -> dict[str, JobStatus]:
        res = cmd.parse_status(out, err, chunk)
        self.counters.add("sacct")
        if res.squeue_ran:
            self.counters.add("squeue")
        if res.errors:
            log.warning("Slurm status query partly failed: %s", "; ".join(res.errors))
        return res.statuses

    def _stage(self, directory: str, spec: JobSpec) -> None:
        """Create the job directory and write the script and files into it (idempotent)."""
        payload = {SCRIPT_NAME: spec.script, **spec.files}
        dirs = sorted({posixpath.dirname(posixpath.join(directory, name)) for name in payload})
        self._run(cmd.build_mkdir(*dirs), check=True)

        def put() -> None:
            sftp = self._get_sftp()
            for name, text in payload.items():
                with sftp.open(posixpath.join(directory, name), "wb") as fh:
                    fh.write(text.encode("utf-8"))

        self._retry(put, "stage files")

    def _list_tree(self, root: str) -> list[str]:
        """Regular files under ``root``, relative, recursively (symlinks and others skipped)."""
        sftp = self._get_sftp()
        found: list[str] = []
        stack = [""]
        while stack:
            rel = stack.pop()
            for entry in sftp.listdir_attr(posixpath.join(root, rel) if rel else root):
                name = entry.filename
                if name in (".", "..") or "/" in name:
                    continue
                sub = posixpath.join(rel, name) if rel else name
                mode = entry.st_mode or 0
                if stat.S_ISDIR(mode):
                    stack.append(sub)
                elif stat.S_ISREG(mode):
                    found.append(sub)
        return sorted(found)

    def _read_remote(self, path: str, last_bytes: int | None = None) -> bytes:
        sftp = self._get_sftp()
        with sftp.open(path, "rb") as fh:
            if last_bytes is not None:
                size = fh.stat().st_size or 0
                fh.seek(max(0, size - last_bytes))
            data: bytes = fh.read()
            return data

    # -- sync transport (paramiko) -----------------------------------------------------

    def _backoff_delay(self, attempt: int) -> float:
        """Exponential, jittered, bounded: 1, 2, 4, ... s times 0.5..1.5, at most backoff_max_s."""
        base = min(self.config.backoff_max_s, self.config.backoff_min_s * 2 ** (attempt - 1))
        return float(min(self.config.backoff_max_s, base * random.uniform(0.5, 1.5)))

    def _backoff(self, attempt: int, err: BaseException) -> None:
        if attempt >= self.config.connect_tries:
            return
        delay = self._backoff_delay(attempt)
        log.warning(
            "SSH to %s failed (attempt %d/%d), retrying in %.1fs: %r",
            self.config.conn_id,
            attempt,
            self.config.connect_tries,
            delay,
            err,
        )
        self._sleep(delay)

    def _retry(self, fn: Callable[[], T], what: str, tries: int | None = None) -> T:
        """Run an idempotent remote operation, reconnecting on transport errors (``tries``: fewer than configured)."""
        last: BaseException | None = None
        tries = min(tries or self.config.connect_tries, self.config.connect_tries)
        for attempt in range(1, tries + 1):
            try:
                with self._lock:
                    return fn()
            except TransportError as err:
                last = err
            except _FATAL_SSH as err:
                raise TransportError(
                    f"SSH to {self.config.conn_id} refused, not retried: {err}", retryable=False
                ) from err
            except _RETRY_SSH as err:
                if isinstance(err, OSError) and not _is_retryable_oserror(err):
                    raise
                last = err
                self._drop_client()
            if attempt < tries:
                self._backoff(attempt, last)
        raise TransportError(f"{what} on {self.config.conn_id} failed after {tries} tries: {last}") from last

    def _run(self, line: str, *, check: bool = False) -> tuple[int, str, str]:
        """Run an idempotent command line, with reconnects."""
        rc, out, err = self._retry(lambda: self._exec_raw(line), "remote command")
        if check and rc != 0:
            raise TransportError(f"remote command failed (exit {rc}): {err.strip()[:2000]}", retryable=False)
        return rc, out, err

    def _exec_once(self, line: str) -> tuple[int, str, str]:
        """Run a command exactly once (sbatch): transport errors surface as TransportError."""
        try:
            with self._lock:
                return self._exec_raw(line)
        except _FATAL_SSH as err:
            raise TransportError(f"SSH to {self.config.conn_id} refused, not retried: {err}", retryable=False) from err
        except _RETRY_SSH as err:
            if isinstance(err, OSError) and not _is_retryable_oserror(err):
                raise
            self._drop_client()
            raise TransportError(f"SSH to {self.config.conn_id} failed: {err}") from err

    def _exec_raw(self, line: str) -> tuple[int, str, str]:
        """Run one command line on the cached client; read stdout and stderr until exit."""
        if self.config.transport == "local":
            return self._exec_local(line)
        client = self._get_client()
        transport = client.get_transport()
        if transport is None or not transport.is_active():
            raise EOFError("SSH transport is not active")
        chan = transport.open_session(timeout=self.config.connect_timeout_s)
        out_b, err_b = bytearray(), bytearray()
        deadline = time.monotonic() + self.config.command_timeout_s
        try:
            self.counters.round_trips += 1
            chan.exec_command(line)
            chan.shutdown_write()
            with selectors.DefaultSelector() as sel:
                sel.register(chan, selectors.EVENT_READ)
                while True:
                    if chan.recv_ready():
                        out_b += chan.recv(65536)
                    elif chan.recv_stderr_ready():
                        err_b += chan.recv_stderr(65536)
                    elif (chan.eof_received and chan.exit_status_ready()) or chan.closed:
                        # both: sshd may send the exit status before the last output
                        break
                    elif time.monotonic() > deadline:
                        raise TimeoutError(f"remote command ran over {self.config.command_timeout_s}s")
                    else:
                        sel.select(min(1.0, max(0.0, deadline - time.monotonic())))
            rc = chan.exit_status if chan.exit_status_ready() else -1
        finally:
            chan.close()
        if rc < 0:
            raise _ChannelDied(f"remote command ended without an exit status: {bytes(err_b)[:500]!r}")
        return rc, out_b.decode("utf-8", errors="replace"), err_b.decode("utf-8", errors="replace")

    def _get_client(self) -> paramiko.SSHClient:
        client = self._client
        if client is not None:
            transport = client.get_transport()
            if transport is not None and transport.is_active():
                return client
            self._drop_client()
        self._client = self._connect()
        return self._client

    def _exec_local(self, line: str) -> tuple[int, str, str]:
        """Transport ``local``: the command line in bash here, from the login home (``$HOME``)."""
        import subprocess

        self.counters.round_trips += 1
        try:
            res = subprocess.run(
                ["bash", "-c", line],
                cwd=os.path.expanduser("~"),
                capture_output=True,
                text=True,
                timeout=self.config.command_timeout_s,
            )
        except subprocess.TimeoutExpired as err:
            raise TimeoutError(f"local command ran over {self.config.command_timeout_s}s") from err
        return res.returncode, res.stdout, res.stderr

    def _get_sftp(self) -> paramiko.SFTPClient:
        if self.config.transport == "local":
            return _LocalFiles(os.path.expanduser("~"))  # type: ignore[return-value]
        client = self._get_client()
        if self._sftp is None or self._sftp.get_channel() is None or self._sftp.get_channel().closed:  # type: ignore[union-attr]
            self._sftp = client.open_sftp()
        return self._sftp

    def _connection_params(self) -> tuple[Any, dict[str, Any]]:
        """The Airflow connection, parsed by SSHHook, plus its extras."""
        from airflow.exceptions import AirflowException
        from airflow.providers.ssh.hooks.ssh import SSHHook

        try:
            hook = SSHHook(ssh_conn_id=self.config.conn_id)
            extra = hook.get_connection(self.config.conn_id).extra_dejson
        except (AirflowException, ValueError) as err:  # missing connection, host, bad key
            raise ConfigError(f"<connection {self.config.conn_id}>", "conn_id", str(err)) from err
        return hook, extra

    def _connect(self) -> paramiko.SSHClient:
        """Open a paramiko client with host key checking from the connection.

        Not ``SSHHook.get_conn()``: it ignores the ``known_hosts`` extra (only the async
        hook reads it) and retries with its own fixed wait; we want the same known_hosts
        on both paths and one back-off policy.
        """
        hook, extra = self._connection_params()
        client = paramiko.SSHClient()
        known_hosts = extra.get("known_hosts")
        if hook.no_host_key_check:
            log.warning("host key check disabled for %s (no_host_key_check)", self.config.conn_id)
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        else:
            client.set_missing_host_key_policy(_RejectUnknown())
            if hook.host_key is not None:
                name = hook.remote_host if hook.port == 22 else f"[{hook.remote_host}]:{hook.port}"
                client.get_host_keys().add(name, hook.host_key.get_name(), hook.host_key)
            elif known_hosts and str(known_hosts).lower() != "none":
                path = os.path.expanduser(str(known_hosts))
                if not os.path.isfile(path):
                    raise ConfigError(f"<connection {self.config.conn_id}>", "known_hosts", f"no file {path!r}")
                client.load_host_keys(path)
            else:
                client.load_system_host_keys()
        kwargs: dict[str, Any] = {
            "hostname": hook.remote_host,
            "port": hook.port,
            "username": hook.username,
            "timeout": hook.conn_timeout or self.config.connect_timeout_s,
            "banner_timeout": self.config.connect_timeout_s,
            "auth_timeout": self.config.connect_timeout_s,
            "look_for_keys": hook.look_for_keys,
            "allow_agent": False,
        }
        if hook.key_file:
            kwargs["key_filename"] = os.path.expanduser(hook.key_file)
        if hook.pkey is not None:
            kwargs["pkey"] = hook.pkey
        if hook.password:
            kwargs["password"] = hook.password
        try:
            client.connect(**kwargs)
        except BaseException:
            client.close()  # no half-open transport thread left behind
            raise
        transport = client.get_transport()
        if transport is not None and hook.keepalive_interval:
            transport.set_keepalive(hook.keepalive_interval)
        return client

    def _drop_client(self) -> None:
        client, self._client, self._sftp = self._client, None, None
        if client is not None:
            try:
                client.close()
            except Exception:  # best-effort teardown of a connection that is already broken
                pass

    def close(self) -> None:
        """Close the synchronous connection (the async one closes with its event loop)."""
        with self._lock:
            self._drop_client()

    # -- async transport (asyncssh) ----------------------------------------------------

    async def _aget_conn(self) -> asyncssh.SSHClientConnection:
        loop = asyncio.get_running_loop()
        lock = self._alock
        if self._aconn_loop is not loop or lock is None:
            # a connection belongs to the loop that opened it (tests run several loops)
            self._aconn, self._aconn_loop = None, loop
            lock = self._alock = asyncio.Lock()
        async with lock:
            conn = self._aconn
            if conn is not None and not conn.is_closed():
                return conn
            from airflow.exceptions import AirflowException
            from airflow.providers.ssh.hooks.ssh import SSHHookAsync

            hook = SSHHookAsync(ssh_conn_id=self.config.conn_id)
            try:
                new: asyncssh.SSHClientConnection = await asyncio.wait_for(
                    hook.get_conn(), timeout=self.config.connect_timeout_s
                )
            except (AirflowException, ValueError) as err:  # missing connection, bad host_key extra
                raise ConfigError(f"<connection {self.config.conn_id}>", "conn_id", str(err)) from err
            self._aconn = new
            return new

    async def _adrop_conn(self) -> None:
        conn, self._aconn = self._aconn, None
        if conn is not None:
            try:
                conn.abort()
                await asyncio.wait_for(conn.wait_closed(), timeout=2)
            except Exception:  # best-effort teardown of a connection that is already broken
                pass

    async def aclose(self) -> None:
        """Close the async connection (call from the loop that uses it)."""
        if self._aconn_loop is asyncio.get_running_loop():
            await self._adrop_conn()

    async def _arun(self, line: str) -> tuple[int, str, str]:
        """Run an idempotent command on the async connection, reconnecting with back-off."""
        last: BaseException | None = None
        for attempt in range(1, self.config.connect_tries + 1):
            try:
                return await self._arun_once(line)
            except _FATAL_SSH as err:
                raise TransportError(
                    f"SSH to {self.config.conn_id} refused, not retried: {err}", retryable=False
                ) from err
            except _RETRY_SSH as err:
                if isinstance(err, OSError) and not _is_retryable_oserror(err):
                    raise
                last = err
                await self._adrop_conn()
            if attempt < self.config.connect_tries:
                delay = self._backoff_delay(attempt)
                log.warning(
                    "SSH to %s failed (attempt %d/%d), retrying in %.1fs: %r",
                    self.config.conn_id,
                    attempt,
                    self.config.connect_tries,
                    delay,
                    last,
                )
                await self._asleep(delay)
        raise TransportError(
            f"remote command on {self.config.conn_id} failed after {self.config.connect_tries} tries: {last}"
        ) from last

    async def _asleep(self, delay: float) -> None:
        await asyncio.sleep(delay)

    async def _arun_once(self, line: str) -> tuple[int, str, str]:
        if self.config.transport == "local":
            self.counters.round_trips += 1
            proc = await asyncio.create_subprocess_exec(
                "bash",
                "-c",
                line,
                cwd=os.path.expanduser("~"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out_b, err_b = await asyncio.wait_for(proc.communicate(), timeout=self.config.command_timeout_s)
            return proc.returncode or 0, out_b.decode(errors="replace"), err_b.decode(errors="replace")
        conn = await self._aget_conn()
        self.counters.round_trips += 1
        res = await conn.run(line, check=False, timeout=self.config.command_timeout_s)
        if res.exit_status is None or res.exit_status < 0:
            raise _ChannelDied(f"remote command ended without an exit status (signal {res.exit_signal})")
        out, err = res.stdout or "", res.stderr or ""
        if isinstance(out, bytes):
            out = out.decode("utf-8", errors="replace")
        if isinstance(err, bytes):
            err = err.decode("utf-8", errors="replace")
        return res.exit_status, str(out), str(err)

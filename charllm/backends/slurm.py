"""Slurm: stage a job directory, ``sbatch`` it, poll it with one batched query.

Slurm semantics only: which commands to run and what their answers mean. How the commands
reach the login node is a :class:`~charllm.transport.base.Transport`: SSH through an Airflow
connection (``transport: ssh``, the default) or this machine's shell (``transport: local``:
Airflow running on the login node itself). Command strings and parsers live in
:mod:`charllm.backends.slurm_cmd`.
"""

from __future__ import annotations

import collections
import logging
import posixpath
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charllm.backends import slurm_cmd as cmd
from charllm.backends.base import (
    SCRIPT_NAME,
    STDERR_NAME,
    STDOUT_NAME,
    Backend,
    BackendCapabilities,
    JobHandle,
    JobIdentity,
    JobSpec,
    JobStatus,
)
from charllm.errors import ConfigError, ResultError, SubmissionError, SubmitLimitError, TransportError
from charllm.settings import setting
from charllm.shell import is_safe_name
from charllm.transport import Backoff, Transport, make_transport

if TYPE_CHECKING:
    from charllm.campaign import LoadedCampaign

log = logging.getLogger(__name__)

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
    connect_tries: int = 5  # attempts per operation before TransportError (the transport's back-off)
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

    def backoff(self) -> Backoff:
        return Backoff(self.connect_tries, self.backoff_min_s, self.backoff_max_s)

    def make_transport(self) -> Transport:
        """The transport this spec names, with its timeouts and back-off."""
        if self.transport == "local":
            return make_transport("local", command_timeout_s=self.command_timeout_s, backoff=self.backoff())
        return make_transport(
            "ssh",
            conn_id=self.conn_id,
            connect_timeout_s=self.connect_timeout_s,
            command_timeout_s=self.command_timeout_s,
            backoff=self.backoff(),
        )

    def as_spec(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra_sbatch_args"] = list(self.extra_sbatch_args)
        return {"kind": "slurm", **d}


@dataclass
class _Counters:
    """Slurm commands issued by this backend, and command lines its transport ran."""

    transport: Transport
    by_command: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def round_trips(self) -> int:
        return self.transport.round_trips

    def add(self, name: str, n: int = 1) -> None:
        self.by_command[name] += n


class SlurmBackend(Backend):
    """Jobs as Slurm batch jobs on a cluster reached through a transport (SSH, or this machine's shell).

    ``transport``: the config's (:meth:`SlurmConfig.make_transport`) unless one is given
    (tests give a local-shell transport with a fake Slurm on its ``PATH``).
    """

    name = "slurm"
    capabilities = BackendCapabilities(needs_connection=True)

    def __init__(self, config: SlurmConfig | None = None, transport: Transport | None = None, **options: Any) -> None:
        if config is None:
            config = SlurmConfig.from_spec(options)
        elif options:
            raise TypeError("give either a SlurmConfig or keyword options, not both")
        config.validate()
        self.config = config
        self.workdir = cmd.normalize_workdir(config.workdir)
        self.transport = transport if transport is not None else config.make_transport()
        self.counters = _Counters(self.transport)

    # -- spec -------------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SlurmBackend:
        kind = spec.get("kind", "slurm")
        if kind != "slurm":
            raise ConfigError("<backend spec>", "kind", f"expected 'slurm', got {kind!r}")
        return cls(SlurmConfig.from_spec(spec))

    @classmethod
    def spec_for(cls, lc: LoadedCampaign, home: Path) -> dict[str, Any]:
        cluster = lc.cluster
        conn_id = lc.campaign.connection_id
        if not conn_id:
            raise ConfigError(lc.source, "connection_id", "a slurm campaign needs an Airflow SSH connection id")
        return {
            "kind": "slurm",
            "conn_id": conn_id,
            "workdir": cluster.workdir or "charllm-work",
            "partition": cluster.partition,
            "poll_interval_s": cluster.poll_interval_s,
            # "local": this machine's Slurm commands (Airflow on a login node; the tests' fake scheduler)
            "transport": setting("slurm_transport", cluster, "ssh", str),
        }

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
        _, out, err = self.transport.run(line)
        self.counters.add("squeue")
        self.counters.add("sacct")
        job_id = cmd.parse_find(out, err, identity.job_name).choose()
        if job_id is None:
            return None
        return JobHandle(self.name, job_id, directory, identity)

    def submit(self, spec: JobSpec) -> JobHandle:
        """Stage ``job.sbatch`` and ``spec.files`` through the transport, then sbatch, at most once.

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
        tries = self.transport.backoff.tries
        for attempt in range(1, tries + 1):
            # find() first, on every attempt: if a previous attempt's connection broke after
            # sbatch ran, the job is there (by name, or in the jobid file) and we re-attach.
            existing = self.find(identity)
            if existing is not None:
                log.info("re-attaching to Slurm job %s for %s", existing.job_id, identity.job_name)
                return existing
            self._stage(directory, spec)
            try:
                rc, out, err = self.transport.run_once(sbatch)
            except TransportError as exc:
                if not exc.retryable:
                    raise
                last = exc
                self.transport.wait_before_retry(attempt, exc)
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
        raise TransportError(f"submitting {identity.job_name} failed {tries} times: {last}")

    def statuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """One SSH round trip (one sacct, squeue only if needed) per chunk of ids."""
        ids = list(dict.fromkeys(str(j) for j in job_ids))
        result: dict[str, JobStatus] = {}
        for chunk in self._chunks(ids):
            _, out, err = self.transport.run(cmd.build_status(chunk))
            result.update(self._read_status(out, err, chunk))
        return result

    async def astatuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """One round trip per :attr:`SlurmConfig.max_ids_per_query` ids, on the transport's async path.

        Safe on a triggerer's event loop: nothing here blocks it, and the connection is
        kept open between calls (one TCP/SSH handshake, not one per poll).
        """
        ids = list(dict.fromkeys(str(j) for j in job_ids))
        result: dict[str, JobStatus] = {}
        for chunk in self._chunks(ids):
            _, out, err = await self.transport.arun(cmd.build_status(chunk))
            result.update(self._read_status(out, err, chunk))
        return result

    def cancel(self, job_id: str) -> None:
        """``scancel``; a job that has ended (or that Slurm forgot) is not an error."""
        rc, _, err = self.transport.run(cmd.build_cancel(job_id))
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
            files = self.transport.list_tree(handle.workdir)
        except FileNotFoundError as err:
            raise ResultError(f"job directory {handle.workdir!r} of job {handle.job_id} is missing") from err
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        for rel in files:
            target = (dest / rel).resolve()
            if root not in target.parents:  # a remote name cannot escape dest
                raise ResultError(f"refusing to write {rel!r} outside {dest}")
            remote = posixpath.join(handle.workdir, rel)
            data = self.transport.read(remote)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def tail(self, handle: JobHandle, n_bytes: int = 4000, tries: int | None = None) -> tuple[str, str]:
        def read(name: str) -> str:
            path = posixpath.join(handle.workdir, name)
            try:
                data = self.transport.read(path, last_bytes=n_bytes, tries=tries)
            except FileNotFoundError:
                return ""
            return data.decode("utf-8", errors="replace")

        return read(STDOUT_NAME), read(STDERR_NAME)

    # -- helpers ---------------------------------------------------------------------------

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
        self.transport.run(cmd.build_mkdir(*dirs), check=True)
        self.transport.write_files(
            {posixpath.join(directory, name): text.encode("utf-8") for name, text in payload.items()}
        )

    def close(self) -> None:
        """Close the transport's synchronous connection (the async one closes with its event loop)."""
        self.transport.close()

    async def aclose(self) -> None:
        """Close the transport's async connection (call from the loop that uses it)."""
        await self.transport.aclose()

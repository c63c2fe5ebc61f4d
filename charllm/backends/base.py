"""The backend interface, and the one table of job states.

Everything above this module (the Airflow layer, the CLI) talks to a cluster only through
:class:`Backend`, so the local backend and Slurm over SSH are interchangeable.
"""

from __future__ import annotations

import asyncio
import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from charllm.campaign import LoadedCampaign


class JobState(enum.Enum):
    """Scheduler states, Slurm's names. The local backend maps onto the same set."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"
    SUSPENDED = "SUSPENDED"
    REQUEUED = "REQUEUED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    REQUEUE_FED = "REQUEUE_FED"
    RESIZING = "RESIZING"
    STOPPED = "STOPPED"
    SIGNALING = "SIGNALING"
    STAGE_OUT = "STAGE_OUT"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    REVOKED = "REVOKED"
    # not Slurm's: the job is not known to the scheduler at all (yet, or any more)
    LOST = "LOST"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def parse(cls, text: str) -> JobState:
        """Parse a state as sacct/squeue print it ("CANCELLED by 1000", "OUT_OF_ME+")."""
        word = text.strip().split(" ", 1)[0].rstrip("+").upper()
        if not word:
            return cls.UNKNOWN
        try:
            return cls(word)
        except ValueError:
            # truncated names from fixed-width output: accept an unambiguous prefix
            hits = [s for s in cls if s.value.startswith(word)]
            return hits[0] if len(hits) == 1 else cls.UNKNOWN

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def is_success(self) -> bool:
        return self is JobState.COMPLETED

    @property
    def is_retryable(self) -> bool:
        """Ended (or bounced) for reasons outside the job: wait or resubmit."""
        return self in _RETRYABLE


_TERMINAL = frozenset(
    {
        JobState.COMPLETED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.TIMEOUT,
        JobState.OUT_OF_MEMORY,
        JobState.NODE_FAIL,
        JobState.PREEMPTED,
        JobState.BOOT_FAIL,
        JobState.DEADLINE,
        JobState.REVOKED,
        JobState.LOST,
    }
)
_RETRYABLE = frozenset({JobState.NODE_FAIL, JobState.PREEMPTED, JobState.BOOT_FAIL, JobState.REQUEUED, JobState.LOST})


@dataclass(frozen=True)
class JobIdentity:
    """Who a job is for. Written into the job's name, comment and directory to re-attach after restarts.

    ``nonce`` is the token the results catalog drew when it reserved the attempt: a job's
    identity then holds something a new (or lost) catalog cannot draw again, so a fresh
    catalog never adopts the old jobs of a cell whose attempt numbers restart at 1. Jobs
    keyed by their content (the environment and dataset jobs) have none and are shared.
    """

    campaign: str
    cell_id: str
    repeat: int
    attempt: int
    nonce: str = ""

    @property
    def tag(self) -> str:
        """``a<attempt>``, or ``a<attempt>-<nonce>``."""
        return f"a{self.attempt}-{self.nonce}" if self.nonce else f"a{self.attempt}"

    @property
    def job_name(self) -> str:
        return f"charllm.{self.campaign}.{self.cell_id}.r{self.repeat}.{self.tag}"

    @property
    def relpath(self) -> str:
        return f"{self.campaign}/{self.cell_id}/r{self.repeat}/{self.tag}"

    @classmethod
    def from_job_name(cls, name: str) -> JobIdentity | None:
        parts = name.split(".")
        if len(parts) < 5 or parts[0] != "charllm":
            return None
        campaign = ".".join(parts[1:-3])
        cell, rep, att = parts[-3:]
        att, _, nonce = att.partition("-")
        if not (rep.startswith("r") and att.startswith("a") and rep[1:].isdigit() and att[1:].isdigit()):
            return None
        if nonce and not nonce.isalnum():
            return None
        return cls(campaign, cell, int(rep[1:]), int(att[1:]), nonce)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.nonce:
            del d["nonce"]  # the form stored before nonces existed
        return d


@dataclass(frozen=True)
class JobSpec:
    """What to run: the rendered script plus small files staged beside it."""

    identity: JobIdentity
    script: str
    files: dict[str, str] = field(default_factory=dict)
    # the job's wall-clock limit; the script's own header says it to Slurm, a local backend enforces it
    time_limit_s: int | None = None


@dataclass(frozen=True)
class JobHandle:
    """A submitted job: its scheduler id and its working directory on the cluster."""

    backend: str
    job_id: str
    workdir: str
    identity: JobIdentity

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobHandle:
        ident = d["identity"]
        return cls(d["backend"], str(d["job_id"]), d["workdir"], JobIdentity(**ident))


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: JobState
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""
    nodes: str = ""
    elapsed_s: float | None = None
    raw: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobStatus:
        return cls(**{**d, "state": JobState(d["state"])})


# Job files inside a job's workdir, the same on every backend.
SCRIPT_NAME = "job.sbatch"
STDOUT_NAME = "stdout.log"
STDERR_NAME = "stderr.log"
OUTPUT_DIR = "out"


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend offers the layers above it, so that none of them asks for its name."""

    # jobs run on this machine with the orchestrator's own interpreter and file system: no
    # environment job (the install stage only checks this interpreter), a dataset folder relative
    # to the results home, and paths quoted as they are (no ``~`` to expand on a login node)
    runs_here: bool = False
    # a campaign on it names an Airflow SSH connection (``connection_id``)
    needs_connection: bool = False


class Backend(ABC):
    """Submit, watch, cancel and fetch jobs on one cluster.

    A new backend subclasses this, sets :attr:`name` and :attr:`capabilities`, implements the
    abstract methods plus :meth:`from_spec` and :meth:`spec_for`, and registers itself with
    :func:`charllm.backends.register_backend` (see ``docs/extending.md``).
    """

    name: str = "abstract"
    capabilities: ClassVar[BackendCapabilities] = BackendCapabilities()

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Backend:
        """Rebuild from :meth:`spec` (what a trigger carries)."""
        raise NotImplementedError(f"{cls.__name__} does not say how to rebuild it from a spec")

    @classmethod
    def spec_for(cls, lc: LoadedCampaign, home: Path) -> dict[str, Any]:
        """The spec of this backend for a campaign and its cluster profile (``home``: the results home)."""
        raise NotImplementedError(f"{cls.__name__} does not say how to build it for a campaign")

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """Serialisable description, enough for :func:`make_backend` to rebuild it (triggers)."""

    @property
    def poll_key(self) -> str:
        """Jobs with the same key are polled together, with one query per interval."""
        return repr(sorted(self.spec().items()))

    @abstractmethod
    def find(self, identity: JobIdentity) -> JobHandle | None:
        """A live or finished job for this identity, if any (for idempotent submission)."""

    def handle_for(self, identity: JobIdentity, job_id: str) -> JobHandle:
        """The handle of a job whose id is known (recorded in the catalog): no remote call."""
        return JobHandle(self.name, job_id, self.job_dir(identity), identity)

    @abstractmethod
    def job_dir(self, identity: JobIdentity) -> str:
        """The job's working directory on the cluster (or here)."""

    @abstractmethod
    def submit(self, spec: JobSpec) -> JobHandle:
        """Stage and submit; re-attach instead if a job for the identity exists already."""

    @abstractmethod
    def statuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """States of many jobs in one query. Unknown ids map to ``LOST``."""

    async def astatuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """Async variant for triggers; the default runs :meth:`statuses` in a thread."""
        return await asyncio.to_thread(self.statuses, job_ids)

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Cancel a pending or running job; no error if it has ended."""

    @abstractmethod
    def fetch(self, handle: JobHandle, dest: Path) -> None:
        """Copy the job's workdir (script, logs, ``out/``) into local ``dest``."""

    @abstractmethod
    def tail(self, handle: JobHandle, n_bytes: int = 4000, tries: int | None = None) -> tuple[str, str]:
        """The last bytes of the job's stdout and stderr (``tries``: how hard to try to reach the cluster)."""


def parse_time_limit(text: str) -> int:
    """Slurm time ('[D-]HH:MM:SS' or minutes) to seconds."""
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        secs = parts[0] * 60
    else:
        while len(parts) < 3:
            parts.insert(0, 0)
        secs = parts[0] * 3600 + parts[1] * 60 + parts[2]
    return days * 86400 + secs

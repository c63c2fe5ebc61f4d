"""Slurm command lines and output parsers: pure functions, no SSH, tested on literal text.

Every command here is one remote shell line built from quoted words (:func:`charllm.shell.q`);
values that cannot be made safe (job ids, identity parts Slurm would split) are rejected.
Outputs are framed with ``@@charllm:`` marker lines so one SSH round trip can carry several
queries and their exit statuses.

We read ``sacct --parsable2`` text, never ``sacct --json``: on Slurm 22.05 the JSON output
reports jobs with a non-zero exit as successful.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from charllm.backends.base import SCRIPT_NAME, STDERR_NAME, STDOUT_NAME, JobIdentity, JobState, JobStatus
from charllm.errors import ConfigError, ParseError, SubmissionError, TransportError
from charllm.shell import join, q

MARK = "@@charllm:"
JOBID_FILE = "jobid"

# sacct columns, in order. JobName comes last so a '|' inside a (foreign) job name cannot
# shift the other columns: the last split absorbs it.
SACCT_FIELDS = (
    "JobID",
    "JobIDRaw",
    "State",
    "ExitCode",
    "Elapsed",
    "NodeList",
    "Reason",
    "Submit",
    "Start",
    "End",
    "JobName",
)
SACCT_FORMAT = ",".join(SACCT_FIELDS)

# squeue columns: job id (123, 123_4, 123_[5-9], 123+1), raw id, full state, reason,
# nodes, time used, name (last, as above).
SQUEUE_FIELDS = ("JobID", "JobIDRaw", "State", "Reason", "NodeList", "TimeUsed", "JobName")
SQUEUE_FORMAT = "%i|%A|%T|%r|%N|%M|%j"

# Bounds (coreutils timeout, seconds) on the status queries, so a daemon that is down
# costs one poll a few seconds, not the clients' own ~20 s of connection retries.
SACCT_TIMEOUT_S = 30
SQUEUE_TIMEOUT_S = 8

# Ids as sbatch prints them (123), array tasks (123_4), het components (123+0).
JOB_ID_RE = re.compile(r"^[0-9]+(?:_[0-9]+|\+[0-9]+)?$")
# Ids as sacct/squeue print them; also pending array ranges (123_[1-5%2]) and steps (123.batch).
_ROW_ID_RE = re.compile(r"^[0-9]+(?:_[0-9]+|_\[[0-9,%\-]+\]|\+[0-9]+)?(?:\.[A-Za-z0-9_+\-]+)?$")
_EXIT_RE = re.compile(r"^([0-9]+):([0-9]+)$")
_ELAPSED_RE = re.compile(r"^(?:(?:([0-9]+)-)?([0-9]+):)?([0-9]+):([0-9]+)(?:\.[0-9]+)?$")
# Characters an identity part may not hold: '/' makes directories, ',' splits Slurm's
# --name lists, control characters break line-based output. Everything else is quoted.
_BAD_IDENTITY_CHARS = re.compile(r"[/,\x00-\x1f\x7f]")


# -- validation ----------------------------------------------------------------------------


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` if it looks like a Slurm job id; raise otherwise (never quote ids)."""
    if not JOB_ID_RE.match(job_id):
        raise SubmissionError(f"not a Slurm job id: {job_id!r}")
    return job_id


def check_identity(identity: JobIdentity) -> None:
    """Reject identities that cannot round-trip through Slurm's job name and a directory."""
    for name in ("campaign", "cell_id"):
        value = getattr(identity, name)
        if not value or value in (".", "..") or _BAD_IDENTITY_CHARS.search(value):
            raise ConfigError(
                "<job identity>", name, f"{value!r} is empty, '.'/'..', or holds '/', ',' or a control character"
            )
    if identity.repeat < 0 or identity.attempt < 0:
        raise ConfigError("<job identity>", "repeat/attempt", "must be >= 0")
    if identity.nonce and not (identity.nonce.isascii() and identity.nonce.isalnum()):
        raise ConfigError("<job identity>", "nonce", f"{identity.nonce!r} must be letters and digits")


def check_file_name(name: str) -> str:
    """A staged file name: a relative path without '..' or empty parts."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in name:
        raise ConfigError("<job spec>", "files", f"{name!r} is not a plain relative file name")
    if name in (SCRIPT_NAME, STDOUT_NAME, STDERR_NAME, JOBID_FILE):
        raise ConfigError("<job spec>", "files", f"{name!r} is reserved by the backend")
    return name


def normalize_workdir(workdir: str) -> str:
    """The spec's workdir as a remote path: absolute, or relative to the login home."""
    if not workdir or "\x00" in workdir or "\n" in workdir:
        raise ConfigError("<backend spec>", "workdir", f"{workdir!r} is not a usable directory")
    if workdir == "~":
        return "."
    if workdir.startswith("~/"):
        workdir = workdir[2:]
    elif workdir.startswith("~"):
        raise ConfigError("<backend spec>", "workdir", "'~user' paths are not supported; use an absolute path")
    return posixpath.normpath(workdir)


def job_dir(workdir: str, identity: JobIdentity) -> str:
    """The job's directory on the cluster: ``<workdir>/<identity.relpath>``."""
    check_identity(identity)
    return posixpath.join(normalize_workdir(workdir), identity.relpath)


def identity_comment(identity: JobIdentity) -> str:
    """The job's ``--comment``: the identity as compact JSON (re-attach after restarts)."""
    return json.dumps({"charllm": 1, **identity.as_dict()}, separators=(",", ":"), sort_keys=True)


# -- command builders ----------------------------------------------------------------------


def build_mkdir(*paths: str) -> str:
    return join(["mkdir", "-p", "--", *paths])


def build_sbatch(
    directory: str, identity: JobIdentity, *, partition: str | None = None, extra_args: Sequence[str] = ()
) -> str:
    """cd into the job dir, submit ``job.sbatch`` and record the id in ``jobid``.

    The id is written by the same remote shell right after sbatch returns, so a submitter
    that dies mid-call still leaves a trace for :func:`build_find`. Options given here
    override the script's ``#SBATCH`` lines.
    """
    words: list[str] = [
        "sbatch",
        "--parsable",
        f"--job-name={identity.job_name}",
        f"--comment={identity_comment(identity)}",
        f"--output={STDOUT_NAME}",
        f"--error={STDERR_NAME}",
    ]
    if partition:
        words.append(f"--partition={partition}")
    words.extend(extra_args)
    words.append(SCRIPT_NAME)
    return (
        f'cd -- {q(directory)} && id=$({join(words)}) && printf "%s\\n" "$id" > {q(JOBID_FILE)} && printf "%s\\n" "$id"'
    )


def build_find(directory: str, job_name: str, lookback_days: int) -> str:
    """One round trip: the ``jobid`` file, live jobs by name (squeue), finished ones (sacct)."""
    squeue = join(["squeue", "--me", "--noheader", "--states=all", f"--name={job_name}", f"--format={SQUEUE_FORMAT}"])
    sacct = join(
        [
            "sacct",
            "--parsable2",
            "--noheader",
            "-X",
            f"--name={job_name}",
            "-S",
            f"now-{int(lookback_days)}days",
            "-E",
            "now",
            f"--format={SACCT_FORMAT}",
        ]
    )
    jobid = q(posixpath.join(directory, JOBID_FILE))
    return (
        f"printf '{MARK}jobid\\n'; head -c 64 -- {jobid} 2>/dev/null; "
        f"printf '\\n{MARK}squeue\\n'; {squeue}; printf '{MARK}squeue rc=%s\\n' \"$?\"; "
        f"printf '{MARK}sacct\\n'; {sacct}; printf '{MARK}sacct rc=%s\\n' \"$?\""
    )


# sacct states after which the controller's view is needed: pending reasons, and failures
# that Slurm turns into a requeue (--requeue, JobRequeue=1): slurmdbd may still show the
# NODE_FAIL row while slurmctld already has the job PENDING again under the same id.
_ASK_CONTROLLER = "|".join(
    f"*'|{s}|'*" for s in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL")
)


def build_status(job_ids: Sequence[str]) -> str:
    """One round trip: one ``sacct`` for all ids, and ``squeue`` only when it is needed.

    squeue (a slurmctld RPC) runs only if sacct failed, printed a row in one of the states
    of ``_ASK_CONTROLLER`` (pending reasons and requeues live in slurmctld), or left an id
    out (slurmdbd has not heard of a just-submitted job yet). The decision is made on the remote side, so the common
    case costs one slurmdbd query and no controller query.
    """
    ids = [check_job_id(j) for j in job_ids]
    if not ids:
        raise ValueError("build_status needs at least one job id")
    idlist = ",".join(ids)
    # Slurm clients retry an unreachable daemon for ~20 s; a poll must not hang on it
    sacct = join(
        [
            "timeout",
            SACCT_TIMEOUT_S,
            "sacct",
            "--parsable2",
            "--noheader",
            "-X",
            "-j",
            idlist,
            f"--format={SACCT_FORMAT}",
        ]
    )
    squeue = join(
        ["timeout", SQUEUE_TIMEOUT_S, "squeue", "--noheader", "--states=all", "-j", idlist, f"--format={SQUEUE_FORMAT}"]
    )
    # ids are digits, '_' and '+' only (checked above): safe unquoted in the for list
    missing_check = (
        f'for i in {" ".join(ids)}; do case "$nl$out" in *"$nl$i|"*|*"$nl${{i}}_"*|*"$nl$i+"*) ;; '
        "*) need=1;; esac; done;"
    )
    return (
        f"nl='\n'; out=$({sacct}); rc=$?; "
        f'printf \'{MARK}sacct\\n%s\\n{MARK}sacct rc=%s\\n\' "$out" "$rc"; need=0; '
        f'[ "$rc" -eq 0 ] || need=1; '
        f'case "$out" in {_ASK_CONTROLLER}) need=1;; esac; '
        f"{missing_check} "
        f"if [ \"$need\" -eq 1 ]; then printf '{MARK}squeue\\n'; {squeue}; "
        f"printf '{MARK}squeue rc=%s\\n' \"$?\"; fi"
    )


def build_cancel(job_id: str) -> str:
    return join(["scancel", check_job_id(job_id)])


def build_tail(path: str, n_bytes: int) -> str:
    return join(["tail", "-c", str(int(n_bytes)), "--", path])


# -- parsed rows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SacctRow:
    """One ``sacct --parsable2`` line with :data:`SACCT_FIELDS`."""

    job_id: str
    job_id_raw: str
    state: JobState
    state_text: str
    exit_code: int | None
    signal: int | None
    elapsed_s: float | None
    nodes: str
    reason: str
    submit: str
    start: str
    end: str
    name: str
    raw: str

    @property
    def is_step(self) -> bool:
        return "." in self.job_id


@dataclass(frozen=True)
class SqueueRow:
    """One squeue line with :data:`SQUEUE_FORMAT`."""

    job_id: str
    job_id_raw: str
    state: JobState
    reason: str
    nodes: str
    elapsed_s: float | None
    name: str
    raw: str


def parse_exit_code(text: str) -> tuple[int | None, int | None]:
    """sacct's ``ExitCode`` "code:signal" ("1:0" exit 1; "0:9" killed by signal 9)."""
    text = text.strip()
    if not text:
        return None, None
    m = _EXIT_RE.match(text)
    if not m:
        raise ParseError(f"bad ExitCode {text!r}", text)
    return int(m.group(1)), int(m.group(2))


def parse_elapsed(text: str) -> float | None:
    """``[D-]HH:MM:SS`` or ``MM:SS`` (squeue's short form) to seconds; None if not a time."""
    text = text.strip()
    m = _ELAPSED_RE.match(text)
    if not m:
        return None  # "", "INVALID", "UNLIMITED", "N/A": no elapsed time to report
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def _split(line: str, n: int, what: str, raw: str) -> list[str]:
    parts = line.split("|", n - 1)
    if len(parts) != n:
        raise ParseError(f"{what} line has {len(parts)} fields, expected {n}: {line!r}", raw)
    if not _ROW_ID_RE.match(parts[0]):
        raise ParseError(f"{what} line does not start with a job id: {line!r}", raw)
    return parts


def parse_sacct(text: str) -> list[SacctRow]:
    """Rows of ``sacct --parsable2 --noheader --format=SACCT_FORMAT`` (steps included)."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        p = _split(line, len(SACCT_FIELDS), "sacct", text)
        state_text = p[2].strip()
        state = JobState.parse(state_text)
        try:
            code, sig = parse_exit_code(p[3])
        except ParseError as err:
            raise ParseError(f"sacct line has a bad ExitCode: {line!r}", text) from err
        rows.append(
            SacctRow(
                job_id=p[0],
                job_id_raw=p[1],
                state=state,
                state_text=state_text,
                exit_code=code,
                signal=sig,
                elapsed_s=parse_elapsed(p[4]),
                nodes=_none_if_placeholder(p[5]),
                reason=_none_if_placeholder(p[6]),
                submit=p[7],
                start=p[8],
                end=p[9],
                name=p[10],
                raw=line,
            )
        )
    return rows


def parse_squeue(text: str) -> list[SqueueRow]:
    """Rows of ``squeue --noheader --format=SQUEUE_FORMAT``."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        p = _split(line, len(SQUEUE_FIELDS), "squeue", text)
        rows.append(
            SqueueRow(
                job_id=p[0],
                job_id_raw=p[1],
                state=JobState.parse(p[2]),
                reason=_none_if_placeholder(p[3]),
                nodes=_none_if_placeholder(p[4]),
                elapsed_s=parse_elapsed(p[5]),
                name=p[6],
                raw=line,
            )
        )
    return rows


def _none_if_placeholder(text: str) -> str:
    text = text.strip()
    return "" if text in ("None", "(null)", "None assigned", "") else text


def parse_sbatch(stdout: str) -> str:
    """The job id from ``sbatch --parsable`` ("123" or "123;cluster")."""
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise ParseError("sbatch printed no job id", stdout)
    job_id = lines[-1].split(";", 1)[0]
    if not JOB_ID_RE.match(job_id):
        raise ParseError("sbatch printed something that is not a job id", stdout)
    return job_id


# -- framed output -------------------------------------------------------------------------


@dataclass
class Section:
    """The text between ``@@charllm:NAME`` and ``@@charllm:NAME rc=N`` (rc None: no end line)."""

    text: str = ""
    rc: int | None = None


def split_sections(stdout: str) -> dict[str, Section]:
    """Split marker-framed output into named sections; text outside sections is an error."""
    sections: dict[str, Section] = {}
    current: str | None = None
    lines: list[str] = []
    for line in stdout.splitlines():
        if line.startswith(MARK):
            head = line[len(MARK) :].strip()
            name, _, rc = head.partition(" rc=")
            if rc:
                if not rc.strip().lstrip("-").isdigit():
                    raise ParseError(f"bad marker line {line!r}", stdout)
                sec = sections.setdefault(name, Section())
                if current == name:
                    sec.text = "\n".join(lines)
                sec.rc = int(rc)
                current, lines = None, []
            else:
                if current is not None:
                    sections[current] = Section("\n".join(lines))
                current, lines = name, []
                sections.setdefault(name, Section())
            continue
        if current is None:
            if line.strip():
                raise ParseError(f"unexpected output outside a section: {line!r}", stdout)
            continue
        lines.append(line)
    if current is not None:
        sections[current] = Section("\n".join(lines), sections[current].rc)
    return sections


@dataclass
class StatusResult:
    """What one status round trip said: one status per id and which queries ran."""

    statuses: dict[str, JobStatus]
    sacct_ran: bool
    squeue_ran: bool
    errors: list[str] = field(default_factory=list)

    @property
    def query_count(self) -> int:
        return int(self.sacct_ran) + int(self.squeue_ran)


def _base_id(job_id: str) -> str:
    return re.split(r"[_+.]", job_id, maxsplit=1)[0]


def _latest(rows: Sequence[Any]) -> Any:
    """The newest of several rows for one id: latest Submit, then output order (requeues)."""

    def key(i: int) -> tuple[str, int]:
        submit = getattr(rows[i], "submit", "")
        return (submit if submit[:1].isdigit() else "", i)  # "Unknown" sorts first

    best_i = max(range(len(rows)), key=key)
    return rows[best_i]


# Among the parts of an array or het job that are still going, report the most active one.
_ACTIVE_ORDER = (
    JobState.RUNNING,
    JobState.COMPLETING,
    JobState.CONFIGURING,
    JobState.STAGE_OUT,
    JobState.SIGNALING,
    JobState.RESIZING,
    JobState.SUSPENDED,
    JobState.STOPPED,
    JobState.REQUEUED,
    JobState.REQUEUE_FED,
    JobState.REQUEUE_HOLD,
    JobState.SPECIAL_EXIT,
    JobState.PENDING,
    JobState.UNKNOWN,
)


def _rows_for(job_id: str, rows: Sequence[Any]) -> tuple[list[Any], bool]:
    """Rows describing ``job_id`` (steps left out) and whether they are parts (array/het)."""
    jobs = [r for r in rows if "." not in r.job_id]
    exact = [r for r in jobs if r.job_id == job_id]
    if exact:
        return exact, False
    if JOB_ID_RE.match(job_id) and job_id.isdigit():
        parts = [r for r in jobs if r.job_id != job_id and _base_id(r.job_id) == job_id]
        if parts:
            return parts, True
    raw = [r for r in jobs if r.job_id_raw == job_id]
    return raw, False


def _combine(rows: Sequence[Any]) -> Any:
    """One row standing for the parts of an array/het job."""
    live = [r for r in rows if not r.state.is_terminal]
    if live:
        rank = {s: i for i, s in enumerate(_ACTIVE_ORDER)}
        return min(live, key=lambda r: rank.get(r.state, len(rank)))
    bad = [r for r in rows if not r.state.is_success]
    return bad[0] if bad else rows[-1]


def sacct_status(job_id: str, rows: Sequence[SacctRow]) -> JobStatus | None:
    """The status of ``job_id`` from sacct rows, or None if sacct does not list it."""
    mine, parts = _rows_for(job_id, rows)
    if not mine:
        return None
    row: SacctRow = _combine(mine) if parts else _latest(mine)
    extra = row.state_text.split(" ", 1)[1] if " " in row.state_text else ""
    reason = row.reason or extra
    return JobStatus(
        job_id=job_id,
        state=row.state,
        exit_code=row.exit_code,
        signal=row.signal,
        reason=reason,
        nodes=row.nodes,
        elapsed_s=row.elapsed_s,
        raw=row.raw,
    )


def squeue_status(job_id: str, rows: Sequence[SqueueRow]) -> JobStatus | None:
    mine, parts = _rows_for(job_id, rows)
    if not mine:
        return None
    row: SqueueRow = _combine(mine) if parts else mine[-1]
    return JobStatus(
        job_id=job_id,
        state=row.state,
        exit_code=0 if row.state is JobState.COMPLETED else None,
        reason=row.reason,
        nodes=row.nodes,
        elapsed_s=row.elapsed_s,
        raw=row.raw,
    )


def merge_status(
    job_id: str, acct: JobStatus | None, live: JobStatus | None, *, known_gap: bool, controller_down: bool = False
) -> JobStatus:
    """Combine slurmdbd's view (sacct) and slurmctld's (squeue) of one job.

    The controller's view wins while it has the job in a live state (pending reasons, a
    NODE_FAIL that was requeued, jobs slurmdbd has not heard of yet); otherwise a terminal
    sacct row wins (it has the exit code). A job neither knows is LOST, unless a query
    failed (``known_gap``): then it is UNKNOWN, not LOST.
    """
    if live is not None and not live.state.is_terminal:
        return live
    if acct is not None and acct.state.is_terminal:
        return acct
    if live is not None:
        # ended in slurmctld, not yet in slurmdbd: the state is right, the exit code (only
        # sacct has it; a not-yet-final sacct row says 0:0) is not known yet
        if live.state.is_terminal and not live.state.is_success:
            return dataclasses.replace(
                live, exit_code=None, signal=None, reason=live.reason or "exit code not yet in accounting"
            )
        if live.state.is_success:
            # COMPLETED means exit code 0 and no signal, whichever daemon said it first
            return dataclasses.replace(live, exit_code=0, signal=0)
        return live
    if acct is not None:
        if controller_down and not acct.state.is_terminal:
            # slurmdbd's live states lag (a start or end not yet recorded) and slurmctld,
            # the authority for live jobs, did not answer: say so instead of guessing
            return JobStatus(
                job_id=job_id,
                state=JobState.UNKNOWN,
                reason=f"slurmctld unreachable; slurmdbd says {acct.state.value}",
                raw=acct.raw,
            )
        return acct
    if known_gap:
        return JobStatus(job_id=job_id, state=JobState.UNKNOWN, reason="scheduler query failed")
    return JobStatus(job_id=job_id, state=JobState.LOST, reason="unknown to sacct and squeue")


def parse_status(stdout: str, stderr: str, job_ids: Iterable[str]) -> StatusResult:
    """Read the output of :func:`build_status` into one :class:`JobStatus` per id."""
    ids = list(dict.fromkeys(job_ids))
    secs = split_sections(stdout)
    if "sacct" not in secs or secs["sacct"].rc is None:
        raise ParseError("status output has no sacct section", stdout + stderr)
    sacct_sec = secs["sacct"]
    squeue_sec = secs.get("squeue")
    errors = []
    sacct_rows: list[SacctRow] = []
    if sacct_sec.rc == 0:
        sacct_rows = parse_sacct(sacct_sec.text)
    else:
        errors.append(f"sacct exited {sacct_sec.rc}")
    squeue_rows: list[SqueueRow] = []
    squeue_ok = False
    if squeue_sec is not None:
        if squeue_sec.rc is None:
            raise ParseError("squeue section has no end marker", stdout + stderr)
        # squeue -j with only ids slurmctld has forgotten exits 1 ("Invalid job id"):
        # that is an answer (the controller does not know them), not a failure
        invalid_only = squeue_sec.rc != 0 and "Invalid job id" in stderr and not squeue_sec.text.strip()
        if squeue_sec.rc == 0 or invalid_only:
            squeue_rows = parse_squeue(squeue_sec.text)
            squeue_ok = True
        else:
            errors.append(f"squeue exited {squeue_sec.rc}")
    if sacct_sec.rc != 0 and not squeue_ok:
        raise TransportError(f"Slurm did not answer (sacct and squeue failed): {stderr.strip()[:2000]}")
    if errors and stderr.strip():
        errors.append(stderr.strip()[:2000])
    out = {}
    for jid in ids:
        acct = sacct_status(jid, sacct_rows) if sacct_sec.rc == 0 else None
        live = squeue_status(jid, squeue_rows) if squeue_ok else None
        # a gap: sacct failed, or squeue should have run for a missing id but did not answer
        gap = sacct_sec.rc != 0 or (acct is None and not squeue_ok)
        ctld_down = squeue_sec is not None and not squeue_ok
        out[jid] = merge_status(jid, acct, live, known_gap=gap, controller_down=ctld_down)
    return StatusResult(out, sacct_ran=True, squeue_ran=squeue_sec is not None, errors=errors)


@dataclass(frozen=True)
class FindResult:
    """What :func:`build_find` saw for one job name."""

    jobid_file: str | None
    squeue_rows: list[SqueueRow]
    sacct_rows: list[SacctRow]

    def choose(self) -> str | None:
        """The job to re-attach to: a live one, else the recorded one, else the newest finished.

        If only the ``jobid`` file knows a job (purged from slurmctld, older than the sacct
        window) we still re-attach to it: the directory is unique to this identity, so a job
        was submitted for it, and submitting again could run the cell twice. If that job is
        gone, polling it says LOST, which the caller retries as a new attempt.
        """
        live = [r for r in self.squeue_rows if not r.state.is_terminal and "." not in r.job_id]
        if live:
            ids = [r.job_id for r in live]
            if self.jobid_file in ids:
                return self.jobid_file
            return max(ids, key=_id_sort_key)
        seen = [r.job_id for r in self.squeue_rows if "." not in r.job_id]
        seen += [r.job_id for r in self.sacct_rows if not r.is_step]
        if self.jobid_file:
            return self.jobid_file
        if seen:
            return max(seen, key=_id_sort_key)
        return None


def _id_sort_key(job_id: str) -> tuple[int, str]:
    base = _base_id(job_id)
    return (int(base) if base.isdigit() else -1, job_id)


def parse_find(stdout: str, stderr: str, job_name: str) -> FindResult:
    """Read the output of :func:`build_find`; rows for other names are dropped."""
    secs = split_sections(stdout)
    for name in ("jobid", "squeue", "sacct"):
        if name not in secs:
            raise ParseError(f"find output has no {name} section", stdout + stderr)
    jobid = secs["jobid"].text.strip() or None
    if jobid is not None:
        jobid = jobid.split(";", 1)[0]
        if not JOB_ID_RE.match(jobid):
            raise ParseError("the jobid file holds something that is not a job id", secs["jobid"].text)
    sq = parse_squeue(secs["squeue"].text) if secs["squeue"].rc == 0 else []
    sa = parse_sacct(secs["sacct"].text) if secs["sacct"].rc == 0 else []
    if secs["squeue"].rc != 0 and secs["sacct"].rc != 0:
        raise TransportError(f"Slurm did not answer (squeue and sacct failed): {stderr.strip()[:2000]}")
    # sbatch refusals (impossible resources) still leave a FAILED record without nodes in
    # slurmctld and slurmdbd; that job never existed for us, so it is not re-attached to
    sq = [r for r in sq if r.name == job_name and not _refused(r)]
    sa = [r for r in sa if r.name == job_name and not _refused(r)]
    return FindResult(jobid, sq, sa)


def _refused(row: SacctRow | SqueueRow) -> bool:
    return row.state is JobState.FAILED and not row.nodes

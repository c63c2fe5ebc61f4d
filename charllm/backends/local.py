"""The embedded default: run the rendered job script as a detached subprocess here.

Each job gets a working directory under ``root``; a small wrapper records the pid and,
when the script ends, its exit code, so the state survives the Airflow task (and the
whole orchestrator) being restarted. The cluster profile's time limit is enforced with
``timeout``, so a local cell can end in TIMEOUT just as on Slurm.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charllm.backends.base import (
    SCRIPT_NAME,
    STDERR_NAME,
    STDOUT_NAME,
    Backend,
    BackendCapabilities,
    JobHandle,
    JobIdentity,
    JobSpec,
    JobState,
    JobStatus,
    parse_time_limit,
)
from charllm.errors import SubmissionError
from charllm.shell import q

if TYPE_CHECKING:
    from charllm.campaign import LoadedCampaign

_TIMEOUT_RC = 124  # what coreutils' timeout returns when the limit hit
# The wrapper queues for one of ``slots`` lock files (a job holds its slot until it
# ends, so measurements on one machine do not overlap), then runs the script.
_WRAPPER = """\
echo $$ > pid.tmp && mv pid.tmp pid
while :; do
  for i in $(seq 0 $(({slots} - 1))); do
    exec 9>>{locks}/slot$i
    if flock -n 9; then break 2; fi
    exec 9>&-
  done
  sleep 0.2
done
touch started
timeout --kill-after=10 {limit} bash {script} > {out} 2> {err} < /dev/null
rc=$?
echo $rc > exitcode.tmp && mv exitcode.tmp exitcode
"""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # the state letter follows the parenthesised command name
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class LocalBackend(Backend):
    """Jobs as subprocesses of this machine."""

    name = "local"
    capabilities = BackendCapabilities(runs_here=True)

    def __init__(self, root: str | Path, time_limit_s: int = 3600, slots: int = 1) -> None:
        self.root = Path(root).resolve()
        self.time_limit_s = time_limit_s
        self.slots = slots
        self.query_count = 0

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LocalBackend:
        return cls(spec["root"], int(spec.get("time_limit_s", 3600)), int(spec.get("slots", 1)))

    @classmethod
    def spec_for(cls, lc: LoadedCampaign, home: Path) -> dict[str, Any]:
        return {
            "kind": "local",
            "root": str(home / "work"),
            "time_limit_s": parse_time_limit(lc.cluster.time_limit),
            "slots": lc.cluster.local_slots,
        }

    def spec(self) -> dict[str, Any]:
        return {"kind": "local", "root": str(self.root), "time_limit_s": self.time_limit_s, "slots": self.slots}

    # -- bookkeeping ------------------------------------------------------------------
    def _index(self) -> Path:
        return self.root / ".jobs"

    def _dir_of(self, job_id: str) -> Path | None:
        link = self._index() / job_id
        try:
            return Path(link.read_text().strip())
        except OSError:
            return None

    def job_dir(self, identity: JobIdentity) -> str:
        return str(self.root / identity.relpath)

    def find(self, identity: JobIdentity) -> JobHandle | None:
        wd = self.root / identity.relpath
        try:
            job_id = (wd / "jobid").read_text().strip()
        except OSError:
            return None
        return JobHandle(self.name, job_id, str(wd), identity) if job_id else None

    # -- interface --------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> JobHandle:
        existing = self.find(spec.identity)
        if existing is not None:
            return existing
        wd = self.root / spec.identity.relpath
        wd.mkdir(parents=True, exist_ok=True)
        (wd / SCRIPT_NAME).write_text(spec.script)
        for name, text in spec.files.items():
            if "/" in name or name.startswith("."):
                raise SubmissionError(f"refusing to stage file with path-like name {name!r}")
            (wd / name).write_text(text)
        (wd / "identity.json").write_text(json.dumps(spec.identity.as_dict()))
        job_id = f"local-{uuid.uuid4().hex[:12]}"
        locks = self.root / ".slots"
        locks.mkdir(parents=True, exist_ok=True)
        wrapper = _WRAPPER.format(
            limit=spec.time_limit_s or self.time_limit_s,
            script=SCRIPT_NAME,
            out=STDOUT_NAME,
            err=STDERR_NAME,
            slots=max(1, self.slots),
            locks=q(str(locks)),
        )
        try:
            # setsid -f: the wrapper leads its own session and outlives this process
            subprocess.run(["setsid", "-f", "bash", "-c", wrapper], cwd=wd, check=True, start_new_session=True)
        except (OSError, subprocess.CalledProcessError) as err:
            raise SubmissionError(f"could not start local job in {wd}: {err}") from err
        self._index().mkdir(parents=True, exist_ok=True)
        (self._index() / job_id).write_text(str(wd))
        tmp = wd / "jobid.tmp"
        tmp.write_text(job_id)
        os.replace(tmp, wd / "jobid")
        return JobHandle(self.name, job_id, str(wd), spec.identity)

    def _status(self, job_id: str) -> JobStatus:
        wd = self._dir_of(job_id)
        if wd is None or not wd.is_dir():
            return JobStatus(job_id, JobState.LOST, reason="unknown job")
        if (wd / "cancelled").exists():
            return JobStatus(job_id, JobState.CANCELLED, reason="cancelled", nodes="localhost")
        try:
            rc = int((wd / "exitcode").read_text().strip())
        except (OSError, ValueError):
            rc = None
        if rc is not None:
            if rc == 0:
                return JobStatus(job_id, JobState.COMPLETED, 0, nodes="localhost")
            if rc == _TIMEOUT_RC or rc == 128 + signal.SIGKILL:
                return JobStatus(job_id, JobState.TIMEOUT, rc, nodes="localhost", reason="time limit")
            sig = rc - 128 if rc > 128 else None
            return JobStatus(job_id, JobState.FAILED, rc, signal=sig, nodes="localhost")
        try:
            pid = int((wd / "pid").read_text().strip())
        except (OSError, ValueError):
            return JobStatus(job_id, JobState.PENDING, reason="starting")
        if _alive(pid):
            if (wd / "started").exists():
                return JobStatus(job_id, JobState.RUNNING, nodes="localhost")
            return JobStatus(job_id, JobState.PENDING, reason="Resources (waiting for a local slot)")
        # the wrapper may have written the exit code between our two reads
        if (wd / "exitcode").exists():
            return self._status(job_id)
        return JobStatus(job_id, JobState.LOST, reason="process vanished without an exit code")

    def statuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        self.query_count += 1
        return {j: self._status(j) for j in job_ids}

    def cancel(self, job_id: str) -> None:
        wd = self._dir_of(job_id)
        if wd is None:
            return
        if (wd / "exitcode").exists():
            return
        (wd / "cancelled").write_text("cancelled\n")
        try:
            pid = int((wd / "pid").read_text().strip())
            os.killpg(pid, signal.SIGTERM)
        except (OSError, ValueError):
            pass  # already gone

    def fetch(self, handle: JobHandle, dest: Path) -> None:
        shutil.copytree(handle.workdir, dest, dirs_exist_ok=True)

    def tail(self, handle: JobHandle, n_bytes: int = 4000, tries: int | None = None) -> tuple[str, str]:
        return tuple(_tail(Path(handle.workdir) / n, n_bytes) for n in (STDOUT_NAME, STDERR_NAME))  # type: ignore[return-value]


def _tail(path: Path, n_bytes: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - n_bytes))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


__all__ = ["LocalBackend"]

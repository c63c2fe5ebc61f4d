#!/usr/bin/env python3
"""A fake Slurm for tests: ``sbatch``, ``sacct``, ``squeue``, ``scancel`` on PATH (one script, by name).

State lives in ``$FAKE_SLURM_DIR``: ``jobs.json`` (every job), ``calls.log`` (one line per
command), ``scenario.json`` (what the jobs do). A job runs for ``run_s`` seconds after its
submission, then ends as its scenario says; the scenario of a cell is a list of end states, one
per submission of that cell (the last one repeats):

    {"run_s": 1.0, "default": ["COMPLETED"],
     "by_cell": {"<cell_id>": ["NODE_FAIL", "COMPLETED"]},
     "refuse_cell_submits": 2,     # the first 2 sbatch calls of cell jobs: refused for a QOS submit limit
     "first_id": 1000,             # job ids count up from first_id + 1
     "start_s": 0.2,               # how long a job stays PENDING (reason Priority) before RUNNING
     "max_mem_gb": 1024}           # sbatch --mem above this: refused ("Memory specification can not be satisfied")

End states: COMPLETED (writes a valid ``out/result.json`` and ``out/steps.csv``), OOM (FAILED with
exit code 42 and an ``oom`` result, what ``charllm.train`` does), FAILED (exit 1), TIMEOUT,
NODE_FAIL, PREEMPTED, BOOT_FAIL, CANCELLED, LOST (the job vanishes: neither sacct nor squeue
knows it). The output formats are the ones :mod:`charllm.backends.slurm_cmd` asks for.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from charllm.backends.slurm_cmd import SACCT_FIELDS, SQUEUE_FIELDS  # the columns the backend asks for

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "/tmp/fake-slurm"))
EXIT = {
    "COMPLETED": "0:0",
    "OOM": "42:0",
    "FAILED": "1:0",
    "TIMEOUT": "0:15",
    "NODE_FAIL": "0:0",
    "PREEMPTED": "0:0",
    "BOOT_FAIL": "0:0",
    "CANCELLED": "0:15",
}
STEPS = "step,phase,start_unix_s,end_unix_s,duration_s,loss,tokens\n0,warmup,1.0,2.0,1.0,5.0,64\n1,measure,2.0,3.0,1.0,4.0,64\n"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _elapsed(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


class Db:
    def __init__(self) -> None:
        STATE.mkdir(parents=True, exist_ok=True)
        self.lock = open(STATE / "lock", "a")  # noqa: SIM115 - held for the process's life
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        path = STATE / "jobs.json"
        self.jobs: list[dict] = json.loads(path.read_text()) if path.exists() else []
        sc = STATE / "scenario.json"
        self.scenario: dict = json.loads(sc.read_text()) if sc.exists() else {}
        self.start_s = float(self.scenario.get("start_s", 0.2))

    def save(self) -> None:
        tmp = STATE / "jobs.json.tmp"
        tmp.write_text(json.dumps(self.jobs, indent=1))
        os.replace(tmp, STATE / "jobs.json")

    def advance(self) -> None:
        """Jobs whose time has come reach their end state (and write their outputs)."""
        now = time.time()
        changed = False
        for j in self.jobs:
            if j["state"] in ("PENDING", "RUNNING") and now >= j["submit"] + j["run_s"]:
                _finish(j)
                changed = True
            elif j["state"] == "PENDING" and now >= j["submit"] + self.start_s:
                j["state"], j["start"] = "RUNNING", j["submit"] + self.start_s
                changed = True
        if changed:
            self.save()


def _finish(j: dict) -> None:
    end = j["final"]
    wd = Path(j["dir"])
    j["end"] = j["submit"] + j["run_s"]
    j["start"] = j.get("start") or j["submit"]
    if end == "LOST":
        j["state"] = "LOST"
        return
    (wd / "stdout.log").write_text(f"charllm: job on fake-node0, slurm job {j['id']}\n")
    if end in ("COMPLETED", "OOM"):
        (wd / "out").mkdir(exist_ok=True)
        if end == "COMPLETED":
            result = {"outcome": "ok", "error": None, "metrics": {"tokens_per_s": 1000.0, "step_time_median_s": 0.064}}
            (wd / "out" / "steps.csv").write_text(STEPS)
        else:
            result = {"outcome": "oom", "error": "CUDA out of memory (fake)", "metrics": {}}
        (wd / "out" / "result.json").write_text(json.dumps(result))
    if end == "FAILED":
        (wd / "stderr.log").write_text("Traceback (most recent call last):\nRuntimeError: fake failure\n")
    j["state"] = "FAILED" if end == "OOM" else end
    j["exit"] = EXIT.get(end, "0:0")


def _call(name: str, argv: list[str]) -> None:
    with (STATE / "calls.log").open("a") as fh:
        fh.write(f"{name} {' '.join(argv)}\n")


def _opt(argv: list[str], key: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(key + "="):
            return a.split("=", 1)[1]
        if a == key and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _mem_gb(text: str) -> float:
    """``--mem`` as Slurm reads it: a number with an optional K/M/G/T suffix (default MB), in GB."""
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}
    unit = text[-1:].upper()
    return float(text[:-1]) * scale[unit] if unit in scale else float(text) / 1024


def sbatch(db: Db, argv: list[str]) -> int:
    name = _opt(argv, "--job-name") or "job"
    mem = _opt(argv, "--mem")
    if mem is not None and _mem_gb(mem) > float(db.scenario.get("max_mem_gb", 1024)):
        print("sbatch: error: Memory specification can not be satisfied", file=sys.stderr)
        print(
            "sbatch: error: Batch job submission failed: Requested node configuration is not available", file=sys.stderr
        )
        return 1
    refusals = int(db.scenario.get("refuse_cell_submits", 0))
    done = int((STATE / "refused").read_text()) if (STATE / "refused").exists() else 0
    if done < refusals and ".charllm-env." not in name and ".charllm-data." not in name:
        (STATE / "refused").write_text(str(done + 1))
        print(
            "sbatch: error: QOSMaxSubmitJobPerUserLimit\nsbatch: error: Batch job submission failed: "
            "Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)",
            file=sys.stderr,
        )
        return 1
    cell = name.split(".")[-3] if name.count(".") >= 4 else name
    before = sum(1 for j in db.jobs if j["cell"] == cell)
    plan = db.scenario.get("by_cell", {}).get(cell) or db.scenario.get("default") or ["COMPLETED"]
    final = plan[min(before, len(plan) - 1)]
    job_id = str(int(db.scenario.get("first_id", 1000)) + len(db.jobs) + 1)
    db.jobs.append(
        {
            "id": job_id,
            "name": name,
            "cell": cell,
            "dir": os.getcwd(),
            "state": "PENDING",
            "final": final,
            "exit": "0:0",
            "submit": time.time(),
            "start": None,
            "end": None,
            "run_s": float(db.scenario.get("run_s", 1.0)),
        }
    )
    db.save()
    print(job_id)
    return 0


def _ids(argv: list[str]) -> set[str] | None:
    v = _opt(argv, "-j")
    return set(v.split(",")) if v else None


def sacct(db: Db, argv: list[str]) -> int:
    ids, name = _ids(argv), _opt(argv, "--name")
    for j in db.jobs:
        if j["state"] == "LOST" or (ids is not None and j["id"] not in ids) or (name and j["name"] != name):
            continue
        now = time.time()
        start = j.get("start")
        end = j.get("end")
        elapsed = (end or now) - start if start else 0
        row = {
            "JobID": j["id"],
            "JobIDRaw": j["id"],
            "State": j["state"],
            "ExitCode": j["exit"],
            "Elapsed": _elapsed(elapsed),
            "NodeList": "fake-node0" if start else "None assigned",
            "Reason": "None",
            "Submit": _iso(j["submit"]),
            "Start": _iso(start) if start else "Unknown",
            "End": _iso(end) if end else "Unknown",
            "JobName": j["name"],
        }
        print("|".join(row[f] for f in SACCT_FIELDS))
    return 0


def squeue(db: Db, argv: list[str]) -> int:
    ids, name = _ids(argv), _opt(argv, "--name")
    for j in db.jobs:
        if j["state"] not in ("PENDING", "RUNNING"):
            continue
        if (ids is not None and j["id"] not in ids) or (name and j["name"] != name):
            continue
        row = {
            "JobID": j["id"],
            "JobIDRaw": j["id"],
            "State": j["state"],
            "Reason": "Priority" if j["state"] == "PENDING" else "None",
            "NodeList": "fake-node0",
            "TimeUsed": "0:01",
            "JobName": j["name"],
        }
        print("|".join(row[f] for f in SQUEUE_FIELDS))
    return 0


def scancel(db: Db, argv: list[str]) -> int:
    for j in db.jobs:
        if j["id"] in argv and j["state"] in ("PENDING", "RUNNING"):
            j["state"], j["exit"], j["end"] = "CANCELLED", "0:15", time.time()
    db.save()
    return 0


def main() -> int:
    name, argv = sys.argv[1], sys.argv[2:]
    _call(name, argv)
    db = Db()
    db.advance()
    return {"sbatch": sbatch, "sacct": sacct, "squeue": squeue, "scancel": scancel}[name](db, argv)


def install(bin_dir: Path, state_dir: Path, scenario: dict) -> dict[str, str]:
    """Put the fake commands into ``bin_dir``; returns the environment to use them."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "scenario.json").write_text(json.dumps(scenario))
    src = Path(__file__).resolve()
    for cmd in ("sbatch", "sacct", "squeue", "scancel"):
        (bin_dir / cmd).write_text(f'#!/bin/sh\nexec {sys.executable} {src} {cmd} "$@"\n')
        (bin_dir / cmd).chmod(0o755)
    return {"FAKE_SLURM_DIR": str(state_dir), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}


def jobs(state_dir: Path) -> list[dict]:
    path = state_dir / "jobs.json"
    return json.loads(path.read_text()) if path.exists() else []


if __name__ == "__main__":
    raise SystemExit(main())

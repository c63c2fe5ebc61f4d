"""How much does polling N Slurm jobs cost the scheduler, and how fast does it notice an end?

For N in (1, 10, 100, 300) sleep jobs on the dev cluster (``scripts/dev-cluster up``), poll
them the way the trigger does (``SlurmBackend.astatuses`` of all unfinished ids, once per
interval) for a fixed window and report, per poll:

* Slurm queries counted by the backend (``query_count``: sacct + squeue) and SSH round trips;
* RPCs the daemons themselves counted: slurmctld job-info RPCs from ``sdiag`` and slurmdbd
  ``DBD_GET_JOBS_COND`` from ``sacctmgr show stats`` (deltas over the window);
* for comparison, one round of naive per-job polling (one ``sacct -j ID`` per job), measured
  the same way;
* detection latency: poll that first saw a job terminal minus the job's sacct ``End`` time
  (``End`` has 1 s resolution, so each latency is good to about +-1 s).

Jobs are submitted in bulk by one remote loop of ``sbatch --wrap`` (submission is not what
is measured) and cancelled at the end of each size. The node has few CPUs, so most jobs
stay PENDING; that is the realistic case for a sweep anyway.

    eval "$(scripts/dev-cluster env)"
    .venv/bin/python benchmarks/slurm_polling.py [--sizes 1,10,100,300] [--interval-s 2] [--window-s 20]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from charllm.backends import slurm_cmd  # noqa: E402
from charllm.backends.slurm import SlurmBackend  # noqa: E402
from charllm.shell import join, q  # noqa: E402

_RPC_RE = re.compile(r"^\s*([A-Z][A-Z0-9_]+)\s+\(\s*\d+\)\s+count:(\d+)", re.M)
CTLD_JOB_RPCS = ("REQUEST_JOB_INFO", "REQUEST_JOB_INFO_SINGLE", "REQUEST_JOB_USER_INFO")
DBD_JOB_RPCS = ("DBD_GET_JOBS_COND",)


def ensure_env() -> None:
    """Take the connection from `scripts/dev-cluster env` unless it is already set."""
    if os.environ.get("AIRFLOW_CONN_CHARLLM_DEV_CLUSTER"):
        return
    res = subprocess.run([str(REPO / "scripts" / "dev-cluster"), "env"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        sys.exit(f"no dev cluster: run scripts/dev-cluster up first\n{res.stderr}")
    for line in res.stdout.splitlines():
        if line.startswith("export "):
            words = shlex.split(line[len("export ") :])
            if len(words) == 1 and "=" in words[0]:
                k, v = words[0].split("=", 1)
                os.environ[k] = v


def rpc_counts(text: str) -> dict[str, int]:
    """RPC counts from sdiag / ``sacctmgr show stats`` (first table: by message type)."""
    head = text.split("by user", 1)[0]
    return {m.group(1): int(m.group(2)) for m in _RPC_RE.finditer(head)}


class DaemonStats:
    """Reads the daemons' own RPC counters, as root here (the benchmark runs beside the cluster)."""

    def __init__(self) -> None:
        self.env = dict(os.environ)
        d = os.environ.get("CHARLLM_DEV_CLUSTER_DIR")
        if d:
            self.env["SLURM_CONF"] = str(Path(d) / "etc" / "slurm.conf")
        self.ok = True

    def _run(self, *args: str) -> str:
        try:
            res = subprocess.run(list(args), capture_output=True, text=True, timeout=30, env=self.env)
        except (OSError, subprocess.TimeoutExpired):
            self.ok = False
            return ""
        if res.returncode != 0:
            self.ok = False
        return res.stdout

    def snapshot(self) -> tuple[int, int]:
        ctld = rpc_counts(self._run("sdiag"))
        dbd = rpc_counts(self._run("sacctmgr", "show", "stats"))
        return sum(ctld.get(k, 0) for k in CTLD_JOB_RPCS), sum(dbd.get(k, 0) for k in DBD_JOB_RPCS)


@dataclass
class SizeResult:
    n_jobs: int
    polls: int = 0
    queries: int = 0
    round_trips: int = 0
    ctld_rpcs: int = 0
    dbd_rpcs: int = 0
    naive_ctld_rpcs: int = 0
    naive_dbd_rpcs: int = 0
    poll_s: list[float] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    ended: int = 0


def end_time(raw: str) -> float | None:
    """The sacct End of a status's raw row, as a Unix time (None if not a sacct row)."""
    try:
        rows = slurm_cmd.parse_sacct(raw)
    except slurm_cmd.ParseError:
        return None
    if not rows or not rows[0].end[:1].isdigit():
        return None
    return datetime.fromisoformat(rows[0].end).timestamp()


async def run_size(
    backend: SlurmBackend, stats: DaemonStats, n: int, interval_s: float, window_s: float, partition: str
) -> SizeResult:
    res = SizeResult(n)
    name = f"charllm-bench-{uuid.uuid4().hex[:6]}-{n}"
    # job i sleeps 1..4 s, so jobs keep ending through the window on a 2-CPU node
    sbatch = join(
        [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            f"--partition={partition}",
            "--cpus-per-task=1",
            "--mem=1",
            "--time=00:05:00",
            "--output=/dev/null",
        ]
    )
    line = f'for i in $(seq 1 {int(n)}); do {sbatch} --wrap="sleep $(( 1 + i % 4 ))" || exit 1; done'
    rc, out, err = await asyncio.to_thread(backend._run, line)
    if rc != 0:
        raise SystemExit(f"bulk sbatch failed: {err}")
    ids = [slurm_cmd.parse_sbatch(ln) for ln in out.split()]
    try:
        await backend.astatuses(ids[:1])  # connect outside the measured window
        q0, t0_trips = backend.query_count, backend.counters.round_trips
        c0, d0 = stats.snapshot()
        active = set(ids)
        start = time.monotonic()
        while time.monotonic() - start < window_s and active:
            tick = time.monotonic()
            st = await backend.astatuses(sorted(active))
            now = time.time()
            res.poll_s.append(time.monotonic() - tick)
            res.polls += 1
            for job_id, s in st.items():
                if s.state.is_terminal:
                    active.discard(job_id)
                    res.ended += 1
                    end = end_time(s.raw)
                    if end is not None:
                        res.latencies_s.append(now - end)
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - tick)))
        c1, d1 = stats.snapshot()
        res.queries = backend.query_count - q0
        res.round_trips = backend.counters.round_trips - t0_trips
        res.ctld_rpcs, res.dbd_rpcs = c1 - c0, d1 - d0
        # one round of the naive way, for comparison: one sacct per job, one SSH command
        naive = " ".join(f"sacct -X -n -P -j {q(j)} -o State >/dev/null;" for j in ids)
        await asyncio.to_thread(backend._run, naive)
        c2, d2 = stats.snapshot()
        res.naive_ctld_rpcs, res.naive_dbd_rpcs = c2 - c1, d2 - d1
    finally:
        await asyncio.to_thread(backend._run, join(["scancel", f"--name={name}"]))
    return res


def table(results: list[SizeResult], interval_s: float, window_s: float, stats_ok: bool) -> str:
    def per(x: int, r: SizeResult) -> str:
        return f"{x / r.polls:.2f}" if r.polls else "-"

    head = (
        f"{'jobs':>5} {'polls':>5} {'queries/poll':>12} {'ssh/poll':>8} {'ctld RPC/poll':>13} {'dbd RPC/poll':>12} "
        f"{'naive ctld+dbd/poll':>19} {'poll ms p50':>11} {'ended':>5} {'detect s p50':>12} {'detect s max':>12}"
    )
    lines = [
        f"Slurm polling, interval {interval_s:g} s, window {window_s:g} s"
        + ("" if stats_ok else "  (sdiag/sacctmgr unreadable: daemon columns are 0)"),
        head,
        "-" * len(head),
    ]
    for r in results:
        lat = r.latencies_s
        lines.append(
            f"{r.n_jobs:>5} {r.polls:>5} {per(r.queries, r):>12} {per(r.round_trips, r):>8} "
            f"{per(r.ctld_rpcs, r):>13} {per(r.dbd_rpcs, r):>12} "
            f"{r.naive_ctld_rpcs + r.naive_dbd_rpcs:>19} "
            f"{statistics.median(r.poll_s) * 1000 if r.poll_s else 0:>11.0f} {r.ended:>5} "
            f"{statistics.median(lat) if lat else float('nan'):>12.2f} {max(lat) if lat else float('nan'):>12.2f}"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[SizeResult]:
    backend = SlurmBackend.from_spec(
        {"kind": "slurm", "conn_id": args.conn_id, "workdir": "charllm-work", "partition": args.partition}
    )
    stats = DaemonStats()
    results = []
    try:
        for n in args.sizes:
            r = await run_size(backend, stats, n, args.interval_s, args.window_s, args.partition)
            results.append(r)
            print(f"  {n} jobs: {r.polls} polls, {r.queries} queries, {r.ended} ended", file=sys.stderr)
    finally:
        await backend.aclose()
        backend.close()
    print(table(results, args.interval_s, args.window_s, stats.ok))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,10,100,300", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--interval-s", type=float, default=2.0)
    ap.add_argument("--window-s", type=float, default=20.0)
    ap.add_argument("--conn-id", default="charllm_dev_cluster")
    ap.add_argument("--partition", default=None)
    args = ap.parse_args()
    ensure_env()
    for noisy in ("asyncssh", "paramiko"):  # they log every command and connection at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.partition = args.partition or os.environ.get("CHARLLM_SLURM_PARTITION", "debug")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

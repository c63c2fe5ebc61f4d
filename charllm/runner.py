"""A campaign's lifecycle, independent of Airflow: one implementation for the UI and the shell.

setup (the environment job and its wait, the dataset job) -> plan -> per cell repeat:
submit-or-reattach -> wait -> judge the terminal state (resubmit / finished / failed, within
the attempt budget) -> collect -> aggregate.

The DAG's tasks (``charllm.orchestrate``: the setup tasks, the deferrable sensor, collect)
call the steps one by one; ``charllm run`` calls :meth:`CampaignRunner.run`, which drives the
same steps in a loop. Every decision about a job state is made here (:func:`judge`,
:meth:`CampaignRunner.on_end`, :mod:`charllm.setup.jobs`'s setup jobs), in the words of
:mod:`charllm.outcomes`. Nothing here imports Airflow.

Settings (each an environment variable; the cluster profile field of the same name, where
the profile has one, comes next; then the default):

- ``CHARLLM_TRANSPORT_PATIENCE_S`` / ``transport_patience_s`` (1800): how long the cluster
  may be unreachable (SSH down, controller down) before a step gives up;
- ``CHARLLM_MAX_ATTEMPTS`` / ``max_attempts`` (3): attempts of a cell repeat per run when
  its jobs are lost (node failure, pre-emption, a job the scheduler forgot);
- ``CHARLLM_MAX_JOBS_IN_FLIGHT`` / ``max_jobs_in_flight`` (none): jobs of one cluster in
  flight at once, counted in the catalog across every DAG run and ``charllm run``;
- ``CHARLLM_RESERVATION_LEASE_S`` (600): how long another orchestrator's reservation (an
  attempt it is submitting) is respected when its owner runs on another host;
- ``CHARLLM_SUBMIT_LIMIT_BACKOFF_S`` / ``submit_limit_backoff_s`` (30): the first wait after
  sbatch refused a job for a per-user, account or QOS submit limit (then doubling, to 10 min);
- ``CHARLLM_SLURM_TRANSPORT`` / ``slurm_transport`` (``ssh``): ``local`` runs the Slurm
  commands of this machine instead of going through the SSH connection.
"""

from __future__ import annotations

import functools
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from charllm.backends import backend_class, make_backend
from charllm.backends.base import Backend, JobHandle, JobIdentity, JobState, JobStatus
from charllm.campaign import Cell, LoadedCampaign, load_campaign
from charllm.catalog import AttemptRow, Catalog, Reserved, owner_alive, process_token
from charllm.errors import (
    ConfigError,
    JobFailedError,
    ResultError,
    SubmissionError,
    SubmitLimitError,
    TransportError,
)
from charllm.outcomes import (  # judge, Verdict: their home is outcomes; re-exported here
    DEFAULT_MAX_ATTEMPTS,
    OOM_EXIT_CODE,
    Action,
    AttemptState,
    Outcome,
    SubmitKind,
    Verdict,
    judge,
)
from charllm.paths import home as default_home
from charllm.render import job_spec, write_dry_run
from charllm.settings import setting
from charllm.store import commit_attempt, now_iso, read_result

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PATIENCE_S = 1800.0
DEFAULT_LEASE_S = 600.0
# sbatch refusals for submit limits: first wait, doubling up to the cap, jittered
SUBMIT_LIMIT_BACKOFF_S = (30.0, 600.0)


# -- waiting out the cluster ---------------------------------------------------------------


def backoff_delay(n: int, low: float, high: float) -> float:
    """Exponential from ``low``, capped at ``high``, jittered by 0.5..1.5 (never above ``high``)."""
    return float(min(high, min(high, low * 2**n) * random.uniform(0.5, 1.5)))


class Patience:
    """Wait out transport outages: retry a step with a bounded, jittered back-off until ``patience_s``.

    Only :class:`TransportError` with ``retryable`` is waited out (SSH refused, the controller
    down, a dropped connection); authentication and host-key errors fail at once.
    """

    def __init__(
        self,
        patience_s: float,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        min_delay_s: float = 2.0,
        max_delay_s: float = 60.0,
    ) -> None:
        self.patience_s = patience_s
        self.sleep = sleep
        self.clock = clock
        self.min_delay_s = min(min_delay_s, max(0.05, patience_s / 10))
        self.max_delay_s = min(max_delay_s, max(0.1, patience_s / 4))

    def call(self, fn: Callable[[], T], what: str, since: float | None = None) -> T:
        """``fn()``, retried while the cluster is unreachable; ``since``: the outage began before this call."""
        start = since
        n = 0
        while True:
            try:
                return fn()
            except TransportError as err:
                if not err.retryable:
                    raise
                now = self.clock()
                start = now if start is None else start
                waited = now - start
                if waited >= self.patience_s:
                    raise TransportError(
                        f"{what}: the cluster was unreachable for {waited:.0f} s, longer than the transport "
                        f"patience of {self.patience_s:.0f} s (CHARLLM_TRANSPORT_PATIENCE_S): {err}",
                        retryable=False,
                    ) from err
                delay = min(backoff_delay(n, self.min_delay_s, self.max_delay_s), self.patience_s - waited + 0.01)
                log.warning(
                    "%s: the cluster is unreachable (%s); trying again in %.1f s (unreachable for %.0f s of a "
                    "patience of %.0f s)",
                    what,
                    err,
                    delay,
                    waited,
                    self.patience_s,
                )
                self.sleep(delay)
                n += 1


# -- the backend -----------------------------------------------------------------------------


def select_cells(lc: LoadedCampaign, pattern: str | None) -> list[Cell]:
    """The cells of a campaign a filter picks; a filter that picks none is an error that lists a few names."""
    cells = lc.select(pattern)
    if not cells:
        names = [c.name for c in lc.cells]
        few = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
        raise ConfigError(
            lc.source,
            "cells",
            f"the filter {pattern!r} matches no cell of campaign {lc.name} (comma-separated globs over "
            f"cell names, or cell-hash prefixes); its cells are: {few}",
        )
    return cells


def backend_for(lc: LoadedCampaign, home: Path) -> Backend:
    """The campaign's backend, built from its cluster profile (the registry's class says how)."""
    return make_backend(backend_class(lc.campaign.backend, lc.source, "backend").spec_for(lc, home))


@dataclass
class Submission:
    """What :meth:`CampaignRunner.submit_or_reattach` did for a cell repeat."""

    kind: SubmitKind
    handle: JobHandle | None = None
    result: dict[str, Any] | None = None  # DONE: the valid result
    reason: str = ""  # WAIT: why not now
    retry_in_s: float = 0.0  # WAIT: when to try again
    transport: bool = False  # WAIT because the cluster was unreachable (counts against the patience)
    throttled: bool = False  # WAIT because the cluster is at its limit of jobs in flight


@dataclass
class RunReport:
    """What ``charllm run`` did."""

    run_id: str
    planned: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


class CampaignRunner:
    """Every step of a campaign, for the DAG's tasks and for ``charllm run``."""

    def __init__(
        self,
        lc: LoadedCampaign,
        catalog: Catalog | None = None,
        home: Path | None = None,
        backend: Backend | None = None,
        owner: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.lc = lc
        self.home = home or default_home()
        self.catalog = catalog or Catalog()
        self.backend = backend or backend_for(lc, self.home)
        self.owner = owner or process_token()
        self.sleep = sleep
        self._cells = {c.cell_id: c for c in lc.cells}

    @classmethod
    def from_file(cls, path: str | Path, **kw: Any) -> CampaignRunner:
        return cls(load_campaign(path), **kw)

    # -- settings ---------------------------------------------------------------------------
    @property
    def data_home(self) -> Path | None:
        """Where relative dataset paths start: the results home on the local backend, else the login home."""
        return self.home if self.backend.capabilities.runs_here else None

    @property
    def poll_interval_s(self) -> float:
        return self.lc.cluster.poll_interval_s

    @property
    def patience_s(self) -> float:
        return setting("transport_patience_s", self.lc.cluster, DEFAULT_PATIENCE_S, float)

    @property
    def max_attempts(self) -> int:
        return max(1, setting("max_attempts", self.lc.cluster, DEFAULT_MAX_ATTEMPTS, int))

    @property
    def max_in_flight(self) -> int | None:
        n = setting("max_jobs_in_flight", self.lc.cluster, 0, int)
        return n if n > 0 else None

    @property
    def lease_s(self) -> float:
        return setting("reservation_lease_s", None, DEFAULT_LEASE_S, float)

    def submit_limit_delay(self, n: int) -> float:
        """How long to wait after the ``n``-th sbatch refusal in a row for a submit limit (``submit_limit_backoff_s``)."""
        low = setting("submit_limit_backoff_s", self.lc.cluster, SUBMIT_LIMIT_BACKOFF_S[0], float)
        return backoff_delay(n, low, max(low, SUBMIT_LIMIT_BACKOFF_S[1]))

    @property
    def cluster_key(self) -> str:
        """Jobs in flight are counted per cluster profile (the same profile, the same queue)."""
        return self.lc.cluster.name

    def patience(self) -> Patience:
        return Patience(self.patience_s, sleep=self.sleep)

    def cell(self, cell_id: str) -> Cell:
        try:
            return self._cells[cell_id]
        except KeyError:
            raise ConfigError(self.lc.source, "cells", f"no cell {cell_id!r} in campaign {self.lc.name}") from None

    def select(self, pattern: str | None) -> list[Cell]:
        """The cells a filter picks; a filter that picks none is an error that lists a few names."""
        return select_cells(self.lc, pattern)

    # -- planning -----------------------------------------------------------------------
    def register(self) -> None:
        self.catalog.register(
            self.lc.name, self.lc.source, [(c.cell_id, c.name, c.model_dump(mode="json")) for c in self.lc.cells]
        )

    def plan(
        self, pattern: str | None = None, repeats: int | None = None, force: bool = False, append: bool = False
    ) -> list[dict[str, Any]]:
        """Cell repeats to run: selected by ``pattern``, minus those with valid results.

        ``append`` (a nightly re-run) plans ``repeats`` new repeats of each selected cell,
        numbered after the highest repeat it has, so every night adds measurements and none
        replaces another.
        """
        cells = self.select(pattern)
        if self.lc.campaign.prune != "none":  # charllm.predict.plan: one canary per model runs
            from charllm.predict.plan import pruned

            skip = pruned(self.lc)
            for c in cells:
                if c.cell_id in skip:
                    log.info("cell %s (%s): pruned, not run: %s", c.name, c.cell_id, skip[c.cell_id])
            cells = [c for c in cells if c.cell_id not in skip]
        self.register()
        reps = repeats or self.lc.campaign.repeats
        items = []
        if append:
            for cell in cells:
                first = max((a.repeat for a in self.catalog.attempts(cell_id=cell.cell_id)), default=-1) + 1
                for r in range(first, first + reps):
                    items.append({"cell_id": cell.cell_id, "repeat": r, "name": cell.name, "force": False})
            log.info("appending %d new repeat(s) per cell to %d cell(s)", reps, len(items) // max(reps, 1))
            return items
        results = {} if force else self.catalog.results_of([c.cell_id for c in cells])
        for cell in cells:
            for r in range(reps):
                done = results.get((cell.cell_id, r))
                if done is not None:
                    log.info(
                        "cell %s (%s) repeat %d: done (attempt %d, %s), skipped",
                        cell.name,
                        cell.cell_id,
                        r,
                        done.attempt,
                        done.outcome,
                    )
                    continue
                items.append({"cell_id": cell.cell_id, "repeat": r, "name": cell.name, "force": force})
        return items

    def render(self, cell_id: str, repeat: int, dest: Path) -> Path:
        """Dry run: write the job script and cell.json, submit nothing."""
        cell = self.cell(cell_id)
        ident = JobIdentity(self.lc.name, cell_id, repeat, 0)
        return write_dry_run(job_spec(cell, self.lc.cluster_for(cell), ident, data_home=self.data_home), dest)

    def render_all(self, items: list[dict[str, Any]], dest: Path) -> list[Path]:
        """Dry run of planned items: one folder per cell repeat under ``dest``.

        The template environment is built once for the whole batch (``charllm.render.templates``
        builds, and so compiles ``job.sbatch.j2``, on every call: 30 ms a script, 5 minutes for
        10,000 cells; once, it is ~2 ms a script).
        """
        import charllm.render as render_mod

        build = render_mod.templates
        render_mod.templates = functools.lru_cache(maxsize=1)(build)  # type: ignore[assignment]
        try:
            return [self.render(i["cell_id"], i["repeat"], dest / f"{i['name']}-r{i['repeat']}") for i in items]
        finally:
            render_mod.templates = build  # type: ignore[assignment]

    # -- environment and data (see charllm.setup.jobs) ------------------------------------
    def install(self) -> dict[str, Any]:
        """Check (local) or find/submit (cluster) the environment job; returns a handle to wait for, or skipped."""
        from charllm.setup.jobs import ensure_environment

        return ensure_environment(self)

    def after_setup_job(self, kind: str, handle: JobHandle, status: JobStatus) -> dict[str, Any]:
        """Judge an ended environment or dataset job: finished, or the next attempt's handle; raises if failed."""
        from charllm.setup.jobs import setup_after_end

        return setup_after_end(self, kind, handle, status)

    def prepare_dataset(self) -> dict[str, Any]:
        """Prepare the campaign's dataset (a job for ``indexed``) and wait for it."""
        from charllm.setup.jobs import ensure_dataset

        return ensure_dataset(self)

    def setup(self) -> dict[str, Any]:
        """The environment (its job, and the wait for it) and the dataset: what the DAG does before ``plan``."""
        from charllm.setup.jobs import wait_setup_job

        env = self.install()
        if env.get("handle"):
            env = wait_setup_job(self, "environment", JobHandle.from_dict(env["handle"]))
        return {"environment": env, "dataset": self.prepare_dataset()}

    def wait_for(self, handle: JobHandle, what: str, timeout_s: float | None = None) -> JobStatus:
        """Poll one job until it ends (synchronously), waiting out transport outages."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last: JobState | None = None
        patience = self.patience()
        while True:
            st = patience.call(lambda: self.backend.statuses([handle.job_id])[handle.job_id], f"polling {what}")
            if st.state is not last:
                log.info("%s job %s: %s%s", what, handle.job_id, st.state.value, f" on {st.nodes}" if st.nodes else "")
                last = st.state
            if st.state.is_terminal:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise JobFailedError(
                    f"{what} job {handle.job_id} did not end within {timeout_s:.0f} s (still {st.state.value}); "
                    f"see {handle.workdir}"
                )
            self.sleep(self.poll_interval_s)

    # -- submission ---------------------------------------------------------------------
    def identity(self, row: AttemptRow) -> JobIdentity:
        return JobIdentity(self.lc.name, row.cell_id, row.repeat, row.attempt, row.nonce or "")

    def submit_or_reattach(self, cell_id: str, repeat: int, run_id: str | None, force: bool = False) -> Submission:
        """Re-attach to the cell repeat's job in flight, or reserve a new attempt and submit it.

        Never two jobs at once for a cell repeat, whoever asks (this DAG run, a retried task,
        another DAG run, ``charllm run``): the catalog's :meth:`~charllm.catalog.Catalog.reserve`
        decides atomically. An attempt reserved by an orchestrator that died before recording
        its job id is taken over (the backend's ``find`` sees the job if sbatch had run); one
        reserved by a live orchestrator is waited for. Returns WAIT (never raises) when the
        cluster is at its limit of jobs in flight, sbatch refused the job for a submit limit, or
        the cluster is unreachable; a job the scheduler refuses outright ends the attempt as
        ``failed`` and raises :class:`JobFailedError`.
        """
        cell = self.cell(cell_id)
        res = self.catalog.reserve(
            cell_id,
            repeat,
            campaign=self.lc.name,
            backend=self.backend.name,
            run_id=run_id,
            owner=self.owner,
            force=force,
            cluster=self.cluster_key,
            max_in_flight=self.max_in_flight,
        )
        if res.kind is Reserved.DONE:
            row = res.row
            assert row is not None
            log.info("cell %s repeat %d: has a result (attempt %d, %s)", cell.name, repeat, row.attempt, row.outcome)
            return Submission(SubmitKind.DONE, result=self._summary_of(row))
        if res.kind is Reserved.THROTTLED:
            if self.refresh_queued():  # jobs that ended unobserved free their places at once
                return self.submit_or_reattach(cell_id, repeat, run_id, force)
            return Submission(
                SubmitKind.WAIT,
                reason=f"cluster {self.cluster_key} has {res.in_flight} job(s) in flight (limit {self.max_in_flight})",
                # jittered, so that many held-back submitters do not all ask again at once
                retry_in_s=self.poll_interval_s * random.uniform(1.0, 2.0),
                throttled=True,
            )
        row = res.row
        assert row is not None
        ident = self.identity(row)
        if res.kind is Reserved.IN_FLIGHT:
            if row.job_id:
                handle = self.backend.handle_for(ident, row.job_id)
                mine = " (another orchestrator's)" if row.run_id != run_id else ""
                log.info(
                    "cell %s repeat %d: re-attached to job %s (attempt %d%s)",
                    cell.name,
                    repeat,
                    row.job_id,
                    row.attempt,
                    mine,
                )
                return Submission(SubmitKind.ATTACHED, handle)
            if row.owner != self.owner:
                alive = owner_alive(row.owner)
                fresh = row.heartbeat_at is not None and _age_s(row.heartbeat_at) < self.lease_s
                if alive or (alive is None and fresh):
                    return Submission(
                        SubmitKind.WAIT,
                        reason=f"attempt {row.attempt} is being submitted by {row.owner} (run {row.run_id})",
                        retry_in_s=min(self.poll_interval_s, 5.0),
                    )
                if not self.catalog.take_over(row, self.owner):
                    return Submission(
                        SubmitKind.WAIT, reason="another orchestrator took the attempt over", retry_in_s=1
                    )
                log.info("cell %s repeat %d: taking over attempt %d from %s", cell.name, repeat, row.attempt, row.owner)
        return self._submit(cell, ident, row.id, run_id)

    def _submit(self, cell: Cell, ident: JobIdentity, row_id: int, run_id: str | None) -> Submission:
        self.catalog.heartbeat(row_id)
        spec = job_spec(cell, self.lc.cluster_for(cell), ident, data_home=self.data_home)
        try:
            handle = self.backend.submit(spec)
        except SubmitLimitError as err:
            # nothing was submitted (submit looks for the job first): the place is given back
            self.catalog.release(row_id)
            log.warning("cell %s repeat %d: %s; submitting again later", cell.name, ident.repeat, err)
            used = getattr(self, "_limit_refusals", 0)
            self._limit_refusals = used + 1
            return Submission(SubmitKind.WAIT, reason=str(err), retry_in_s=self.submit_limit_delay(used))
        except TransportError as err:
            if not err.retryable:
                raise
            return Submission(
                SubmitKind.WAIT, reason=f"the cluster is unreachable: {err}", retry_in_s=10.0, transport=True
            )
        except SubmissionError as err:
            self.catalog.update_attempt(
                ident.cell_id,
                ident.repeat,
                ident.attempt,
                state=AttemptState.ENDED,
                outcome=Outcome.FAILED,
                message=f"the scheduler refused the job: {err}",
            )
            raise JobFailedError(f"cell {cell.name} repeat {ident.repeat}: {err}") from err
        self._limit_refusals = 0
        self.catalog.update_attempt(
            ident.cell_id, ident.repeat, ident.attempt, state=AttemptState.SUBMITTED, job_id=handle.job_id
        )
        log.info(
            "cell %s repeat %d attempt %d: job %s in %s",
            cell.name,
            ident.repeat,
            ident.attempt,
            handle.job_id,
            handle.workdir,
        )
        return Submission(SubmitKind.SUBMITTED, handle)

    def refresh_queued(self) -> int:
        """Mark attempts on this cluster whose jobs ended as ``job_ended``; returns how many.

        The limit of jobs in flight counts attempts until their job is seen to end, by whoever
        waits for it. One waiter may be slow to look (a task not yet scheduled, an orchestrator
        that died): a submitter held back by the limit asks the scheduler about every attempt
        it counts (one status query), so a place is never held by a job that has ended.
        """
        rows = [r for r in self.catalog.queued(self.cluster_key) if r.job_id and r.backend == self.backend.name]
        if not rows:
            return 0
        try:
            statuses = self.backend.statuses([r.job_id for r in rows if r.job_id])
        except TransportError:
            return 0
        ended = 0
        for r in rows:
            st = statuses.get(r.job_id or "")
            if st is not None and st.state.is_terminal:
                ended += self.catalog.mark_job_ended(r.cell_id, r.repeat, r.attempt)
        if ended:
            log.info("%d job(s) on cluster %s ended: their places are free", ended, self.cluster_key)
        return ended

    def _summary_of(self, row: AttemptRow) -> dict[str, Any]:
        return {
            "cell_id": row.cell_id,
            "repeat": row.repeat,
            "attempt": row.attempt,
            "outcome": row.outcome,
            "result_dir": row.result_dir,
            "job_id": row.job_id,
        }

    # -- judging ------------------------------------------------------------------------
    def attempts_used(self, cell_id: str, repeat: int, run_id: str | None) -> int:
        """Attempts of a cell repeat made by run ``run_id`` (at least 1: the one that just ended)."""
        rows = [a for a in self.catalog.attempts(cell_id=cell_id) if a.repeat == repeat and a.run_id == run_id]
        return max(1, len(rows))

    def on_end(self, handle: JobHandle, status: JobStatus, run_id: str | None) -> Verdict:
        """Judge a job that reached a terminal state, with this run's attempt budget.

        RESUBMIT: the lost attempt is collected now (its logs are kept, its outcome is ``lost``)
        and the caller submits the next one with :meth:`submit_or_reattach`. FINISHED and
        FAILED: the caller collects with :meth:`finish`.
        """
        i = handle.identity
        # the job left the queue: its place counts no more against the cluster's limit
        self.catalog.mark_job_ended(i.cell_id, i.repeat, i.attempt)
        verdict = judge(status, self.attempts_used(i.cell_id, i.repeat, run_id), self.max_attempts)
        log.info(
            "job %s (cell %s r%d attempt %d) ended %s (exit code %s) on %s: %s -> %s%s",
            handle.job_id,
            i.cell_id,
            i.repeat,
            i.attempt,
            status.state.value,
            status.exit_code,
            status.nodes or "?",
            verdict.outcome,
            verdict.action,
            f" ({verdict.reason})" if verdict.reason else "",
        )
        if verdict.action is Action.RESUBMIT:
            self.collect(handle, status)
        return verdict

    # -- collection ---------------------------------------------------------------------
    def collect(self, handle: JobHandle, status: JobStatus) -> tuple[str, Path, dict[str, Any]]:
        """Copy the job's files into the results store, classify, record in the catalog.

        The copy waits out transport outages (``transport_patience_s``).
        """
        verdict = judge(status)
        ident = handle.identity
        cell = self.cell(ident.cell_id)

        def classify(tmp: Path) -> tuple[str, dict[str, Any] | None, str]:
            try:
                result = read_result(tmp)
            except ResultError as err:
                if verdict.outcome is Outcome.OK:
                    return Outcome.FAILED, None, f"job completed but its result is invalid: {err}"
                return verdict.outcome, None, f"job ended {status.state.value} (exit {status.exit_code}): {err}"
            outcome = Outcome(result["outcome"])
            if outcome is Outcome.OK and verdict.outcome is not Outcome.OK:
                outcome = verdict.outcome  # a result file does not overrule e.g. a time limit
            return outcome, result, str(result.get("error") or "")

        fields = {
            "campaign": self.lc.name,
            "cell_id": cell.cell_id,
            "cell_name": cell.name,
            "cell": cell.model_dump(mode="json"),
            "backend": self.backend.name,
            "job_id": handle.job_id,
            "job_state": status.state.value,
            "exit_code": status.exit_code,
            "nodes": status.nodes,
            "elapsed_s": status.elapsed_s,
        }
        final, manifest = self.patience().call(
            lambda: commit_attempt(self.home, ident, lambda d: self.backend.fetch(handle, d), fields, classify),
            f"collecting job {handle.job_id}",
        )
        outcome = Outcome(manifest["outcome"])
        self.catalog.update_attempt(
            ident.cell_id,
            ident.repeat,
            ident.attempt,
            state=AttemptState.ENDED,
            outcome=outcome,
            message=manifest.get("message") or None,
            result_dir=str(final),
        )
        return outcome, final, manifest

    def job_tail(self, handle: JobHandle, n_bytes: int = 3000) -> str:
        """The job's stdout and stderr tails for the log; best effort (one try: a log line is not worth a wait)."""
        try:
            out, err = self.backend.tail(handle, n_bytes, tries=1)
        except TransportError as exc:
            return f"--- job {handle.job_id}: log tail not available ({exc}) ---"
        return f"--- job {handle.job_id} stdout (tail) ---\n{out}\n--- job {handle.job_id} stderr (tail) ---\n{err}"

    def finish(self, handle: JobHandle, status: JobStatus) -> dict[str, Any]:
        """Collect a terminal job and apply the policy; raises JobFailedError if the cell failed."""
        outcome, final, manifest = self.collect(handle, status)
        summary = {
            "cell_id": handle.identity.cell_id,
            "repeat": handle.identity.repeat,
            "attempt": handle.identity.attempt,
            "outcome": str(outcome),
            "result_dir": str(final),
            "job_id": handle.job_id,
            "state": status.state.value,
        }
        if Outcome(outcome).is_result:
            return summary
        err = JobFailedError(
            f"cell {manifest.get('cell_name')} attempt {handle.identity.attempt}: job {handle.job_id} ended "
            f"{status.state.value} (exit code {status.exit_code}); outcome {outcome}. {manifest.get('message') or ''}"
        )
        err.retryable = judge(status).retryable  # type: ignore[attr-defined]
        raise err

    # -- the whole campaign without Airflow ---------------------------------------------
    def run(
        self,
        pattern: str | None = None,
        repeats: int | None = None,
        force: bool = False,
        append: bool = False,
        run_id: str | None = None,
        progress: Callable[[str], None] | None = None,
        figures: bool = True,
    ) -> RunReport:
        """``charllm run``: the DAG's lifecycle in one process, with the same steps and decisions.

        Setup (environment job and its wait, dataset job), plan, then every planned cell
        repeat through submit-or-reattach, a batched wait (one status query per interval for
        all of this run's jobs), the judgement (resubmit a lost job within the budget), and
        collection; then aggregation and figures. A cell repeat another orchestrator has in
        flight is waited for, never submitted again.
        """
        say = progress or (lambda s: log.info("%s", s))
        run_id = run_id or f"cli__{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}_{uuid.uuid4().hex[:6]}"
        self.select(pattern)
        report = RunReport(run_id)
        self.setup()
        items = self.plan(pattern, repeats, force, append=append)
        report.planned = len(items)
        say(f"run {run_id}: {len(items)} cell repeat(s) to run")
        todo: deque[tuple[dict[str, Any], float, float | None]] = deque((i, 0.0, None) for i in items)
        active: dict[str, tuple[dict[str, Any], JobHandle]] = {}
        done_n = 0
        patience = self.patience()

        def settle(item: dict[str, Any], outcome: str, line: str) -> None:
            nonlocal done_n
            done_n += 1
            report.outcomes[outcome] = report.outcomes.get(outcome, 0) + 1
            if not Outcome(outcome).is_result:
                report.failed.append(f"{item['name']} r{item['repeat']}")
            say(f"[{done_n}/{len(items)}] {item['name']} r{item['repeat']}: {line}")

        while todo or active:
            now = time.monotonic()
            for _ in range(len(todo)):
                item, not_before, outage = todo.popleft()
                if not_before > now:
                    todo.append((item, not_before, outage))
                    continue
                try:
                    sub = self.submit_or_reattach(item["cell_id"], item["repeat"], run_id, bool(item.get("force")))
                except JobFailedError as err:
                    settle(item, Outcome.FAILED, f"FAILED: {err}")
                    continue
                if sub.kind is SubmitKind.DONE:
                    res = sub.result or {}
                    settle(item, str(res.get("outcome")), f"{res.get('outcome')}: {res.get('result_dir')}")
                elif sub.kind is SubmitKind.WAIT:
                    if sub.transport:
                        outage = outage if outage is not None else now
                        if now - outage > self.patience_s:
                            raise TransportError(
                                f"submitting {item['name']} r{item['repeat']}: the cluster was unreachable for "
                                f"{now - outage:.0f} s (patience {self.patience_s:.0f} s): {sub.reason}",
                                retryable=False,
                            )
                    log.info(
                        "%s r%d: %s; trying again in %.0f s", item["name"], item["repeat"], sub.reason, sub.retry_in_s
                    )
                    todo.append((item, now + sub.retry_in_s, outage))
                else:
                    assert sub.handle is not None
                    active[sub.handle.job_id] = (item, sub.handle)
                    say(f"        {item['name']} r{item['repeat']}: job {sub.handle.job_id} ({sub.kind})")
            if active:
                ids = sorted(active)
                statuses = patience.call(functools.partial(self.backend.statuses, ids), f"polling {len(ids)} job(s)")
                for job_id in ids:
                    st = statuses.get(job_id)
                    if st is None or not st.state.is_terminal:
                        continue
                    item, handle = active.pop(job_id)
                    verdict = self.on_end(handle, st, run_id)
                    if verdict.action is Action.RESUBMIT:
                        say(f"        {item['name']} r{item['repeat']}: job {job_id} {st.state.value}, resubmitting")
                        todo.appendleft((item, 0.0, None))
                        continue
                    try:
                        s = self.finish(handle, st)
                        settle(item, s["outcome"], f"{s['outcome']}: {s['result_dir']}")
                    except JobFailedError as err:
                        settle(item, str(verdict.outcome), f"FAILED: {err}\n{self.job_tail(handle)}")
            if active:
                self.sleep(self.poll_interval_s)
            elif todo:
                self.sleep(max(0.0, min(nb for _, nb, _ in todo) - time.monotonic()))
        self.aggregate()
        if figures:
            report.figures = self.visualize(run_id)
        return report

    # -- after the sweep ---------------------------------------------------------------------
    def tables_dir(self) -> Path:
        return self.home / "tables" / self.lc.name

    def aggregate(self) -> dict[str, Any]:
        from charllm.analysis.aggregate import aggregate

        try:
            info = aggregate(self.catalog, self.lc.name, self.tables_dir(), [c.cell_id for c in self.lc.cells])
        except OSError as err:
            from charllm.store import storage_error

            raise storage_error(err, self.tables_dir(), f"writing the tables of campaign {self.lc.name}") from err
        log.info(
            "tables: %s (%d rows, %s), %s", info["cells_table"], info["rows"], info["outcomes"], info["steps_table"]
        )
        return info

    def visualize(self, run_id: str) -> list[str]:

        from charllm.analysis.aggregate import read_table
        from charllm.analysis.figures import draw_all

        if not (self.tables_dir() / "cells.parquet").exists():
            log.info("no tables in %s yet (aggregate has not run): no figures drawn", self.tables_dir())
            return []
        cells = read_table(self.tables_dir() / "cells.parquet")
        steps = read_table(self.tables_dir() / "steps.parquet")
        if cells.empty:
            log.info("no results in %s yet: no figures drawn", self.tables_dir())
            return []
        out = self.home / "figures" / self.lc.name / _safe_run(run_id)
        camp = self.lc.campaign
        paths = draw_all(
            cells,
            steps,
            out,
            self.lc.name,
            tables_dir=self.tables_dir(),
            references=list(camp.references),
            schedule=camp.schedule or "",
        )
        self.check_references(cells)
        return [str(p) for p in paths]

    def check_references(self, cells: Any) -> list[Any]:
        """The campaign's reference bands that its results miss, each logged as a warning."""
        from charllm.analysis.reference import check_references, violations

        bad = violations(check_references(self.lc.campaign.references, cells))
        for c in bad:
            log.warning("reference check failed: %s", c)
        return bad

    def outcomes_of(self, planned: list[dict[str, Any]], run_id: str | None = None) -> dict[str, int]:
        """Outcome counts of planned cell repeats ('missing' where no attempt ended).

        Each cell repeat is judged by its latest ended attempt made by run ``run_id`` (where that
        run made one; else by its latest ended attempt at all: a job another run submitted and
        this one re-attached to). An earlier ``ok`` never hides a later failure: a forced re-run
        whose job failed fails its run.
        """
        counts: dict[str, int] = {}
        by_cell: dict[str, list[AttemptRow]] = {}
        for item in planned:
            if item["cell_id"] not in by_cell:
                by_cell[item["cell_id"]] = self.catalog.attempts(cell_id=item["cell_id"])
            rows = [a for a in by_cell[item["cell_id"]] if a.repeat == item["repeat"]]
            mine = [a for a in rows if run_id is not None and a.run_id == run_id]
            ended = sorted((a for a in (mine or rows) if Outcome.parse(a.outcome) is not None), key=lambda a: a.attempt)
            best = Outcome.parse(ended[-1].outcome) if ended else None
            key = str(best or Outcome.MISSING)
            counts[key] = counts.get(key, 0) + 1
        return counts


def _age_s(ts: datetime) -> float:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (datetime.now(UTC) - ts).total_seconds()


def _safe_run(run_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run_id)


__all__ = [
    "OOM_EXIT_CODE",
    "CampaignRunner",
    "Patience",
    "RunReport",
    "Submission",
    "Verdict",
    "judge",
    "now_iso",
]

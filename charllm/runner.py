"""A campaign's cell lifecycle, independent of Airflow: plan, submit, judge, collect.

The Airflow tasks and the command-line twin both call this module, so a campaign run
from the UI and one run from a shell do the same thing. Nothing here imports Airflow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charllm.backends import make_backend
from charllm.backends.base import Backend, JobHandle, JobIdentity, JobState, JobStatus, parse_time_limit
from charllm.campaign import Cell, LoadedCampaign, load_campaign
from charllm.catalog import Catalog
from charllm.errors import ConfigError, JobFailedError, ResultError
from charllm.paths import home as default_home
from charllm.render import job_spec, write_dry_run
from charllm.store import commit_attempt, now_iso, read_result

log = logging.getLogger(__name__)

OOM_EXIT_CODE = 42  # charllm.train's exit code after a CUDA out-of-memory error


@dataclass(frozen=True)
class Verdict:
    """What a terminal job state means for its cell."""

    outcome: str  # ok | oom | failed | timeout | cancelled | lost
    retry: bool  # resubmit (counted against the task's retries)
    fail_task: bool  # the Airflow task fails
    no_retry: bool  # ... and Airflow must not retry it


def judge(status: JobStatus) -> Verdict:
    """Map a terminal job state to the policy of the state table."""
    st = status.state
    if st.is_success:
        return Verdict("ok", False, False, False)
    if st is JobState.OUT_OF_MEMORY or (st is JobState.FAILED and status.exit_code == OOM_EXIT_CODE):
        return Verdict("oom", False, False, False)
    if st.is_retryable:
        return Verdict("lost", True, False, False)
    if st is JobState.TIMEOUT or st is JobState.DEADLINE:
        return Verdict("timeout", False, True, True)
    if st is JobState.CANCELLED or st is JobState.REVOKED:
        return Verdict("cancelled", False, True, True)
    return Verdict("failed", False, True, False)


def backend_for(lc: LoadedCampaign, home: Path) -> Backend:
    """The campaign's backend, built from its cluster profile."""
    cluster = lc.cluster
    if lc.campaign.backend == "local":
        return make_backend(
            {
                "kind": "local",
                "root": str(home / "work"),
                "time_limit_s": parse_time_limit(cluster.time_limit),
                "slots": cluster.local_slots,
            }
        )
    conn_id = lc.campaign.connection_id
    if not conn_id:
        raise ConfigError(lc.source, "connection_id", "a slurm campaign needs an Airflow SSH connection id")
    return make_backend(
        {
            "kind": "slurm",
            "conn_id": conn_id,
            "workdir": cluster.workdir or "charllm-work",
            "partition": cluster.partition,
            "poll_interval_s": cluster.poll_interval_s,
        }
    )


class CampaignRunner:
    """Everything the DAG's tasks do, for one campaign."""

    def __init__(
        self,
        lc: LoadedCampaign,
        catalog: Catalog | None = None,
        home: Path | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.lc = lc
        self.home = home or default_home()
        self.catalog = catalog or Catalog()
        self.backend = backend or backend_for(lc, self.home)
        self._cells = {c.cell_id: c for c in lc.cells}

    @classmethod
    def from_file(cls, path: str | Path, **kw: Any) -> CampaignRunner:
        return cls(load_campaign(path), **kw)

    @property
    def data_home(self) -> Path | None:
        """Where relative dataset paths start: the results home on the local backend, else the login home."""
        return self.home if self.backend.name == "local" else None

    @property
    def poll_interval_s(self) -> float:
        return self.lc.cluster.poll_interval_s

    def cell(self, cell_id: str) -> Cell:
        try:
            return self._cells[cell_id]
        except KeyError:
            raise ConfigError(self.lc.source, "cells", f"no cell {cell_id!r} in campaign {self.lc.name}") from None

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
        self.register()
        reps = repeats or self.lc.campaign.repeats
        items = []
        if append:
            for cell in self.lc.select(pattern):
                first = max((a.repeat for a in self.catalog.attempts(cell_id=cell.cell_id)), default=-1) + 1
                for r in range(first, first + reps):
                    items.append({"cell_id": cell.cell_id, "repeat": r, "name": cell.name, "force": False})
            log.info("appending %d new repeat(s) per cell to %d cell(s)", reps, len(items) // max(reps, 1))
            return items
        for cell in self.lc.select(pattern):
            for r in range(reps):
                done = self.catalog.valid_result(cell.cell_id, r)
                if done is not None and not force:
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

    # -- submission ---------------------------------------------------------------------
    def ensure_submitted(self, cell_id: str, repeat: int, run_id: str | None = None, new: bool = False) -> JobHandle:
        """Re-attach to the cell's live job, or submit a new attempt. Never two jobs at once.

        A crash between reserving an attempt and recording its job id is covered by the
        backend's own ``find`` (job name/identity on the cluster).
        """
        cell = self.cell(cell_id)
        if not new:
            live = self.catalog.live_attempt(cell_id, repeat)
            if live is not None and live.job_id:
                ident = JobIdentity(self.lc.name, cell_id, repeat, live.attempt)
                handle = self.backend.find(ident)
                if handle is not None:
                    log.info("re-attached to job %s (attempt %d)", handle.job_id, live.attempt)
                    return handle
        reserved = self.catalog.reserved_attempt(cell_id, repeat)
        if reserved is not None:
            attempt = reserved.attempt
        else:
            attempt = self.catalog.new_attempt(cell_id, repeat, self.lc.name, self.backend.name, run_id)
        ident = JobIdentity(self.lc.name, cell_id, repeat, attempt)
        handle = self.backend.submit(job_spec(cell, self.lc.cluster_for(cell), ident, data_home=self.data_home))
        self.catalog.update_attempt(cell_id, repeat, attempt, state="submitted", job_id=handle.job_id, run_id=run_id)
        log.info(
            "cell %s repeat %d attempt %d: job %s in %s", cell.name, repeat, attempt, handle.job_id, handle.workdir
        )
        return handle

    def mark_running(self, handle: JobHandle) -> None:
        i = handle.identity
        self.catalog.update_attempt(i.cell_id, i.repeat, i.attempt, state="running")

    # -- environment and data ----------------------------------------------------------
    def install(self) -> dict[str, Any]:
        """Check (local) or build (cluster) the training environment; see charllm.envsetup."""
        from charllm.envsetup import ensure_environment

        return ensure_environment(self)

    def prepare_dataset(self) -> dict[str, Any]:
        from charllm.envsetup import ensure_dataset

        return ensure_dataset(self)

    # -- collection ---------------------------------------------------------------------
    def collect(self, handle: JobHandle, status: JobStatus) -> tuple[str, Path, dict[str, Any]]:
        """Copy the job's files into the results store, classify, record in the catalog."""
        verdict = judge(status)
        ident = handle.identity
        cell = self.cell(ident.cell_id)

        def classify(tmp: Path) -> tuple[str, dict[str, Any] | None, str]:
            try:
                result = read_result(tmp)
            except ResultError as err:
                if verdict.outcome == "ok":
                    return "failed", None, f"job completed but its result is invalid: {err}"
                return verdict.outcome, None, f"job ended {status.state.value} (exit {status.exit_code}): {err}"
            outcome = result["outcome"]
            if outcome == "ok" and verdict.outcome != "ok":
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
        final, manifest = commit_attempt(self.home, ident, lambda d: self.backend.fetch(handle, d), fields, classify)
        outcome = manifest["outcome"]
        self.catalog.update_attempt(
            ident.cell_id,
            ident.repeat,
            ident.attempt,
            state="ended",
            outcome=outcome,
            message=manifest.get("message") or None,
            result_dir=str(final),
        )
        return outcome, final, manifest

    def job_tail(self, handle: JobHandle, n_bytes: int = 3000) -> str:
        out, err = self.backend.tail(handle, n_bytes)
        return f"--- job {handle.job_id} stdout (tail) ---\n{out}\n--- job {handle.job_id} stderr (tail) ---\n{err}"

    def finish(self, handle: JobHandle, status: JobStatus) -> dict[str, Any]:
        """Collect a terminal job and apply the policy; raises JobFailedError if the cell failed."""
        outcome, final, manifest = self.collect(handle, status)
        summary = {
            "cell_id": handle.identity.cell_id,
            "repeat": handle.identity.repeat,
            "attempt": handle.identity.attempt,
            "outcome": outcome,
            "result_dir": str(final),
            "job_id": handle.job_id,
            "state": status.state.value,
        }
        if outcome in ("ok", "oom"):
            return summary
        raise JobFailedError(
            f"cell {manifest.get('cell_name')} attempt {handle.identity.attempt}: job {handle.job_id} ended "
            f"{status.state.value} (exit code {status.exit_code}); outcome {outcome}. {manifest.get('message') or ''}"
        )

    # -- after the sweep ---------------------------------------------------------------------
    def tables_dir(self) -> Path:
        return self.home / "tables" / self.lc.name

    def aggregate(self) -> dict[str, Any]:
        from charllm.analysis.aggregate import aggregate

        info = aggregate(self.catalog, self.lc.name, self.tables_dir(), [c.cell_id for c in self.lc.cells])
        log.info(
            "tables: %s (%d rows, %s), %s", info["cells_table"], info["rows"], info["outcomes"], info["steps_table"]
        )
        return info

    def visualize(self, run_id: str) -> list[str]:
        import pandas as pd

        from charllm.analysis.figures import draw_all

        if not (self.tables_dir() / "cells.parquet").exists():
            log.info("no tables in %s yet (aggregate has not run): no figures drawn", self.tables_dir())
            return []
        cells = pd.read_parquet(self.tables_dir() / "cells.parquet")
        steps = pd.read_parquet(self.tables_dir() / "steps.parquet")
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
        from charllm.reference import check_references, violations

        bad = violations(check_references(self.lc.campaign.references, cells))
        for c in bad:
            log.warning("reference check failed: %s", c)
        return bad

    def outcomes_of(self, planned: list[dict[str, Any]]) -> dict[str, int]:
        """Outcome counts of planned cell repeats ('missing' where no attempt ended)."""
        counts: dict[str, int] = {}
        for item in planned:
            rows = [a for a in self.catalog.attempts(cell_id=item["cell_id"]) if a.repeat == item["repeat"]]
            ended = [a for a in rows if a.outcome]
            best = "missing"
            if any(a.outcome in ("ok", "oom") for a in ended):
                best = "ok" if any(a.outcome == "ok" for a in ended) else "oom"
            elif ended:
                best = ended[-1].outcome or "missing"
            counts[best] = counts.get(best, 0) + 1
        return counts


def _safe_run(run_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run_id)


__all__ = ["OOM_EXIT_CODE", "CampaignRunner", "Verdict", "judge", "now_iso"]

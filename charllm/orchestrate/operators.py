"""Operators of a campaign DAG: the runner's lifecycle steps, turned into task states.

Every decision (re-attach or submit, what a terminal job state means, whether to resubmit)
is :class:`charllm.runner.CampaignRunner`'s, the same one ``charllm run`` makes; this module
only maps its answers onto Airflow: a wait becomes a deferral (no worker slot held), a failed
cell a failed task.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from charllm.backends.base import JobHandle, JobStatus
from charllm.errors import CharllmError, JobFailedError, TransportError
from charllm.orchestrate.triggers import JobTrigger
from charllm.outcomes import Action, SubmitKind

log = logging.getLogger(__name__)


def runner_for(campaign_file: str) -> Any:
    from charllm.runner import CampaignRunner

    return CampaignRunner.from_file(campaign_file)


def _wait_trigger(seconds: float) -> Any:
    from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

    return TimeDeltaTrigger(timedelta(seconds=max(1.0, seconds)))


class CellJobSensor(BaseSensorOperator):
    """A cell repeat's job, from submission to its end, without holding a worker slot.

    ``execute`` submits or re-attaches (:meth:`CampaignRunner.submit_or_reattach`: the job
    the ``submit`` task started, another orchestrator's job for the same cell repeat, or a new
    one) and defers to :class:`JobTrigger`. When the submission has to wait (the cluster at its
    limit of jobs in flight, sbatch refused for a submit limit, the cluster unreachable) it
    defers on a timer and tries again. When the job ends, :meth:`CampaignRunner.on_end` judges
    it: a lost job is resubmitted here (within the run's attempt budget), anything else goes
    to ``collect``. In a pool (a cluster's ``max_jobs_in_flight``), this task holds its slot
    while it waits, so the pool bounds the jobs in flight.
    """

    template_fields = ("item", "handle")
    ui_color = "#d8e7f5"

    def __init__(self, *, campaign_file: str, item: Any, handle: Any, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", timedelta(days=7).total_seconds())
        super().__init__(**kwargs)
        self.campaign_file = campaign_file
        self.item = item
        self.handle = handle

    def poke(self, context: Context) -> bool:  # pragma: no cover - never pokes, always defers
        raise AirflowException("CellJobSensor only runs deferred")

    def execute(self, context: Context) -> Any:
        if not self.handle:
            raise AirflowSkipException("dry run: nothing was submitted")
        if self.handle.get("done"):  # the submit task found a valid result
            return self.handle
        return self._submit(context, None)

    def resume(self, context: Context, event: Any = None, outage_since: float | None = None) -> Any:
        """After a timer: try the submission again."""
        return self._submit(context, outage_since)

    def _submit(self, context: Context, outage_since: float | None) -> Any:
        runner = runner_for(self.campaign_file)
        item = self.item
        try:
            sub = runner.submit_or_reattach(item["cell_id"], item["repeat"], context["run_id"], bool(item.get("force")))
        except JobFailedError as err:
            raise AirflowFailException(str(err)) from err
        except CharllmError as err:
            raise AirflowException(str(err)) from err
        if sub.kind is SubmitKind.DONE:
            return {"done": True, **(sub.result or {})}
        if sub.kind is SubmitKind.WAIT:
            if sub.transport:
                now = time.time()
                outage_since = outage_since or now
                if now - outage_since > runner.patience_s:
                    raise AirflowException(
                        f"the cluster was unreachable for {now - outage_since:.0f} s, longer than the transport "
                        f"patience ({runner.patience_s:.0f} s): {sub.reason}"
                    )
            log.info("not submitted yet: %s; trying again in %.0f s", sub.reason, sub.retry_in_s)
            self.defer(
                trigger=_wait_trigger(sub.retry_in_s),
                method_name="resume",
                kwargs={"outage_since": outage_since if sub.transport else None},
            )
        assert sub.handle is not None
        self._defer(runner, sub.handle)

    def _defer(self, runner: Any, handle: JobHandle) -> None:
        log.info(
            "waiting for job %s (cell %s, repeat %d, attempt %d) on %s; workdir %s",
            handle.job_id,
            handle.identity.cell_id,
            handle.identity.repeat,
            handle.identity.attempt,
            handle.backend,
            handle.workdir,
        )
        self.defer(trigger=job_trigger(runner, handle), method_name="execute_complete")

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        runner, h, status = ended_job(self.campaign_file, event)
        try:
            verdict = runner.on_end(h, status, context["run_id"])
        except CharllmError as err:
            raise AirflowException(str(err)) from err
        if verdict.action is Action.RESUBMIT:
            log.warning("job %s ended %s: resubmitting (%s)", h.job_id, status.state.value, verdict.reason)
            return self._submit(context, None)
        return {"handle": h.as_dict(), "status": status.as_dict()}


def ended_job(campaign_file: str, event: dict[str, Any]) -> tuple[Any, JobHandle, JobStatus]:
    """The runner, and the handle and final status a :class:`JobTrigger` event carries (its log tail logged)."""
    runner = runner_for(campaign_file)
    handle = JobHandle.from_dict(event["handle"])
    status = JobStatus.from_dict(event["status"])
    log.info("%s", runner.job_tail(handle))
    return runner, handle, status


def job_trigger(runner: Any, handle: JobHandle) -> JobTrigger:
    """The trigger that waits for ``handle``'s job on the runner's backend (polled with its other jobs)."""
    return JobTrigger(
        runner.backend.spec(),
        handle.job_id,
        runner.poll_interval_s,
        handle=handle.as_dict(),
        patience_s=runner.patience_s,
    )


def submit_cell(campaign_file: str, item: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The quick path of a cell's submission (the ``submit`` task); anything that must wait is left to ``wait``."""
    runner = runner_for(campaign_file)
    try:
        sub = runner.submit_or_reattach(item["cell_id"], item["repeat"], run_id, bool(item.get("force")))
    except JobFailedError as err:
        raise AirflowFailException(str(err)) from err
    if sub.kind is SubmitKind.DONE:
        return {"done": True, **(sub.result or {})}
    if sub.kind is SubmitKind.WAIT:
        log.info("not submitted yet: %s; the wait task will submit it", sub.reason)
        return {"pending": True, "reason": sub.reason}
    assert sub.handle is not None
    return sub.handle.as_dict()


def collect_cell(campaign_file: str, waited: dict[str, Any] | None) -> dict[str, Any]:
    """Copy a finished job's outputs into the results store, validate and record them."""
    if not waited:
        raise AirflowSkipException("dry run: nothing to collect")
    if "handle" not in waited:  # the cell had a valid result already
        return waited
    runner = runner_for(campaign_file)
    h = JobHandle.from_dict(waited["handle"])
    status = JobStatus.from_dict(waited["status"])
    try:
        summary = runner.finish(h, status)
    except JobFailedError as err:
        log.error("%s", runner.job_tail(h))
        # a failed job is not resubmitted by retrying this task: clear the cell's group to rerun it
        if not getattr(err, "retryable", True):
            raise AirflowFailException(f"{err} (not retried)") from err
        raise AirflowFailException(f"{err}; clear this cell's task group to resubmit it") from err
    except TransportError as err:
        raise AirflowException(str(err)) from err
    log.info(
        "cell %s repeat %d: %s, results in %s",
        summary["cell_id"],
        summary["repeat"],
        summary["outcome"],
        summary["result_dir"],
    )
    return summary


class EnvironmentJobSensor(BaseSensorOperator):
    """Wait (deferred) for the environment job that ``install.submit`` found or started, if any.

    When it ends, :meth:`CampaignRunner.after_setup_job` judges it (the same setup-job life
    ``charllm run`` goes through): done, a lost job's next attempt (waited for here), or a
    failure with the job's log tail.
    """

    template_fields = ("job",)
    ui_color = "#e8f0d8"

    def __init__(self, *, campaign_file: str, job: Any, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", timedelta(hours=6).total_seconds())
        super().__init__(**kwargs)
        self.campaign_file = campaign_file
        self.job = job

    def poke(self, context: Context) -> bool:  # pragma: no cover - never pokes, always defers
        raise AirflowException("EnvironmentJobSensor only runs deferred")

    def execute(self, context: Context) -> Any:
        if not self.job or self.job.get("skipped") or not self.job.get("handle"):
            log.info("nothing to wait for: %s", self.job)
            return self.job
        self._defer(runner_for(self.campaign_file), JobHandle.from_dict(self.job["handle"]))

    def _defer(self, runner: Any, handle: JobHandle) -> None:
        log.info("waiting for environment job %s in %s", handle.job_id, handle.workdir)
        self.defer(trigger=job_trigger(runner, handle), method_name="execute_complete")

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        runner, handle, status = ended_job(self.campaign_file, event)
        try:
            step = runner.after_setup_job("environment", handle, status)
        except CharllmError as err:
            raise AirflowException(str(err)) from err
        if step["action"] == Action.RESUBMIT:
            self._defer(runner, JobHandle.from_dict(step["handle"]))
        return {"job_id": handle.job_id, "state": status.state.value}

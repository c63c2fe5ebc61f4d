"""Operators of a campaign DAG. They translate charllm's outcomes into task states."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from charllm.backends.base import JobHandle, JobStatus
from charllm.errors import CharllmError, JobFailedError
from charllm.orchestrate.triggers import JobTrigger

log = logging.getLogger(__name__)


def runner_for(campaign_file: str) -> Any:
    from charllm.runner import CampaignRunner

    return CampaignRunner.from_file(campaign_file)


class CellJobSensor(BaseSensorOperator):
    """Wait for a cell's job without holding a worker slot.

    On start it re-attaches to the cell's live job (or submits one if the previous attempt
    was lost and this is a retry) and defers to :class:`JobTrigger`. When the job ends, a
    node failure, pre-emption or lost job is resubmitted (counted against this task's
    retries); any other end goes to the collect task, which applies the state policy.
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
        runner = runner_for(self.campaign_file)
        handle = JobHandle.from_dict(self.handle)
        ident = handle.identity
        done = runner.catalog.valid_result(ident.cell_id, ident.repeat)
        if done is not None and done.attempt >= ident.attempt:
            log.info("cell already has a valid result (attempt %d, %s)", done.attempt, done.outcome)
            return {
                "cell_id": ident.cell_id,
                "repeat": ident.repeat,
                "attempt": done.attempt,
                "outcome": done.outcome,
                "result_dir": done.result_dir,
            }
        try:
            handle = runner.ensure_submitted(ident.cell_id, ident.repeat, context["run_id"])
        except CharllmError as err:
            raise AirflowException(str(err)) from err
        self._defer(runner, handle)

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
        self.defer(
            trigger=JobTrigger(runner.backend.spec(), handle.job_id, runner.poll_interval_s, handle=handle.as_dict()),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        from charllm.runner import judge

        runner = runner_for(self.campaign_file)
        h = JobHandle.from_dict(event["handle"])
        status = JobStatus.from_dict(event["status"])
        log.info(
            "job %s ended %s (exit code %s) on %s", h.job_id, status.state.value, status.exit_code, status.nodes or "?"
        )
        log.info("%s", runner.job_tail(h))
        verdict = judge(status)
        if verdict.retry:
            runner.collect(h, status)  # keep the lost attempt's logs
            used = len(
                [
                    a
                    for a in runner.catalog.attempts(cell_id=h.identity.cell_id)
                    if a.repeat == h.identity.repeat and a.run_id == context["run_id"]
                ]
            )
            budget = (self.retries or 0) + 1
            if used >= budget:
                raise AirflowException(f"job {h.job_id} ended {status.state.value}; {used} attempts used, giving up")
            log.warning(
                "job %s ended %s: resubmitting (attempt %d of %d)", h.job_id, status.state.value, used + 1, budget
            )
            new = runner.ensure_submitted(h.identity.cell_id, h.identity.repeat, context["run_id"], new=True)
            self._defer(runner, new)
        return {"handle": h.as_dict(), "status": status.as_dict()}


def collect_cell(campaign_file: str, waited: dict[str, Any] | None) -> dict[str, Any]:
    """Copy a finished job's outputs into the results store, validate and record them."""
    if not waited:
        raise AirflowSkipException("dry run: nothing to collect")
    if "handle" not in waited:  # the cell had a valid result already
        return waited
    from charllm.runner import judge

    runner = runner_for(campaign_file)
    h = JobHandle.from_dict(waited["handle"])
    status = JobStatus.from_dict(waited["status"])
    try:
        summary = runner.finish(h, status)
    except JobFailedError as err:
        tail = runner.job_tail(h)
        log.error("%s", tail)
        # a failed job is not resubmitted by retrying this task: clear the cell's group to rerun it
        if judge(status).no_retry:
            raise AirflowFailException(f"{err} (not retried)") from err
        raise AirflowFailException(f"{err}; clear this cell's task group to resubmit it") from err
    log.info(
        "cell %s repeat %d: %s, results in %s",
        summary["cell_id"],
        summary["repeat"],
        summary["outcome"],
        summary["result_dir"],
    )
    return summary


class EnvironmentJobSensor(BaseSensorOperator):
    """Wait (deferred) for the environment job that ``install.submit`` started, if any."""

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
        runner = runner_for(self.campaign_file)
        handle = JobHandle.from_dict(self.job["handle"])
        log.info("waiting for environment job %s in %s", handle.job_id, handle.workdir)
        self.defer(
            trigger=JobTrigger(runner.backend.spec(), handle.job_id, runner.poll_interval_s, handle=handle.as_dict()),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        from charllm.envsetup import check_environment_job

        runner = runner_for(self.campaign_file)
        handle = JobHandle.from_dict(event["handle"])
        status = JobStatus.from_dict(event["status"])
        log.info("%s", runner.job_tail(handle))
        try:
            check_environment_job(runner, handle, status.state, status.exit_code)
        except CharllmError as err:
            raise AirflowException(str(err)) from err
        return {"job_id": handle.job_id, "state": status.state.value}

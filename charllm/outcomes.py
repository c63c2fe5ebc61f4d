"""One vocabulary for what happened to a cell attempt, shared by every layer.

The store (``manifest.json``, the job's ``result.json``), the catalog (``attempts.outcome``
and ``attempts.state``), the aggregation (``cells.parquet``), the DAG and the command line
all speak these words. They are :class:`enum.StrEnum` members, so a member *is* its string:
the values stored in catalogs and result files written before this module existed read
back unchanged, and ``Outcome.OK == "ok"``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from charllm.backends.base import JobState, JobStatus
from charllm.train import OOM_EXIT_CODE  # the job's exit code after a CUDA out-of-memory error

DEFAULT_MAX_ATTEMPTS = 3


class Outcome(enum.StrEnum):
    """How a cell attempt ended (``attempts.outcome``, ``manifest.json``, ``cells.parquet``)."""

    OK = "ok"  # measured: a valid result
    OOM = "oom"  # out of memory: an expected result of the cell, not an error
    FAILED = "failed"  # the job failed, or its outputs did not validate
    TIMEOUT = "timeout"  # the job ran out of its time limit
    CANCELLED = "cancelled"  # cancelled by a user or an administrator
    LOST = "lost"  # node failure, pre-emption, a job the scheduler forgot
    # the job did not run the cell on purpose (GPU control the cluster profile's gpu_control denies):
    # a result, never failed or retried (result.json's error says why)
    SKIPPED = "skipped"
    # reports only: a planned cell repeat for which no attempt ended
    MISSING = "missing"

    @property
    def is_result(self) -> bool:
        """The cell repeat is done: nothing to run again (unless forced)."""
        return self in RESULT_OUTCOMES

    @classmethod
    def parse(cls, value: object) -> Outcome | None:
        """An outcome from a stored string; None for anything else (None, '', unknown words)."""
        try:
            return cls(str(value)) if value else None
        except ValueError:
            return None


RESULT_OUTCOMES = frozenset({Outcome.OK, Outcome.OOM, Outcome.SKIPPED})
# what a job's own result.json may say, and what a collected attempt may be recorded as
ENDED_OUTCOMES = (
    Outcome.OK,
    Outcome.OOM,
    Outcome.SKIPPED,
    Outcome.FAILED,
    Outcome.TIMEOUT,
    Outcome.CANCELLED,
    Outcome.LOST,
)
# which attempt of a cell repeat the tables show: the best, by this order (then the newest)
PREFERENCE = {
    o: i
    for i, o in enumerate(
        (Outcome.OK, Outcome.OOM, Outcome.SKIPPED, Outcome.TIMEOUT, Outcome.FAILED, Outcome.CANCELLED, Outcome.LOST)
    )
}


class AttemptState(enum.StrEnum):
    """Where an attempt is in its life (``attempts.state``)."""

    RESERVED = "reserved"  # an attempt number and nonce are taken; the job may or may not be submitted yet
    SUBMITTED = "submitted"  # the scheduler accepted the job; its id is recorded
    RUNNING = "running"
    JOB_ENDED = "job_ended"  # the job reached a terminal state; the attempt is being judged and collected
    ENDED = "ended"  # the job ended and the attempt was collected (``outcome`` says how)


# an attempt of the cell repeat is out there: nobody submits another one (one per cell repeat)
IN_FLIGHT_STATES = (AttemptState.RESERVED, AttemptState.SUBMITTED, AttemptState.RUNNING, AttemptState.JOB_ENDED)
# ... and its job may still take a place in the cluster's queue (counted against max_jobs_in_flight)
QUEUED_STATES = (AttemptState.RESERVED, AttemptState.SUBMITTED, AttemptState.RUNNING)


class Action(enum.StrEnum):
    """What to do after a job reached a terminal state."""

    RESUBMIT = "resubmit"  # the job was lost for reasons outside it: a new attempt, within the budget
    FINISHED = "finished"  # collect it: the cell has a result (ok, oom)
    FAILED = "failed"  # collect it: the cell failed (its logs are kept)


class SubmitKind(enum.StrEnum):
    """What submit-or-reattach did for a cell repeat."""

    SUBMITTED = "submitted"  # a new job for a new (or orphaned) reservation
    ATTACHED = "attached"  # a job already in flight for this cell repeat (ours, or another orchestrator's)
    DONE = "done"  # the cell repeat has a valid result: nothing to run
    WAIT = "wait"  # not now: try again after ``retry_in_s`` (cluster at its limit, sbatch refused for a
    # submit limit, the cluster unreachable, another orchestrator is submitting this very cell)


# -- the one policy for terminal job states ------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What a terminal job state means for its cell."""

    outcome: Outcome
    action: Action
    retryable: bool = True  # a failed cell: may clearing its task group (a new attempt) help?
    reason: str = ""

    # the older boolean view (the Airflow layer's words)
    @property
    def retry(self) -> bool:
        return self.action is Action.RESUBMIT

    @property
    def fail_task(self) -> bool:
        return self.action is Action.FAILED

    @property
    def no_retry(self) -> bool:
        return self.action is Action.FAILED and not self.retryable


def judge(status: JobStatus, attempts_used: int = 1, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> Verdict:
    """The state table: a terminal job state -> outcome and what to do next.

    ========================================  =========  ==========================================
    state                                     outcome    action
    ========================================  =========  ==========================================
    COMPLETED                                 ok         finished (collect; outputs are validated)
    OUT_OF_MEMORY, FAILED with exit 42        oom        finished (a result: the cell does not fit)
    NODE_FAIL, PREEMPTED, BOOT_FAIL, LOST     lost       resubmit, until ``max_attempts`` per run
    TIMEOUT, DEADLINE                         timeout    failed, a new attempt will not help
    CANCELLED, REVOKED                        cancelled  failed, not retried (a person did it)
    anything else (FAILED, ...)               failed     failed (clear the cell to try again)
    ========================================  =========  ==========================================
    """
    st = status.state
    if st.is_success:
        return Verdict(Outcome.OK, Action.FINISHED)
    if st is JobState.OUT_OF_MEMORY or (st is JobState.FAILED and status.exit_code == OOM_EXIT_CODE):
        return Verdict(Outcome.OOM, Action.FINISHED)
    if st.is_retryable:
        if attempts_used < max_attempts:
            return Verdict(Outcome.LOST, Action.RESUBMIT, reason=f"{st.value}: attempt {attempts_used + 1}")
        return Verdict(
            Outcome.LOST, Action.FAILED, True, f"{st.value}: {attempts_used} of {max_attempts} attempts lost"
        )
    if st is JobState.TIMEOUT or st is JobState.DEADLINE:
        return Verdict(Outcome.TIMEOUT, Action.FAILED, False, "time limit")
    if st is JobState.CANCELLED or st is JobState.REVOKED:
        return Verdict(Outcome.CANCELLED, Action.FAILED, False, "cancelled")
    return Verdict(Outcome.FAILED, Action.FAILED, True, f"{st.value} (exit code {status.exit_code})")


__all__ = [
    "ENDED_OUTCOMES",
    "IN_FLIGHT_STATES",
    "PREFERENCE",
    "QUEUED_STATES",
    "RESULT_OUTCOMES",
    "Action",
    "AttemptState",
    "Outcome",
    "SubmitKind",
    "Verdict",
    "judge",
]

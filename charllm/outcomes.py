"""One vocabulary for what happened to a cell attempt, shared by every layer.

The store (``manifest.json``, the job's ``result.json``), the catalog (``attempts.outcome``
and ``attempts.state``), the aggregation (``cells.parquet``), the DAG and the command line
all speak these words. They are :class:`enum.StrEnum` members, so a member *is* its string:
the values stored in catalogs and result files written before this module existed read
back unchanged, and ``Outcome.OK == "ok"``.
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    """How a cell attempt ended (``attempts.outcome``, ``manifest.json``, ``cells.parquet``)."""

    OK = "ok"  # measured: a valid result
    OOM = "oom"  # out of memory: an expected result of the cell, not an error
    FAILED = "failed"  # the job failed, or its outputs did not validate
    TIMEOUT = "timeout"  # the job ran out of its time limit
    CANCELLED = "cancelled"  # cancelled by a user or an administrator
    LOST = "lost"  # node failure, pre-emption, a job the scheduler forgot
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


RESULT_OUTCOMES = frozenset({Outcome.OK, Outcome.OOM})
# what a job's own result.json may say, and what a collected attempt may be recorded as
ENDED_OUTCOMES = (Outcome.OK, Outcome.OOM, Outcome.FAILED, Outcome.TIMEOUT, Outcome.CANCELLED, Outcome.LOST)
# which attempt of a cell repeat the tables show: the best, by this order (then the newest)
PREFERENCE = {
    o: i
    for i, o in enumerate((Outcome.OK, Outcome.OOM, Outcome.TIMEOUT, Outcome.FAILED, Outcome.CANCELLED, Outcome.LOST))
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
]

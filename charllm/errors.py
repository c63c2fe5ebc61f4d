"""One small error tree for the whole package.

Only the Airflow layer (``charllm.orchestrate``) turns these into task outcomes.
"""

from __future__ import annotations


class CharllmError(Exception):
    """Root of every error raised on purpose by charllm."""


class ConfigError(CharllmError):
    """A campaign or cluster file is wrong. The message names the file and the field."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message
        super().__init__(f"{source}: {field}: {message}")


class TransportError(CharllmError):
    """Talking to the cluster (SSH, local subprocess) failed; usually worth a reconnect.

    ``retryable`` is False where waiting cannot help (authentication refused, a wrong host key):
    the lifecycle's transport patience gives up on those at once.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        self.retryable = retryable
        super().__init__(message)


class SubmissionError(CharllmError):
    """The scheduler refused a job (sbatch error, bad resources)."""


class SubmitLimitError(SubmissionError):
    """The scheduler refused a job for a per-user, account or QOS submit limit: wait and submit again."""


class StorageError(CharllmError):
    """Writing results here failed (disk full, permission denied); the message names the path."""


class ParseError(CharllmError):
    """Scheduler output could not be parsed; carries the raw text."""

    def __init__(self, message: str, raw: str) -> None:
        self.raw = raw
        super().__init__(f"{message}; raw output: {raw[:2000]!r}")


class JobFailedError(CharllmError):
    """A job ended in a state that fails its cell."""


class ResultError(CharllmError):
    """A job's outputs are missing or do not validate."""


class MonitorError(CharllmError):
    """Telemetry was asked for explicitly but cannot be collected."""

"""The trigger a waiting cell defers to. Runs in the triggerer; holds no worker slot."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from charllm.orchestrate.poller import BatchPoller

log = logging.getLogger(__name__)


class JobTrigger(BaseTrigger):
    """Wait until a job reaches a terminal state; report state changes on the way."""

    def __init__(
        self,
        backend_spec: dict[str, Any],
        job_id: str,
        poll_interval_s: float = 10.0,
        last_state: str | None = None,
        handle: dict[str, Any] | None = None,
        patience_s: float | None = None,
    ) -> None:
        super().__init__()
        self.backend_spec = backend_spec
        self.job_id = job_id
        self.poll_interval_s = poll_interval_s
        self.last_state = last_state
        self.handle = handle
        self.patience_s = patience_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "charllm.orchestrate.triggers.JobTrigger",
            {
                "backend_spec": self.backend_spec,
                "job_id": self.job_id,
                "poll_interval_s": self.poll_interval_s,
                "last_state": self.last_state,
                "handle": self.handle,
                "patience_s": self.patience_s,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        poller = BatchPoller.shared(self.backend_spec, self.poll_interval_s)
        last = self.last_state
        async for status in poller.watch(self.job_id, self.patience_s):
            state = status.state.value
            if state != last:
                extra = f" reason={status.reason}" if status.reason else ""
                nodes = f" nodes={status.nodes}" if status.nodes else ""
                self.log.info("job %s: %s -> %s%s%s", self.job_id, last or "submitted", state, nodes, extra)
                last = state
            if status.state.is_terminal:
                yield TriggerEvent({"job_id": self.job_id, "status": status.as_dict(), "handle": self.handle})
                return

    async def on_kill(self) -> None:
        """A user cleared the task or marked it failed/succeeded while it waited: cancel the job."""
        import asyncio

        from charllm.backends import make_backend

        backend = make_backend(self.backend_spec)
        self.log.info("task killed by a user: cancelling job %s", self.job_id)
        await asyncio.to_thread(backend.cancel, self.job_id)

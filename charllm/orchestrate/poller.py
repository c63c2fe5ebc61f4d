"""Batched status polling: one query per cluster per interval, however many jobs wait.

All triggers in one triggerer process (one asyncio loop) that watch jobs on the same
cluster (same ``Backend.poll_key``) share one :class:`BatchPoller`. Each interval it asks
the backend for the states of every watched job in a single call and hands each watcher
its own status. Connection errors are logged and retried with jittered back-off: the
controller or sshd being down for minutes is not a task failure. Only an outage longer than a
watcher's ``patience_s`` (``CHARLLM_TRANSPORT_PATIENCE_S``, 30 minutes by default) ends that
watch with :class:`TransportError`, which fails the waiting task.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from charllm.backends import make_backend
from charllm.backends.base import Backend, JobStatus
from charllm.errors import ParseError, TransportError

log = logging.getLogger(__name__)

# (poll key, id of the running loop) -> poller; a loop owns its pollers
_POLLERS: dict[tuple[str, int], BatchPoller] = {}


class BatchPoller:
    def __init__(self, backend: Backend, interval_s: float, max_backoff_s: float = 300.0) -> None:
        self.backend = backend
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self._queues: dict[str, set[asyncio.Queue[JobStatus | BaseException]]] = {}
        self._patience: dict[asyncio.Queue[JobStatus | BaseException], float] = {}
        self._task: asyncio.Task[None] | None = None
        self.polls = 0
        self.errors = 0
        self.outage_since: float | None = None

    @classmethod
    def shared(cls, backend_spec: dict[str, Any], interval_s: float) -> BatchPoller:
        backend = make_backend(backend_spec)
        key = (backend.poll_key, id(asyncio.get_running_loop()))
        poller = _POLLERS.get(key)
        if poller is None:
            poller = _POLLERS[key] = cls(backend, interval_s)
        else:
            poller.interval_s = min(poller.interval_s, interval_s)
        return poller

    async def watch(self, job_id: str, patience_s: float | None = None) -> AsyncIterator[JobStatus]:
        """Yield the job's status once per poll, until the caller stops iterating.

        Raises :class:`TransportError` when the cluster stays unreachable longer than ``patience_s``.
        """
        queue: asyncio.Queue[JobStatus | BaseException] = asyncio.Queue()
        self._queues.setdefault(job_id, set()).add(queue)
        if patience_s is not None:
            self._patience[queue] = patience_s
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._patience.pop(queue, None)
            watchers = self._queues.get(job_id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    del self._queues[job_id]

    async def _run(self) -> None:
        failures = 0
        first = True
        while self._queues:
            if not first:
                delay = self.interval_s
                if failures:
                    delay = min(self.max_backoff_s, self.interval_s * 2 ** min(failures, 8))
                    delay *= random.uniform(0.8, 1.2)
                await asyncio.sleep(delay)
            first = False
            ids = sorted(self._queues)
            if not ids:
                break
            try:
                statuses = await self.backend.astatuses(ids)
                self.polls += 1
                failures = 0
                self.outage_since = None
            except (TransportError, ParseError, OSError) as err:
                if isinstance(err, TransportError) and not err.retryable:
                    self._fail_all(err)
                    continue
                failures += 1
                self.errors += 1
                now = time.monotonic()
                self.outage_since = self.outage_since or now
                log.warning(
                    "status poll of %d job(s) failed (%s); retrying with back-off (%d in a row, %.0f s unreachable)",
                    len(ids),
                    err,
                    failures,
                    now - self.outage_since,
                )
                self._give_up_after_patience(now - self.outage_since, err)
                continue
            for job_id in ids:
                st = statuses.get(job_id)
                for q in list(self._queues.get(job_id, ())):
                    if st is not None:
                        q.put_nowait(st)
        for key, poller in list(_POLLERS.items()):
            if poller is self:
                del _POLLERS[key]

    def _give_up_after_patience(self, waited: float, err: BaseException) -> None:
        for queues in self._queues.values():
            for q in queues:
                patience = self._patience.get(q)
                if patience is not None and waited > patience:
                    q.put_nowait(
                        TransportError(
                            f"the cluster was unreachable for {waited:.0f} s, longer than the transport patience "
                            f"of {patience:.0f} s (CHARLLM_TRANSPORT_PATIENCE_S): {err}",
                            retryable=False,
                        )
                    )

    def _fail_all(self, err: BaseException) -> None:
        for queues in self._queues.values():
            for q in queues:
                q.put_nowait(err)

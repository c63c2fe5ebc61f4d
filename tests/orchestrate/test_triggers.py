"""The job trigger and the batched poller, on the real local backend."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from charllm.backends.base import JobIdentity, JobSpec, JobState
from charllm.backends.local import LocalBackend
from charllm.orchestrate import poller as poller_mod
from charllm.orchestrate.triggers import JobTrigger


def _submit(b: LocalBackend, cell: str, body: str) -> str:
    return b.submit(JobSpec(JobIdentity("c", cell, 0, 1), f"#!/bin/bash\n{body}\n")).job_id


def test_trigger_serializes_round_trip(tmp_path):
    t = JobTrigger({"kind": "local", "root": str(tmp_path)}, "local-1", 3.0, "RUNNING", handle={"job_id": "local-1"})
    path, kwargs = t.serialize()
    assert path == "charllm.orchestrate.triggers.JobTrigger"
    assert JobTrigger(**kwargs).serialize() == (path, kwargs)


def test_many_waiting_jobs_share_one_query_per_interval(tmp_path):
    backend = LocalBackend(tmp_path / "w", slots=64)
    ids = [_submit(backend, f"cell{i}", "sleep 1.5") for i in range(20)]
    spec = backend.spec()

    async def main() -> list[dict]:
        triggers = [JobTrigger(spec, j, poll_interval_s=0.5) for j in ids]

        async def first_event(t: JobTrigger) -> dict:
            async for ev in t.run():
                return ev.payload
            raise AssertionError("no event")

        return await asyncio.gather(*(first_event(t) for t in triggers))

    # keep a handle on the shared poller to read its counters after the loop ends
    created = []
    orig = poller_mod.BatchPoller.__init__

    def spy(self, *a, **kw):
        orig(self, *a, **kw)
        created.append(self)

    poller_mod.BatchPoller.__init__ = spy  # type: ignore[method-assign]
    try:
        t0 = time.monotonic()
        events = asyncio.run(main())
        wall = time.monotonic() - t0
    finally:
        poller_mod.BatchPoller.__init__ = orig  # type: ignore[method-assign]
    assert len(created) == 1, "all triggers of one cluster must share one poller"
    assert {e["status"]["state"] for e in events} == {"COMPLETED"}
    # one status query per interval for all 20 jobs, not 20 per interval
    polls = created[0].polls
    assert created[0].backend.query_count == polls
    assert polls <= wall / 0.5 + 2


def test_on_kill_cancels_the_job(tmp_path):
    backend = LocalBackend(tmp_path / "w")
    job = _submit(backend, "cell", "sleep 60")
    deadline = time.monotonic() + 10
    while backend.statuses([job])[job].state is not JobState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    asyncio.run(JobTrigger(backend.spec(), job, 1.0).on_kill())
    deadline = time.monotonic() + 10
    while not backend.statuses([job])[job].state.is_terminal:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert backend.statuses([job])[job].state is JobState.CANCELLED
    assert "sleep 60" in Path(backend.root, "c", "cell", "r0", "a1", "job.sbatch").read_text()


class _Flaky(LocalBackend):
    """A backend whose status queries fail while ``down`` is set (the cluster unreachable)."""

    down = True

    async def astatuses(self, job_ids):  # type: ignore[override]
        from charllm.errors import TransportError

        if _Flaky.down:
            raise TransportError("ssh: connection refused")
        return await super().astatuses(job_ids)


def test_an_outage_is_waited_out_within_the_patience_and_fails_the_wait_after_it(tmp_path, monkeypatch):
    from charllm.errors import TransportError

    backend = _Flaky(tmp_path / "w")
    job = _submit(backend, "cell", "true")
    monkeypatch.setattr(poller_mod, "make_backend", lambda spec: _Flaky(spec["root"]))

    async def first(patience_s: float, up_after_s: float | None) -> dict:
        _Flaky.down = True
        if up_after_s is not None:
            asyncio.get_running_loop().call_later(up_after_s, lambda: setattr(_Flaky, "down", False))
        async for ev in JobTrigger(backend.spec(), job, 0.05, patience_s=patience_s).run():
            return ev.payload
        raise AssertionError("no event")

    # the cluster comes back after ~1 s: the wait goes on and sees the job's end
    assert asyncio.run(first(30.0, 1.0))["status"]["state"] == "COMPLETED"
    # it does not: the wait fails once the outage is longer than the patience
    t0 = time.monotonic()
    try:
        asyncio.run(first(1.0, None))
    except TransportError as err:
        assert "longer than the transport patience" in str(err)
    else:
        raise AssertionError("the wait did not give up")
    assert 1.0 <= time.monotonic() - t0 < 10

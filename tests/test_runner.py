"""A cell's life without Airflow: submission is idempotent, failures stay in their own cell."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from charllm.backends.base import JobIdentity, JobSpec, JobState, JobStatus
from charllm.catalog import Catalog
from charllm.errors import JobFailedError
from charllm.runner import CampaignRunner, judge

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("state", "exit_code", "outcome", "retry", "fail", "no_retry"),
    [
        (JobState.COMPLETED, 0, "ok", False, False, False),
        (JobState.OUT_OF_MEMORY, 0, "oom", False, False, False),
        (JobState.FAILED, 42, "oom", False, False, False),
        (JobState.FAILED, 1, "failed", False, True, False),
        (JobState.TIMEOUT, 0, "timeout", False, True, True),
        (JobState.CANCELLED, 0, "cancelled", False, True, True),
        (JobState.NODE_FAIL, 0, "lost", True, False, False),
        (JobState.PREEMPTED, 0, "lost", True, False, False),
        (JobState.BOOT_FAIL, 0, "lost", True, False, False),
        (JobState.LOST, None, "lost", True, False, False),
    ],
)
def test_state_policy(state, exit_code, outcome, retry, fail, no_retry):
    v = judge(JobStatus("1", state, exit_code))
    assert (v.outcome, v.retry, v.fail_task, v.no_retry) == (outcome, retry, fail, no_retry)


def _wait(runner: CampaignRunner, job_id: str) -> JobStatus:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = runner.backend.statuses([job_id])[job_id]
        if st.state.is_terminal:
            return st
        time.sleep(0.2)
    raise AssertionError("job did not end")


def test_failed_cell_keeps_other_cells_results(charllm_home):
    runner = CampaignRunner.from_file(REPO / "include/campaigns/demo.yaml", catalog=Catalog())
    items = runner.plan("tiny-tp1pp1dp1-mb*-00000")
    assert len(items) == 2
    good, bad = items
    # the good cell trains for real
    h_good = runner.submit_or_reattach(good["cell_id"], 0, "r1").handle
    # the bad cell: its attempt is reserved by the runner, but the script crashes
    attempt = runner.catalog.new_attempt(bad["cell_id"], 0, "demo", "local", "r1")
    ident = JobIdentity("demo", bad["cell_id"], 0, attempt)
    h_bad = runner.backend.submit(JobSpec(ident, "#!/bin/bash\necho 'Traceback: boom' >&2\nexit 3\n"))
    runner.catalog.update_attempt(bad["cell_id"], 0, attempt, state="submitted", job_id=h_bad.job_id)

    st_bad = _wait(runner, h_bad.job_id)
    with pytest.raises(JobFailedError, match="FAILED"):
        runner.finish(h_bad, st_bad)
    assert "boom" in runner.job_tail(h_bad)
    summary = runner.finish(h_good, _wait(runner, h_good.job_id))
    assert summary["outcome"] == "ok"

    info = runner.aggregate()
    import pandas as pd

    cells = pd.read_parquet(info["cells_table"]).set_index("cell_id")
    assert cells.loc[good["cell_id"], "outcome"] == "ok"
    assert cells.loc[bad["cell_id"], "outcome"] == "failed"
    assert cells.loc[good["cell_id"], "tokens_per_s"] > 0
    # the failed attempt's logs are kept in the store
    failed_dir = Path(runner.catalog.attempts(cell_id=bad["cell_id"])[0].result_dir)
    assert "boom" in (failed_dir / "stderr.log").read_text()

    # a new plan skips the done cell and offers the failed one again; a resubmission is attempt 2
    again = runner.plan("tiny-tp1pp1dp1-mb*-00000")
    assert [i["cell_id"] for i in again] == [bad["cell_id"]]

    # a nightly re-run appends new repeats after the highest one each cell has, done or not
    nightly = runner.plan("tiny-tp1pp1dp1-mb*-00000", repeats=2, append=True)
    assert sorted((i["cell_id"], i["repeat"]) for i in nightly) == sorted(
        (c, r) for c in (good["cell_id"], bad["cell_id"]) for r in (1, 2)
    )
    h_night = runner.submit_or_reattach(good["cell_id"], 1, "nightly").handle
    assert runner.finish(h_night, _wait(runner, h_night.job_id))["outcome"] == "ok"
    cells = pd.read_parquet(runner.aggregate()["cells_table"])
    assert sorted(cells.loc[cells["cell_id"] == good["cell_id"], "repeat"]) == [0, 1]  # both nights kept
    assert [i["repeat"] for i in runner.plan(good["cell_id"], append=True)] == [2]


def test_submit_or_reattach_reattaches_and_never_duplicates(charllm_home):
    import socket

    runner = CampaignRunner.from_file(REPO / "include/campaigns/demo.yaml", catalog=Catalog())
    [item] = runner.plan("tiny-tp1pp1dp1-mb4-gb8-s64-00000")
    h1 = runner.submit_or_reattach(item["cell_id"], 0, "r1").handle
    # a retried submit task, a restarted orchestrator: a fresh runner finds the same job
    other = CampaignRunner.from_file(REPO / "include/campaigns/demo.yaml", catalog=Catalog())
    h2 = other.submit_or_reattach(item["cell_id"], 0, "r1").handle
    assert h1.job_id == h2.job_id
    # a crash between reserving the attempt and recording the job id (its owner is gone): the
    # attempt is taken over and the backend's find() sees the job sbatch had started
    dead = f"{socket.gethostname()}:1:not-its-start-time"
    runner.catalog.update_attempt(item["cell_id"], 0, h1.identity.attempt, state="reserved", job_id=None, owner=dead)
    h3 = other.submit_or_reattach(item["cell_id"], 0, "r1").handle
    assert h3.job_id == h1.job_id
    assert len(list((charllm_home / "work" / ".jobs").iterdir())) == 1
    runner.finish(h1, _wait(runner, h1.job_id))
    assert runner.plan("tiny-tp1pp1dp1-mb4-gb8-s64-00000") == []
    assert len(runner.plan("tiny-tp1pp1dp1-mb4-gb8-s64-00000", force=True)) == 1


# -- the lifecycle's own rules ------------------------------------------------------------


def test_attempt_budget_turns_lost_jobs_into_a_failed_cell():
    from charllm.outcomes import Action

    lost = JobStatus("1", JobState.NODE_FAIL, 0)
    assert [judge(lost, used, 3).action for used in (1, 2, 3)] == [Action.RESUBMIT, Action.RESUBMIT, Action.FAILED]
    assert judge(lost, 3, 3).outcome == "lost" and judge(lost, 3, 3).retryable


def test_patience_waits_out_an_outage_and_gives_up_after_it(monkeypatch):
    from charllm.errors import TransportError
    from charllm.runner import Patience

    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    calls = []

    def flaky() -> str:
        calls.append(now[0])
        if now[0] < 100:
            raise TransportError("connection refused")
        return "ok"

    p = Patience(300, sleep=sleep, clock=lambda: now[0])
    assert p.call(flaky, "polling") == "ok"
    assert len(slept) >= 3 and max(slept) <= 75 and len(set(slept)) > 1  # bounded, jittered
    with pytest.raises(TransportError, match="longer than the transport patience of 300 s"):
        Patience(300, sleep=sleep, clock=lambda: now[0]).call(
            lambda: (_ for _ in ()).throw(TransportError("down")), "collecting"
        )
    # a refusal that waiting cannot fix is raised at once
    hard = TransportError("bad host key", retryable=False)
    before = len(slept)
    with pytest.raises(TransportError, match="bad host key"):
        p.call(lambda: (_ for _ in ()).throw(hard), "x")
    assert len(slept) == before


def test_a_cell_in_flight_elsewhere_is_attached_to_never_submitted_again(charllm_home, monkeypatch):
    """A second orchestrator (another owner) attaches to the first one's job; a fresh reservation it waits for."""
    from charllm.outcomes import SubmitKind

    dag = CampaignRunner.from_file(REPO / "include/campaigns/demo.yaml", catalog=Catalog(), owner="host:1:1")
    cli = CampaignRunner.from_file(REPO / "include/campaigns/demo.yaml", catalog=Catalog(), owner="otherhost:2:2")
    [item] = dag.plan("tiny-tp1pp1dp1-mb4-gb8-s64-00000")
    first = dag.submit_or_reattach(item["cell_id"], 0, "dag-run")
    assert first.kind is SubmitKind.SUBMITTED
    second = cli.submit_or_reattach(item["cell_id"], 0, "cli-run")
    assert second.kind is SubmitKind.ATTACHED and second.handle.job_id == first.handle.job_id
    # a reservation still being submitted by a live owner elsewhere: wait, do not submit
    [other] = dag.plan("tiny-tp1pp1dp1-mb2-gb8-s64-00000")
    dag.catalog.reserve(other["cell_id"], 0, campaign="demo", backend="local", run_id="dag-run", owner="otherhost:3:3")
    waiting = dag.submit_or_reattach(other["cell_id"], 0, "dag-run")
    assert waiting.kind is SubmitKind.WAIT and "being submitted" in waiting.reason
    # ... until its lease runs out: then it is taken over and submitted once
    monkeypatch.setenv("CHARLLM_RESERVATION_LEASE_S", "0")
    taken = dag.submit_or_reattach(other["cell_id"], 0, "dag-run")
    assert taken.kind is SubmitKind.SUBMITTED and taken.handle.identity.attempt == 1
    assert len(list((charllm_home / "work" / ".jobs").iterdir())) == 2
    dag.backend.cancel(taken.handle.job_id)
    dag.finish(first.handle, _wait(dag, first.handle.job_id))
    done = cli.submit_or_reattach(item["cell_id"], 0, "cli-run")
    assert done.kind is SubmitKind.DONE and done.result["outcome"] == "ok"


def test_job_names_and_folders_carry_the_nonce():
    i = JobIdentity("demo", "abc123", 0, 2, "d00df00d")
    assert i.job_name == "charllm.demo.abc123.r0.a2-d00df00d" and i.relpath == "demo/abc123/r0/a2-d00df00d"
    assert JobIdentity.from_job_name(i.job_name) == i
    old = JobIdentity("demo", "abc123", 0, 2)  # jobs submitted before nonces existed keep their names
    assert old.job_name == "charllm.demo.abc123.r0.a2" and JobIdentity.from_job_name(old.job_name) == old
    assert "nonce" not in old.as_dict() and i.as_dict()["nonce"] == "d00df00d"


def test_collect_waits_out_an_outage_and_the_log_tail_is_best_effort(charllm_home, monkeypatch):
    """The cluster unreachable while a finished job's files are fetched: collect waits, then records once."""
    from charllm.backends.local import LocalBackend
    from charllm.errors import TransportError

    class Unreachable(LocalBackend):
        outage = 3  # the next fetches that fail

        def fetch(self, handle, dest):
            if Unreachable.outage:
                Unreachable.outage -= 1
                raise TransportError("ssh: connection refused")
            return super().fetch(handle, dest)

        def tail(self, handle, n_bytes=4000, tries=None):
            raise TransportError("ssh: connection refused")

    monkeypatch.setenv("CHARLLM_TRANSPORT_PATIENCE_S", "60")
    slept: list[float] = []
    lc_runner = CampaignRunner.from_file(REPO / "include/campaigns/demo.yaml", catalog=Catalog())
    runner = CampaignRunner(
        lc_runner.lc,
        catalog=lc_runner.catalog,
        backend=Unreachable(charllm_home / "work"),
        sleep=slept.append,
    )
    [item] = runner.plan("tiny-tp1pp1dp1-mb4-gb8-s64-00000")
    h = runner.submit_or_reattach(item["cell_id"], 0, "run").handle
    st = _wait(runner, h.job_id)
    assert "log tail not available" in runner.job_tail(h)
    summary = runner.finish(h, st)
    assert summary["outcome"] == "ok" and len(slept) == 3 and max(slept) <= 15
    [row] = runner.catalog.attempts(cell_id=item["cell_id"])
    assert row.state == "ended" and row.outcome == "ok"


def test_verdict_judges_the_attempts_of_its_own_run(tmp_path):
    """A forced re-run whose job failed fails its run, though an older run's attempt was ok."""
    runner = CampaignRunner.from_file(
        REPO / "include/campaigns/demo.yaml", home=tmp_path, catalog=Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    )
    runner.register()
    cell = runner.lc.cells[0]
    planned = [{"cell_id": cell.cell_id, "repeat": 0, "name": cell.name}]
    cat = runner.catalog

    def attempt(run_id: str, outcome: str) -> None:
        n = cat.new_attempt(cell.cell_id, 0, runner.lc.name, "local", run_id)
        cat.update_attempt(cell.cell_id, 0, n, state="ended", outcome=outcome)

    assert runner.outcomes_of(planned, "night-1") == {"missing": 1}
    attempt("night-1", "ok")
    attempt("forced-2", "lost")  # lost, resubmitted by the same run ...
    attempt("forced-2", "failed")  # ... and failed
    assert runner.outcomes_of(planned, "night-1") == {"ok": 1}
    assert runner.outcomes_of(planned, "forced-2") == {"failed": 1}
    # a run that made no attempt of its own (it re-attached to another run's job): the latest one
    assert runner.outcomes_of(planned, "adopting-3") == {"failed": 1}
    attempt("forced-2", "ok")  # the cell cleared and run again in the same run
    assert runner.outcomes_of(planned, "forced-2") == {"ok": 1}

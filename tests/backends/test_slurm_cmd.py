"""Slurm command builders and parsers, without SSH or Slurm.

Builders are proved safe by running their command lines in a local ``bash -c`` where
``sbatch``/``sacct``/``squeue`` are shell functions that record their arguments.
Parsers are tested on literal ``sacct --parsable2`` / ``squeue`` text.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from charllm.backends import slurm_cmd as c
from charllm.backends.base import JobIdentity, JobState
from charllm.errors import ConfigError, ParseError, SubmissionError, TransportError
from charllm.shell import q

BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash is needed to run the built command lines")

HOSTILE = 'it\'s a "test"; rm -rf ~ $(touch PWNED) `touch PWNED2` & \\ *'
IDENT = JobIdentity("demo", "gpt3-tp2pp16", 0, 1)
NAME = IDENT.job_name


def run_bash(line: str, cwd: Path, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """Run a built command line as the remote login shell would (``$SHELL -c``)."""
    return subprocess.run(
        [BASH or "bash", "-c", prelude + "\n" + line],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)},
    )


# stand-ins: record each call's argv (one word per line, NUL-separated calls) and print canned text
def stand_ins(sacct_out: str = "", squeue_out: str = "", sacct_rc: int = 0, squeue_rc: int = 0) -> str:
    return f"""
timeout() {{ shift; "$@"; }}
sbatch() {{ printf '%s\\n' "$@" > sbatch.args; echo 4242; }}
sacct() {{ printf '%s\\n' "$@" > sacct.args; printf '%s' {q(sacct_out)}; return {sacct_rc}; }}
squeue() {{ printf '%s\\n' "$@" > squeue.args; printf '%s' {q(squeue_out)}; return {squeue_rc}; }}
scancel() {{ printf '%s\\n' "$@" > scancel.args; }}
"""


# -- quoting: hostile values survive as data ------------------------------------------------


def test_sbatch_command_keeps_hostile_names_as_data(tmp_path: Path) -> None:
    ident = JobIdentity(HOSTILE, "cell 1", 0, 2)
    directory = c.job_dir(f"work dir/{HOSTILE}", ident)
    (tmp_path / directory).mkdir(parents=True)
    line = c.build_sbatch(directory, ident, partition="debug", extra_args=["--mem=1", "--comment2=a b"])
    res = run_bash(line, tmp_path, stand_ins())
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "4242"
    job = tmp_path / directory
    assert (job / "jobid").read_text() == "4242\n"
    args = (job / "sbatch.args").read_text().splitlines()
    assert args == [
        "--parsable",
        f"--job-name={ident.job_name}",
        f"--comment={c.identity_comment(ident)}",
        "--output=stdout.log",
        "--error=stderr.log",
        "--partition=debug",
        "--mem=1",
        "--comment2=a b",
        "job.sbatch",
    ]
    assert not list(tmp_path.rglob("PWNED*"))


def test_find_and_mkdir_commands_keep_hostile_paths_as_data(tmp_path: Path) -> None:
    ident = JobIdentity(HOSTILE, "c", 3, 0)
    directory = c.job_dir(HOSTILE, ident)
    res = run_bash(c.build_mkdir(directory, directory + "/sub dir"), tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / directory / "sub dir").is_dir()
    (tmp_path / directory / "jobid").write_text("77\n")
    res = run_bash(c.build_find(directory, ident.job_name, 7), tmp_path, stand_ins())
    assert res.returncode == 0, res.stderr
    found = c.parse_find(res.stdout, res.stderr, ident.job_name)
    assert found.jobid_file == "77"
    assert (tmp_path / "squeue.args").read_text().splitlines() == [
        "--me",
        "--noheader",
        "--states=all",
        f"--name={ident.job_name}",
        f"--format={c.SQUEUE_FORMAT}",
    ]
    assert f"--name={ident.job_name}" in (tmp_path / "sacct.args").read_text().splitlines()
    assert not list(tmp_path.rglob("PWNED*"))


def test_tail_command_quotes_path(tmp_path: Path) -> None:
    (tmp_path / HOSTILE).mkdir()
    (tmp_path / HOSTILE / "stdout.log").write_text("0123456789")
    res = run_bash(c.build_tail(f"{HOSTILE}/stdout.log", 4), tmp_path)
    assert res.stdout == "6789"


@pytest.mark.parametrize("bad", ["1; rm -rf ~", "", "12 13", "$(id)", "12.batch", "-1", "12_", "12_[1-3]"])
def test_job_ids_are_checked_not_quoted(bad: str) -> None:
    with pytest.raises(SubmissionError):
        c.build_cancel(bad)
    with pytest.raises(SubmissionError):
        c.build_status(["1", bad])


@pytest.mark.parametrize("good", ["1", "123456", "123_4", "123+0"])
def test_job_ids_accepted(good: str) -> None:
    assert c.build_cancel(good) == f"scancel {good}"


@pytest.mark.parametrize(
    ("campaign", "cell"),
    [("a/b", "c"), ("a", "c,d"), ("a", "c\nd"), ("..", "c"), ("", "c"), ("a", ".")],
)
def test_identity_rejected_when_slurm_or_paths_would_split_it(campaign: str, cell: str) -> None:
    with pytest.raises(ConfigError):
        c.job_dir("w", JobIdentity(campaign, cell, 0, 0))


def test_workdir_forms() -> None:
    assert c.normalize_workdir("charllm-work") == "charllm-work"
    assert c.normalize_workdir("~/charllm-work/") == "charllm-work"
    assert c.normalize_workdir("/scratch/x/../y") == "/scratch/y"
    assert c.normalize_workdir("~") == "."
    with pytest.raises(ConfigError):
        c.normalize_workdir("~bob/x")
    with pytest.raises(ConfigError):
        c.normalize_workdir("")


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "", "job.sbatch", "jobid", "a//b"])
def test_staged_file_names(bad: str) -> None:
    with pytest.raises(ConfigError):
        c.check_file_name(bad)
    assert c.check_file_name("cell.json") == "cell.json"
    assert c.check_file_name("conf/model.yaml") == "conf/model.yaml"


# -- the status command: one round trip, squeue only when needed ----------------------------

ROW = "{id}|{raw}|{state}|{exit}|00:00:05|node1|None|2026-11-22T03:00:00|2026-11-22T03:00:01|2026-11-22T03:00:06|{name}"


def row(job_id: str, state: str, exit_code: str = "0:0", raw: str | None = None, name: str = NAME) -> str:
    return ROW.format(id=job_id, raw=raw or job_id, state=state, exit=exit_code, name=name)


def run_status(tmp_path: Path, ids: list[str], sacct_out: str, squeue_out: str = "", **rcs: int):  # type: ignore[no-untyped-def]
    res = run_bash(c.build_status(ids), tmp_path, stand_ins(sacct_out, squeue_out, **rcs))
    return c.parse_status(res.stdout, res.stderr, ids), tmp_path / "squeue.args"


def test_status_all_finished_is_one_sacct_and_no_squeue(tmp_path: Path) -> None:
    out = "\n".join([row("11", "COMPLETED"), row("12", "FAILED", "1:0")]) + "\n"
    res, squeue_args = run_status(tmp_path, ["11", "12"], out)
    assert not squeue_args.exists()
    assert (res.sacct_ran, res.squeue_ran, res.query_count) == (True, False, 1)
    assert res.statuses["11"].state is JobState.COMPLETED and res.statuses["11"].exit_code == 0
    assert res.statuses["12"].state is JobState.FAILED and res.statuses["12"].exit_code == 1
    assert (tmp_path / "sacct.args").read_text().splitlines()[:5] == [
        "--parsable2",
        "--noheader",
        "-X",
        "-j",
        "11,12",
    ]


def test_status_pending_asks_squeue_for_the_reason(tmp_path: Path) -> None:
    out = row("11", "RUNNING") + "\n" + row("12", "PENDING") + "\n"
    sq = f"12|12|PENDING|Resources|||{NAME}\n"
    res, squeue_args = run_status(tmp_path, ["11", "12"], out, sq)
    assert squeue_args.read_text().splitlines()[:4] == ["--noheader", "--states=all", "-j", "11,12"]
    assert res.query_count == 2
    assert res.statuses["12"].state is JobState.PENDING and res.statuses["12"].reason == "Resources"
    assert res.statuses["11"].state is JobState.RUNNING


def test_status_node_fail_that_slurm_requeued_is_not_terminal(tmp_path: Path) -> None:
    # slurmdbd still shows NODE_FAIL; slurmctld already requeued the job under the same id
    out = row("11", "NODE_FAIL") + "\n"
    sq = f"11|11|PENDING|BeginTime|||{NAME}\n"
    res, squeue_args = run_status(tmp_path, ["11"], out, sq)
    assert squeue_args.exists()
    assert res.statuses["11"].state is JobState.PENDING and res.statuses["11"].reason == "BeginTime"
    # not requeued (the controller forgot it or says NODE_FAIL too): NODE_FAIL stands
    res, _ = run_status(tmp_path, ["11"], out, "")
    assert res.statuses["11"].state is JobState.NODE_FAIL


def test_status_ended_in_slurmctld_before_slurmdbd_has_no_exit_code_yet(tmp_path: Path) -> None:
    # a job that dies at once: slurmdbd still says PENDING (0:0), slurmctld already FAILED
    out = row("11", "PENDING") + "\n"
    sq = f"11|11|FAILED|NonZeroExitCode|node1|0:00|{NAME}\n"
    res, _ = run_status(tmp_path, ["11"], out, sq)
    st = res.statuses["11"]
    assert st.state is JobState.FAILED and st.exit_code is None and st.signal is None


def test_status_id_unknown_to_sacct_falls_back_to_squeue(tmp_path: Path) -> None:
    out = row("11", "COMPLETED") + "\n"
    sq = f"13|13|RUNNING|None|node1|0:07|{NAME}\n"
    res, squeue_args = run_status(tmp_path, ["11", "13", "14"], out, sq)
    assert squeue_args.exists()
    assert res.statuses["13"].state is JobState.RUNNING and res.statuses["13"].elapsed_s == 7.0
    assert res.statuses["14"].state is JobState.LOST  # neither slurmdbd nor slurmctld knows it
    assert res.statuses["11"].state is JobState.COMPLETED


def test_status_id_prefix_is_not_a_match(tmp_path: Path) -> None:
    # "1" must not be satisfied by rows of 11 or 10_1 (the remote check and the parser agree)
    out = row("11", "COMPLETED") + "\n" + row("10_1", "COMPLETED", raw="12") + "\n"
    res, squeue_args = run_status(tmp_path, ["1", "11"], out, "")
    assert squeue_args.exists()
    assert res.statuses["1"].state is JobState.LOST


def test_status_sacct_down_uses_squeue_and_says_unknown_not_lost(tmp_path: Path) -> None:
    sq = f"13|13|RUNNING|None|node1|1:02:03|{NAME}\n"
    res, _ = run_status(tmp_path, ["13", "14"], "", sq, sacct_rc=1)
    assert res.statuses["13"].state is JobState.RUNNING and res.statuses["13"].elapsed_s == 3723.0
    assert res.statuses["14"].state is JobState.UNKNOWN
    assert res.errors


def test_status_controller_down_keeps_final_sacct_answers_only(tmp_path: Path) -> None:
    out = row("11", "PENDING") + "\n" + row("12", "COMPLETED") + "\n" + row("13", "RUNNING") + "\n"
    res, _ = run_status(tmp_path, ["11", "12", "13", "15"], out, "", squeue_rc=1)
    # slurmdbd's PENDING/RUNNING may be stale (it missed the start or the end): unknown
    assert res.statuses["11"].state is JobState.UNKNOWN and "PENDING" in res.statuses["11"].reason
    assert res.statuses["13"].state is JobState.UNKNOWN
    assert res.statuses["12"].state is JobState.COMPLETED  # final rows stand
    assert res.statuses["15"].state is JobState.UNKNOWN  # could be LOST, but squeue did not answer


def test_status_both_down_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError):
        run_status(tmp_path, ["11"], "", "", sacct_rc=1, squeue_rc=1)


def test_status_squeue_invalid_id_is_an_answer() -> None:
    stdout = f"{c.MARK}sacct\n\n{c.MARK}sacct rc=0\n{c.MARK}squeue\n{c.MARK}squeue rc=1\n"
    res = c.parse_status(stdout, "slurm_load_jobs error: Invalid job id specified\n", ["99"])
    assert res.statuses["99"].state is JobState.LOST


def test_status_output_with_login_noise_is_a_parse_error() -> None:
    stdout = f"Welcome to the cluster!\n{c.MARK}sacct\n{c.MARK}sacct rc=0\n"
    with pytest.raises(ParseError) as exc:
        c.parse_status(stdout, "", ["1"])
    assert "Welcome" in exc.value.raw


def test_status_without_markers_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        c.parse_status("", "bash: sacct: command not found", ["1"])


# -- sacct parsing on literal text ----------------------------------------------------------

SACCT_TEXT = """\
101|101|COMPLETED|0:0|00:01:05|gpu-01|None|2026-11-22T03:00:00|2026-11-22T03:00:01|2026-11-22T03:01:06|charllm.demo.a.r0.a0
102|102|FAILED|1:0|00:00:02|gpu-01|NonZeroExitCode|2026-11-22T03:00:00|2026-11-22T03:00:01|2026-11-22T03:00:03|charllm.demo.b.r0.a0
103|103|CANCELLED by 1000|0:15|00:00:09|gpu-02|None|2026-11-22T03:00:00|2026-11-22T03:00:01|2026-11-22T03:00:10|charllm.demo.c.r0.a0
104|104|OUT_OF_ME+|0:125|1-02:03:04|gpu-02|OutOfMemory|2026-11-22T03:00:00|2026-11-22T03:00:01|2026-11-23T05:03:05|charllm.demo.d.r0.a0
105|105|TIMEOUT|0:0|00:30:00|gpu-03|TimeLimit|2026-11-22T03:00:00|2026-11-22T03:00:01|2026-11-22T03:30:01|charllm.demo.e.r0.a0
106|106|PENDING|0:0|00:00:00|None assigned|Resources|2026-11-22T03:00:00|Unknown|Unknown|charllm.demo.f.r0.a0
107|107|NODE_FAIL|0:0|00:00:40|gpu-04|NodeDown|2026-11-22T03:00:00|2026-11-22T03:00:01|2026-11-22T03:00:41|charllm.demo.g.r0.a0
107|107|REQUEUED|0:0|00:00:00|None assigned|BeginTime|2026-11-22T03:00:42|Unknown|Unknown|charllm.demo.g.r0.a0
107|107|RUNNING|0:0|00:00:12|gpu-01|None|2026-11-22T03:01:42|2026-11-22T03:01:43|Unknown|charllm.demo.g.r0.a0
108|108|FAILED|0:9|00:00:03|gpu-01|None|2026-11-22T03:00:00|2026-11-22T03:00:01|2026-11-22T03:00:04|name|with|pipes
110_1|111|COMPLETED|0:0|00:00:05|gpu-01|None|2026-11-22T03:00:00|2026-11-22T03:00:01|2026-11-22T03:00:06|arr
110_2|110|FAILED|2:0|00:00:05|gpu-01|None|2026-11-22T03:00:00|2026-11-22T03:00:01|2026-11-22T03:00:06|arr
120+0|120|RUNNING|0:0|00:00:05|gpu-01|None|2026-11-22T03:00:00|2026-11-22T03:00:01|Unknown|het
120+1|121|PENDING|0:0|00:00:00|None assigned|Resources|2026-11-22T03:00:00|Unknown|Unknown|het
130_[1-4%2]|130|PENDING|0:0|00:00:00|None assigned|JobArrayTaskLimit|2026-11-22T03:00:00|Unknown|Unknown|arr2
"""


def status(job_id: str, text: str = SACCT_TEXT):  # type: ignore[no-untyped-def]
    st = c.sacct_status(job_id, c.parse_sacct(text))
    assert st is not None
    return st


def test_sacct_completed_and_failed_exit_codes() -> None:
    assert (status("101").state, status("101").exit_code, status("101").signal) == (JobState.COMPLETED, 0, 0)
    assert status("101").elapsed_s == 65.0 and status("101").nodes == "gpu-01"
    st = status("102")
    assert (st.state, st.exit_code, st.signal, st.reason) == (JobState.FAILED, 1, 0, "NonZeroExitCode")
    st = status("108")
    assert (st.state, st.exit_code, st.signal) == (JobState.FAILED, 0, 9)


def test_sacct_cancelled_by_uid_and_truncated_oom() -> None:
    st = status("103")
    assert st.state is JobState.CANCELLED and st.signal == 15
    assert not st.state.is_retryable
    st = status("104")
    assert st.state is JobState.OUT_OF_MEMORY and st.elapsed_s == 93784.0
    assert st.state.is_terminal and not st.state.is_retryable  # OOM is an answer, not a retry


def test_sacct_pending_has_no_nodes() -> None:
    st = status("106")
    assert st.state is JobState.PENDING and st.nodes == "" and st.reason == "Resources"


def test_sacct_requeued_job_several_rows_latest_wins() -> None:
    st = status("107")
    assert st.state is JobState.RUNNING and st.nodes == "gpu-01"
    # the same rows in another order: Submit decides, not position
    lines = [ln for ln in SACCT_TEXT.splitlines() if ln.startswith("107|")]
    shuffled = "\n".join([lines[2], lines[0], lines[1]])
    assert status("107", shuffled).state is JobState.RUNNING

    # without a usable Submit, the last row wins
    def no_submit(line: str) -> str:
        parts = line.split("|")
        parts[7] = "Unknown"
        return "|".join(parts)

    assert status("107", "\n".join(no_submit(ln) for ln in lines)).state is JobState.RUNNING
    assert status("107", "\n".join(no_submit(ln) for ln in lines[:2])).state is JobState.REQUEUED


def test_sacct_job_name_with_pipes_stays_in_the_last_column() -> None:
    rows = [r for r in c.parse_sacct(SACCT_TEXT) if r.job_id == "108"]
    assert rows[0].name == "name|with|pipes"


def test_sacct_array_and_het_jobs() -> None:
    # the array as a whole: one task failed, all ended -> FAILED with that task's code
    st = status("110")
    assert (st.state, st.exit_code) == (JobState.FAILED, 2)
    assert status("110_1").state is JobState.COMPLETED
    assert status("110_2").exit_code == 2
    # het job: one component running -> RUNNING
    assert status("120").state is JobState.RUNNING
    assert status("120+1").state is JobState.PENDING
    assert status("130").state is JobState.PENDING
    # an array task asked for by its raw id
    assert status("111").state is JobState.COMPLETED


def test_sacct_steps_are_ignored_without_x() -> None:
    text = """\
201|201|FAILED|3:0|00:00:04|n1|None|2026-11-22T03:00:00|2026-11-22T03:00:01|2026-11-22T03:00:05|job
201.batch|201.batch|FAILED|3:0|00:00:04|n1||2026-11-22T03:00:01|2026-11-22T03:00:01|2026-11-22T03:00:05|batch
201.extern|201.extern|COMPLETED|0:0|00:00:04|n1||2026-11-22T03:00:01|2026-11-22T03:00:01|2026-11-22T03:00:05|extern
201.0|201.0|OUT_OF_MEMORY|0:125|00:00:02|n1||2026-11-22T03:00:01|2026-11-22T03:00:01|2026-11-22T03:00:03|python
"""
    rows = c.parse_sacct(text)
    assert [r.is_step for r in rows] == [False, True, True, True]
    st = status("201", text)
    assert (st.state, st.exit_code) == (JobState.FAILED, 3)
    assert c.sacct_status("202", rows) is None


@pytest.mark.parametrize(
    "bad",
    [
        "101|101|COMPLETED|0:0",  # too few fields
        "sacct: error: Problem talking to the database|x|x|x|x|x|x|x|x|x|x",  # not a job id
        "101|101|COMPLETED|zero|00:00:01|n|None|a|b|c|name",  # bad exit code
        "JobID|JobIDRaw|State|ExitCode|Elapsed|NodeList|Reason|Submit|Start|End|JobName",  # a header
    ],
)
def test_sacct_garbage_is_a_parse_error_with_the_raw_text(bad: str) -> None:
    with pytest.raises(ParseError) as exc:
        c.parse_sacct(SACCT_TEXT + bad + "\n")
    assert exc.value.raw.endswith(bad + "\n")
    assert "raw output" in str(exc.value)


def test_sacct_unknown_state_is_unknown_not_a_crash() -> None:
    st = status("301", row("301", "WIBBLE"))
    assert st.state is JobState.UNKNOWN


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0:0", (0, 0)), ("1:0", (1, 0)), ("0:9", (0, 9)), ("137:0", (137, 0)), ("", (None, None))],
)
def test_exit_codes(text: str, expected: tuple[int | None, int | None]) -> None:
    assert c.parse_exit_code(text) == expected


@pytest.mark.parametrize("bad", ["1", "a:b", "1:2:3", "-1:0"])
def test_bad_exit_codes(bad: str) -> None:
    with pytest.raises(ParseError):
        c.parse_exit_code(bad)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("00:00:05", 5.0),
        ("01:02:03", 3723.0),
        ("1-02:03:04", 93784.0),
        ("0:07", 7.0),
        ("12:34", 754.0),
        ("2-00:00:00", 172800.0),
        ("00:00:01.500", 1.0),
        ("INVALID", None),
        ("", None),
        ("UNLIMITED", None),
    ],
)
def test_elapsed(text: str, seconds: float | None) -> None:
    assert c.parse_elapsed(text) == seconds


# -- squeue, sbatch and find parsing --------------------------------------------------------


def test_squeue_rows() -> None:
    text = f"""\
301|301|PENDING|Priority|||{NAME}
302|302|RUNNING|None|node1|1-00:00:01|{NAME}
303_[1-3]|303|PENDING|JobArrayTaskLimit|||arr
303_4|307|RUNNING|None|node1|0:01|arr
"""
    rows = c.parse_squeue(text)
    assert [r.state for r in rows] == [JobState.PENDING, JobState.RUNNING, JobState.PENDING, JobState.RUNNING]
    assert rows[0].reason == "Priority" and rows[0].nodes == ""
    assert rows[1].elapsed_s == 86401.0
    st = c.squeue_status("303", rows)
    assert st is not None and st.state is JobState.RUNNING
    with pytest.raises(ParseError):
        c.parse_squeue("JOBID PARTITION NAME\n")


@pytest.mark.parametrize(("out", "job_id"), [("4242\n", "4242"), ("4242;cluster\n", "4242"), ("\n17\n", "17")])
def test_sbatch_parsable(out: str, job_id: str) -> None:
    assert c.parse_sbatch(out) == job_id


@pytest.mark.parametrize("out", ["", "Submitted batch job 12\n", "12 13\n"])
def test_sbatch_garbage(out: str) -> None:
    with pytest.raises(ParseError):
        c.parse_sbatch(out)


def find_output(jobid: str = "", squeue: str = "", sacct: str = "", rcs: tuple[int, int] = (0, 0)) -> str:
    return (
        f"{c.MARK}jobid\n{jobid}\n{c.MARK}squeue\n{squeue}{c.MARK}squeue rc={rcs[0]}\n"
        f"{c.MARK}sacct\n{sacct}{c.MARK}sacct rc={rcs[1]}\n"
    )


def test_find_prefers_live_then_recorded_then_newest() -> None:
    live = f"40|40|RUNNING|None|n1|0:01|{NAME}\n41|41|PENDING|Priority|||{NAME}\n"
    assert c.parse_find(find_output(squeue=live), "", NAME).choose() == "41"
    assert c.parse_find(find_output("40", squeue=live), "", NAME).choose() == "40"
    done = row("30", "FAILED", "1:0") + "\n" + row("35", "COMPLETED") + "\n"
    assert c.parse_find(find_output(sacct=done), "", NAME).choose() == "35"
    assert c.parse_find(find_output("30", sacct=done), "", NAME).choose() == "30"
    # only the jobid file knows it (purged, older than the window): re-attach, never resubmit
    assert c.parse_find(find_output("9"), "", NAME).choose() == "9"
    assert c.parse_find(find_output(), "", NAME).choose() is None


def test_find_skips_the_record_of_a_refused_sbatch() -> None:
    refused = (
        f"17|17|FAILED|1:0|00:00:00|None assigned|None|2026-11-22T03:23:44|2026-11-22T03:23:44|"
        f"2026-11-22T03:23:44|{NAME}\n"
    )
    assert c.parse_find(find_output(sacct=refused), "", NAME).choose() is None
    sq = f"17|17|FAILED|BadConstraints|||{NAME}\n"
    assert c.parse_find(find_output(squeue=sq), "", NAME).choose() is None
    ran = row("18", "FAILED", "1:0") + "\n"  # ran on a node and failed: a real job
    assert c.parse_find(find_output(sacct=refused + ran), "", NAME).choose() == "18"


def test_find_ignores_other_names_and_survives_one_daemon_down() -> None:
    other = row("50", "RUNNING", name=NAME + "x") + "\n"
    assert c.parse_find(find_output(sacct=other), "", NAME).choose() is None
    live = f"40|40|RUNNING|None|n1|0:01|{NAME}\n"
    assert c.parse_find(find_output(squeue=live, rcs=(0, 1)), "", NAME).choose() == "40"
    with pytest.raises(TransportError):
        c.parse_find(find_output(rcs=(1, 1)), "slurm down", NAME)
    with pytest.raises(ParseError):
        c.parse_find(find_output("not-an-id"), "", NAME)


# -- the state table --------------------------------------------------------------------------

# (terminal, success, retryable) for every state; a new JobState member must be added here.
TABLE = {
    "PENDING": (False, False, False),
    "CONFIGURING": (False, False, False),
    "RUNNING": (False, False, False),
    "COMPLETING": (False, False, False),
    "SUSPENDED": (False, False, False),
    "REQUEUED": (False, False, True),
    "REQUEUE_HOLD": (False, False, False),
    "REQUEUE_FED": (False, False, False),
    "RESIZING": (False, False, False),
    "STOPPED": (False, False, False),
    "SIGNALING": (False, False, False),
    "STAGE_OUT": (False, False, False),
    "COMPLETED": (True, True, False),
    "FAILED": (True, False, False),
    "CANCELLED": (True, False, False),
    "TIMEOUT": (True, False, False),
    "OUT_OF_MEMORY": (True, False, False),
    "NODE_FAIL": (True, False, True),
    "PREEMPTED": (True, False, True),
    "BOOT_FAIL": (True, False, True),
    "DEADLINE": (True, False, False),
    "SPECIAL_EXIT": (False, False, False),
    "REVOKED": (True, False, False),
    "LOST": (True, False, True),
    "UNKNOWN": (False, False, False),
}


def test_state_table_covers_every_state() -> None:
    assert set(TABLE) == {s.value for s in JobState}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_state_table(name: str) -> None:
    state = JobState.parse(name)
    assert state is JobState(name)
    assert (state.is_terminal, state.is_success, state.is_retryable) == TABLE[name]


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("CANCELLED by 1000", JobState.CANCELLED),
        ("CANCELLED+", JobState.CANCELLED),
        ("OUT_OF_ME+", JobState.OUT_OF_MEMORY),
        ("NODE_FAIL", JobState.NODE_FAIL),
        ("NODE_FA+", JobState.NODE_FAIL),
        ("completed", JobState.COMPLETED),
        ("  RUNNING ", JobState.RUNNING),
        ("RE+", JobState.UNKNOWN),  # ambiguous prefix
        ("", JobState.UNKNOWN),
        ("WIBBLE", JobState.UNKNOWN),
        ("None", JobState.UNKNOWN),
    ],
)
def test_state_parse(text: str, state: JobState) -> None:
    assert JobState.parse(text) is state


def test_completed_seen_first_by_the_controller_reads_exit_0_signal_0() -> None:
    """squeue can say COMPLETED before sacct has the row: that state means exit 0, no signal (seen in CI)."""
    from charllm.backends.base import JobStatus

    live = JobStatus(job_id="7", state=JobState.COMPLETED, exit_code=None, signal=None, nodes="n0")
    st = c.merge_status("7", None, live, known_gap=False)
    assert (st.state, st.exit_code, st.signal, st.nodes) == (JobState.COMPLETED, 0, 0, "n0")
    failed = c.merge_status("8", None, JobStatus(job_id="8", state=JobState.FAILED, exit_code=0), known_gap=False)
    assert (failed.exit_code, failed.signal) == (None, None)  # a failure's code only sacct knows

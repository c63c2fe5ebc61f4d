"""The campaign view's Airflow-free logic: outcome classes, the matrix, name checks, report parsing, HTML."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from charllm.ui import data
from charllm.ui.data import AttemptView, CampaignInfo, build_matrix, status_of
from charllm.ui.render import Links, campaign_page


def _a(cell: str, rep: int, att: int, state: str = "ended", outcome: str | None = "ok") -> AttemptView:
    return AttemptView(cell, rep, att, state, outcome, "manual__1", f"job{att}", None, None)


def test_outcome_classes():
    assert status_of([]) == ("not run", None)
    assert status_of([_a("c", 0, 1, outcome="failed"), _a("c", 0, 2)])[0] == "ok"
    assert status_of([_a("c", 0, 1, outcome="oom")])[0] == "oom"
    # GPU control denied: a result of its own, shown as such (not failed, not re-run)
    assert status_of([_a("c", 0, 1, outcome="skipped")])[0] == "skipped"
    assert status_of([_a("c", 0, 1, outcome="skipped"), _a("c", 0, 2, outcome="failed")])[0] == "skipped"
    st, shown = status_of([_a("c", 0, 1, outcome="timeout"), _a("c", 0, 2, outcome="lost")])
    assert st == "failed" and shown is not None and shown.attempt == 2 and shown.outcome == "lost"
    assert status_of([_a("c", 0, 1), _a("c", 0, 2, state="running", outcome=None)])[0] == "running"
    assert status_of([_a("c", 0, 1, state="reserved", outcome=None)])[0] == "running"


def test_matrix_rows_repeats_and_metrics():
    info = CampaignInfo(name="x", repeats=1, cells=(("aaaaaaaa", "one"), ("bbbbbbbb", "two")))
    table = pd.DataFrame(
        [
            {"cell_id": "aaaaaaaa", "repeat": 1, "outcome": "ok", "tokens_per_s": 800.0, "world_size": 2, "mfu": 0.4},
        ]
    )
    m = build_matrix(info, [_a("aaaaaaaa", 0, 1, outcome="oom"), _a("aaaaaaaa", 1, 1), _a("cccccccc", 0, 1)], table)
    assert m.repeats == [0, 1] and m.source == "catalog"
    assert [r.cell_id for r in m.rows] == ["aaaaaaaa", "bbbbbbbb", "cccccccc"]
    assert not m.rows[2].in_file
    e = m.entry("aaaaaaaa", 1)
    assert e is not None and e.status == "ok"
    assert e.metrics["tokens_per_s_per_gpu"] == 400.0 and e.metrics["mfu"] == 40.0
    assert math.isnan(e.metrics["peak_gpu_temp_c"])
    assert m.counts == {
        "ok": 2,
        "oom": 1,
        "skipped": 0,
        "failed": 0,
        "running": 0,
        "not run": 1,
    }  # r1 is no one's repeat
    nightly = CampaignInfo(name="x", repeats=1, schedule="0 2 * * *", nightly_cells="tw*", cells=info.cells)
    m = build_matrix(nightly, [_a("aaaaaaaa", 2, 1)])
    assert [e.expected for e in m.rows[0].entries] == [True, False, False]  # r2 shown: it has an attempt
    assert [e.expected for e in m.rows[1].entries] == [True, True, True]  # "two" is re-measured nightly
    assert m.counts["not run"] == 4


def test_matrix_from_recorded_tables_when_the_catalog_has_nothing():
    info = CampaignInfo(name="x", cells=(("aaaaaaaa", "one"),))
    table = pd.DataFrame([{"cell_id": "aaaaaaaa", "repeat": 0, "attempt": 1, "outcome": "ok", "cell_name": "one"}])
    m = build_matrix(info, [], table)
    assert m.source == "tables" and m.rows[0].entries[0].status == "ok"
    assert not m.rows[0].entries[0].has_folder  # a recorded run's folders are on another machine


def test_figure_names_are_looked_up_not_joined(tmp_path: Path):
    run = tmp_path / "figures" / "demo" / "manual__2026"
    run.mkdir(parents=True)
    (run / "throughput.png").write_bytes(b"\x89PNG")
    (run / "report.md").write_text("# r\n")
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", run / "link.png")
    assert data.figure_file("demo", "manual__2026", "throughput.png", tmp_path) == run / "throughput.png"
    for camp, r, name in [
        ("demo", "manual__2026", "link.png"),  # a link is not listed
        ("demo", "manual__2026", "../../../secret.png"),
        ("demo", "..", "secret.png"),
        ("../figures", "demo", "throughput.png"),
        ("demo", "manual__2026", "throughput.svg"),
        ("demo", "other", "throughput.png"),
    ]:
        assert data.figure_file(camp, r, name, tmp_path) is None, (camp, r, name)
    runs = data.figure_runs("demo", tmp_path)
    assert [r.name for r in runs] == ["manual__2026"] and runs[0].figures == ["throughput"]


def test_attempt_files_are_listed_without_links(tmp_path: Path):
    root = tmp_path / "a1"
    (root / "out").mkdir(parents=True)
    (root / "manifest.json").write_text("{}")
    (root / "out" / "steps.csv").write_text("step\n")
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", root / "out" / "leak")
    os.symlink(tmp_path, root / "up")
    assert [n for n, _ in data.list_files(root)] == ["manifest.json", "out/steps.csv"]
    assert data.attempt_file(root, "out/steps.csv") == root / "out" / "steps.csv"
    for bad in ("out/leak", "up/secret", "../secret", "/etc/passwd", "out/../manifest.json", ""):
        assert data.attempt_file(root, bad) is None, bad


REPORT = """# Campaign `demo`: run report

_Recorded GPU data: somewhere_

Outcomes (cell x repeat): ok 2.

## Reference checks

**1 of 2 checks VIOLATED.**

| cell_name | repeat | metric | measured | lower | upper | unit | result |
|---|---|---|---|---|---|---|---|
| a | 0 | tokens_per_s | 5,500 | 4,000 | 1e+09 | tokens/s | ok |
| b\\|c | 0 | tokens_per_s | 3,000 | 4,000 | 1e+09 | tokens/s | **FAIL** |

## Cells
"""


def test_report_checks_parsed_violations_first():
    r = data.parse_report(REPORT)
    assert r.intro == ["Recorded GPU data: somewhere", "Outcomes (cell x repeat): ok 2."]
    assert r.verdict == "1 of 2 checks VIOLATED."
    assert r.violations == 1
    assert r.checks[0]["cell_name"] == "b|c" and r.checks[0]["result"] == "FAIL"
    assert r.columns[-1] == "result"


def test_plan_index_and_clear_targets():
    items = [{"cell_id": "aa", "repeat": 0}, {"cell_id": "bb", "repeat": 0}, {"cell_id": "aa", "repeat": 1}, "junk"]
    assert data.plan_index(items) == {("aa", 0): 0, ("bb", 0): 1, ("aa", 1): 2}
    assert data.plan_index(None) == {}
    assert data.clear_targets([2, 0, 2]) == [
        ["cell.submit", 0],
        ["cell.wait", 0],
        ["cell.collect", 0],
        ["cell.submit", 2],
        ["cell.wait", 2],
        ["cell.collect", 2],
    ]


def test_campaign_of_dag():
    assert data.campaign_of_dag("charllm_demo") == "demo"
    assert data.campaign_of_dag("charllm_demo_figures") == "demo_figures"
    assert data.campaign_of_dag("other") is None and data.campaign_of_dag("charllm_../x") is None


def test_page_escapes_names_and_keeps_its_script():
    info = CampaignInfo(name="x", description="<img src=x onerror=alert(1)>", cells=(("aaaaaaaa", "<b>cell</b>"),))
    m = build_matrix(info, [_a("aaaaaaaa", 0, 1, outcome="failed")])
    m.rows[0].entries[0].message = "<script>alert(2)</script>"
    html = campaign_page(
        info=info,
        matrix=m,
        links=Links(plugin="/charllm/", airflow="/"),
        runs=[],
        fig_runs=[],
        chosen=None,
        report=None,
        can_edit=True,
    )
    assert "<img src=x" not in html and "&lt;img src=x" in html
    assert "<b>cell</b>" not in html and "<script>alert(2)" not in html
    assert "window.top.history.pushState" in html and "&#39;" not in html.split("<script>")[-1]
    assert 'data-status="failed"' in html

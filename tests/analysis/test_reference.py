"""Reference bands: a violated band is reported, returned, and written into the run report."""

from __future__ import annotations

import pandas as pd

from charllm.analysis.reference import campaign_settings, check_references, violations, write_report
from charllm.campaign import ReferenceBand

HOT = "gpt3-1.3b-tp1pp1dp1-*"


def test_violated_band_is_reported(replay_module, tmp_path):
    rp, info = replay_module
    cells = pd.read_parquet(info["cells_table"])
    refs = list(rp.lc.campaign.references)
    checks = check_references(refs, cells)
    bad = violations(checks)
    # the H100 1.3B replays peak at 68 C against a 65 C band: 4 codes + mb16 + 2 more repeats; OOM not checked
    assert len(bad) == 7
    assert {c.metric for c in bad} == {"peak_gpu_temp_c"} and all(
        c.measured == 68.0 and c.status == "fail" for c in bad
    )
    assert "gpt3-1.3b-tp1pp1dp1-mb32-gb32-s2048-01000" not in {c.cell_name for c in checks}
    passed = [c for c in checks if c.ok]
    assert len(passed) == 9 and {c.metric for c in passed} == {"energy_counter_ratio"}
    path = write_report(tmp_path, "replay", cells, checks, [])
    text = path.read_text()
    assert "**7 of 16 checks VIOLATED.**" in text
    assert text.count("**FAIL**") == 7


def test_missing_metric_and_empty_glob_are_violations(replay_module):
    _, info = replay_module
    cells = pd.read_parquet(info["cells_table"])
    refs = [
        ReferenceBand(metric="no_such_metric", value=1, lower=0, upper=2, cells=HOT),
        {"metric": "mfu", "value": 0.5, "lower": 0.4, "upper": 0.7, "cells": "nothing-matches-*"},
        {"metric": "mfu", "value": 0.5, "lower": 0.4, "upper": 0.7, "cells": "gpt3-1.3b-tp1pp1dp2-*"},
    ]
    checks = check_references(refs, cells)
    by = {}
    for c in checks:
        by.setdefault(c.status, []).append(c)
    assert len(by["missing"]) == 7 and len(by["no-cells"]) == 1 and len(by["pass"]) == 1
    assert by["pass"][0].measured == 0.5915514645982584  # the recorded 2 x H200 FSDP MFU


def test_campaign_settings_finds_the_file_by_name(replay_module):
    refs, schedule = campaign_settings("replay")
    assert [r.metric for r in refs] == ["energy_counter_ratio", "peak_gpu_temp_c"] and schedule is None
    assert campaign_settings("no-such-campaign") == ([], None)

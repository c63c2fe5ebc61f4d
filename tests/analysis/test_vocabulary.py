"""One name per metric, one function per definition: the job and the aggregation agree, old names read."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from charllm.analysis.aggregate import read_table
from charllm.definitions import (
    METRIC_ALIASES,
    canonical_metrics,
    counter_over_sampled,
    efficiency_samples_per_s_mj,
    measured_window,
)
from charllm.train.metrics import StepRecord, measure_window

H100 = Path(__file__).resolve().parents[1] / "data" / "gpu" / "h100-gpt3-1.3b"  # a recorded run


def test_the_job_and_the_aggregation_find_the_same_measured_window() -> None:
    rows = list(csv.DictReader((H100 / "steps.csv").open()))
    records = [
        StepRecord(int(r["step"]), r["phase"], float(r["start_unix_s"]), float(r["end_unix_s"]), 0.0, 0) for r in rows
    ]
    steps = pd.read_csv(H100 / "steps.csv")
    window = measured_window(zip(steps["phase"], steps["start_unix_s"], steps["end_unix_s"], strict=True))
    assert window is not None
    t0, t1, n = window
    recorded = json.loads((H100 / "result.json").read_text())["provenance"]["measure_window_unix_s"]
    print("window", t0, t1, n, "recorded", recorded)
    assert measure_window(records) == pytest.approx(recorded, abs=1e-5)  # the job's (train.metrics)
    assert (t0, t1) == pytest.approx(recorded, abs=1e-5)  # the aggregation's, from the steps table
    assert n == sum(r["phase"] == "measure" for r in rows)
    assert measured_window([("warmup", 0.0, 1.0)]) is None


def test_definitions() -> None:
    # 16 samples per 0.5 s step at 4 kJ a step: 16 / (0.5 s * 0.004 MJ) = 8000 samples / (s * MJ)
    assert efficiency_samples_per_s_mj(16, 0.5, 4000.0) == pytest.approx(8000.0)
    assert math.isnan(efficiency_samples_per_s_mj(16, 0.0, 4000.0))
    assert counter_over_sampled(101.0, 100.0) == pytest.approx(1.01)
    assert math.isnan(counter_over_sampled(101.0, 0.0)) and math.isnan(counter_over_sampled(1.0, math.nan))


def test_old_names_are_read_aliases(tmp_path: Path) -> None:
    old_result = {"samples_per_s_per_mj": 12.5, "energy_counter_over_sampled": 1.01}
    assert canonical_metrics(old_result) == {"efficiency_samples_per_s_mj": 12.5, "energy_counter_over_sampled": 1.01}
    # a cells table of the older version: the aggregation's ratio under its old name, the job's copy under the new
    old = pd.DataFrame(
        {
            "cell_id": ["a"],
            "energy_counter_ratio": [0.99],  # recomputed by the aggregation: wins
            "energy_counter_over_sampled": [1.02],  # the job's own number, copied in
            "samples_per_s_per_mj": [7.0],  # the job's efficiency
            "efficiency_samples_per_s_mj": [7.1],  # the aggregation's: wins
        }
    )
    old.to_parquet(tmp_path / "cells.parquet")
    got = read_table(tmp_path / "cells.parquet")
    print(got.to_dict("records"))
    assert list(got.columns) == ["cell_id", "energy_counter_over_sampled", "efficiency_samples_per_s_mj"]
    assert got.iloc[0].to_dict() == {
        "cell_id": "a",
        "energy_counter_over_sampled": 0.99,
        "efficiency_samples_per_s_mj": 7.1,
    }
    assert not set(METRIC_ALIASES) & set(got.columns)

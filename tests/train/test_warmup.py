"""The warm-up decision: steady step time and flat temperature, else max_steps."""

from __future__ import annotations

import math

from charllm.train.cell import WarmupSpec
from charllm.train.warmup import WarmupMonitor


def test_steady_after_window_fills() -> None:
    wm = WarmupMonitor(WarmupSpec(min_steps=2, max_steps=50, step_time_cv=0.05, temp_slope_c_per_s=0.05))
    times = [5.0, 1.3, 1.0, 1.0, 1.01, 0.99, 1.0]
    done = [wm.update(t, 0.01) for t in times]
    # the 5-step window holding the first 5.0 and 1.3 is not steady; from step 7 on it is
    assert done == [False] * 6 + [True]
    rec = wm.record()
    assert rec["converged"] and rec["reason"] == "steady" and rec["steps"] == 7
    assert rec["final_step_time_cv"] < 0.05


def test_hot_gpu_keeps_warming_until_max_steps() -> None:
    wm = WarmupMonitor(WarmupSpec(min_steps=2, max_steps=8, step_time_cv=0.05, temp_slope_c_per_s=0.05))
    done = [wm.update(1.0, 0.2) for _ in range(8)]
    assert done == [False] * 7 + [True]
    assert not wm.converged and wm.reason == "max_steps"
    assert wm.record()["final_temp_slope_c_per_s"] == 0.2


def test_no_gpu_telemetry_skips_thermal_criterion() -> None:
    wm = WarmupMonitor(WarmupSpec(min_steps=0, max_steps=20, cv_window_steps=3))
    assert [wm.update(1.0, math.nan) for _ in range(3)] == [False, False, True]
    assert wm.record()["thermal_criterion"].startswith("n/a")


def test_temperature_unknown_yet_is_not_steady() -> None:
    wm = WarmupMonitor(WarmupSpec(min_steps=0, max_steps=4, cv_window_steps=2))
    assert [wm.update(1.0, math.inf) for _ in range(4)] == [False, False, False, True]
    assert wm.reason == "max_steps"

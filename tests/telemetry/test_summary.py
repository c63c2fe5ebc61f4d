"""Window summaries on synthetic rows whose answers are known exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from charllm.telemetry import combine, gpu_window_summary
from charllm.telemetry.summary import integrate


def frame(power: np.ndarray, t: np.ndarray, **cols: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"unix_s": t, "power_w": power, **cols})


def test_constant_and_linear_power_integrate_exactly() -> None:
    t = np.arange(0, 10.0001, 0.05)
    assert integrate(t, np.full(t.size, 100.0), 2.02, 7.51) == pytest.approx(549.0)
    # linear ramp P = 10 t: integral from a to b is 5 (b^2 - a^2), exact for trapezoids
    assert integrate(t, 10 * t, 2.02, 7.51) == pytest.approx(5 * (7.51**2 - 2.02**2))


def test_window_not_covered_is_nan() -> None:
    t = np.arange(0, 1.0, 0.1)
    assert np.isnan(integrate(t, np.ones(t.size), 0.5, 2.0))


def test_nan_samples_are_skipped_not_zero() -> None:
    t = np.arange(0, 5.0001, 0.5)
    p = np.full(t.size, 200.0)
    p[3] = np.nan
    assert integrate(t, p, 0.0, 5.0) == pytest.approx(1000.0)


def test_throttle_time_counter_and_rate() -> None:
    t = np.arange(0, 10.0001, 0.1)
    reasons = np.where(t < 4.0, 0x4, 0x4 | 0x40).astype(float)
    reasons[t >= 8.0] = 0.0
    energy = 1000.0 + 300.0 * t
    s = gpu_window_summary(
        frame(np.full(t.size, 300.0), t, clock_event_reasons=reasons, energy_total_j=energy), 1.0, 9.0
    )
    assert s["throttle_sw_power_cap_s"] == pytest.approx(7.0)  # 1..8
    assert s["throttle_hw_thermal_s"] == pytest.approx(4.0)  # 4..8
    assert s["throttle_gpu_idle_s"] == 0.0
    assert s["energy_counter_j"] == pytest.approx(2400.0) and s["energy_gpu_j"] == pytest.approx(2400.0)
    assert s["samples"] == 81 and s["sampling_rate_hz"] == pytest.approx(81 / 8)


def test_combine_rules() -> None:
    a = {"energy_gpu_j": 10.0, "peak_power_w": 700.0, "avg_gpu_temp_c": 60.0, "sampling_rate_hz": 19.9,
         "throttle_sw_power_cap_s": 1.0, "samples": 100.0, "window_s": 5.0}  # fmt: skip
    b = {"energy_gpu_j": 12.0, "peak_power_w": 650.0, "avg_gpu_temp_c": 70.0, "sampling_rate_hz": 20.1,
         "throttle_sw_power_cap_s": 3.0, "samples": 101.0, "window_s": 5.0}  # fmt: skip
    c = combine([a, b])
    assert c["energy_gpu_j"] == 22.0 and c["peak_power_w"] == 700.0 and c["avg_gpu_temp_c"] == 65.0
    assert c["sampling_rate_min_hz"] == 19.9 and c["throttle_sw_power_cap_s"] == 3.0
    assert c["telemetry_samples"] == 201.0 and c["telemetry_gpus"] == 2.0
    assert combine([]) == {}

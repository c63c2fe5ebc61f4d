"""Recorded GPU telemetry (tests/data/gpu, from the H100 and 2 x H200 validation runs) replayed
through the sampler, then windowed into metrics that are checked against hand computations
and against the result.json the live run wrote.
"""

from __future__ import annotations

import csv
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from charllm.definitions import canonical_metrics
from charllm.modelcat import ModelShape
from charllm.telemetry import ReplaySource, Sampler, combine, gpu_window_summary
from charllm.telemetry.errors import MonitorError
from charllm.telemetry.summary import unwrap
from charllm.train.metrics import StepRecord, energy_metrics, step_metrics

DATA = Path(__file__).resolve().parents[1] / "data" / "gpu"
H100 = DATA / "h100-gpt3-1.3b"
H200X2 = DATA / "h200x2-fsdp-zero2"


def replay(path: Path) -> pd.DataFrame:
    s = Sampler([ReplaySource(path)], hz=20.0)
    n = s.replay()
    df = s.frame()
    assert n == len(df)
    return df


def result(run: Path) -> dict[str, Any]:
    return json.loads((run / "result.json").read_text())


# ---- independent hand computations (plain Python, no numpy) --------------------------------
def _at(pts: list[tuple[float, float]], x: float) -> float:
    for (ta, va), (tb, vb) in itertools.pairwise(pts):
        if ta <= x <= tb:
            return va + (vb - va) * (x - ta) / (tb - ta)
    raise ValueError(x)


def hand_integral(t: list[float], v: list[float], t0: float, t1: float) -> float:
    pts = sorted(zip(t, v, strict=True))
    xs = [t0] + [ti for ti, _ in pts if t0 < ti < t1] + [t1]
    ys = [_at(pts, x) for x in xs]
    return sum((ys[i] + ys[i + 1]) / 2 * (xs[i + 1] - xs[i]) for i in range(len(xs) - 1))


def hand_throttle(t: list[float], bits: list[float], bit: int, t0: float, t1: float) -> float:
    total = 0.0
    for i in range(len(t) - 1):
        lo, hi = max(t[i], t0), min(t[i + 1], t1)
        if hi > lo and int(bits[i]) & bit:
            total += hi - lo
    return total


def test_replay_reproduces_the_recording() -> None:
    df = replay(H100 / "telemetry" / "rank0.parquet")
    rec = pd.read_parquet(H100 / "telemetry" / "rank0.parquet")
    assert len(df) == len(rec) > 1000
    for col in ("unix_s", "power_w", "energy_total_j", "gpu_temp_c", "clock_event_reasons", "nvml_errors_total"):
        np.testing.assert_array_equal(df[col].to_numpy(), rec[col].to_numpy())
    assert (df["gpu_uuid"] == rec["gpu_uuid"].iloc[0]).all() and df["gpu_uuid"].iloc[0].startswith("GPU-")
    assert (df["rank"] == 0).all()


def test_small_slice_matches_hand_computation() -> None:
    df = replay(H100 / "telemetry" / "rank0.parquet")
    w0, _ = result(H100)["provenance"]["measure_window_unix_s"]
    t0, t1 = w0 + 1.2345, w0 + 3.2345  # edges between ticks on purpose
    s = gpu_window_summary(df, t0, t1)
    t, p = df["unix_s"].tolist(), df["power_w"].tolist()
    e = hand_integral(t, p, t0, t1)
    assert s["energy_gpu_j"] == pytest.approx(e, rel=1e-12)
    assert s["avg_power_w"] == pytest.approx(e / 2.0, rel=1e-12)
    inside = df[(df.unix_s >= t0) & (df.unix_s <= t1)]
    assert s["samples"] == len(inside) and s["sampling_rate_hz"] == pytest.approx(len(inside) / 2.0)
    assert s["peak_power_w"] == max(inside["power_w"])
    assert s["avg_gpu_temp_c"] == pytest.approx(statistics.fmean(inside["gpu_temp_c"]))
    assert s["avg_sm_clock_mhz"] == pytest.approx(statistics.fmean(inside["sm_clock_mhz"]))
    counter = df["energy_total_j"].tolist()
    assert s["energy_counter_j"] == pytest.approx(
        _at(sorted(zip(t, counter, strict=True)), t1) - _at(sorted(zip(t, counter, strict=True)), t0)
    )
    bits = df["clock_event_reasons"].tolist()
    assert s["throttle_sw_power_cap_s"] == pytest.approx(hand_throttle(t, bits, 0x4, t0, t1))
    assert s["throttle_sw_power_cap_s"] > 1.5  # this H100 ran at its 700 W cap
    assert s["energy_mem_j"] == pytest.approx(hand_integral(t, df["mem_power_w"].tolist(), t0, t1))


@pytest.mark.parametrize("run", [H100, DATA / "h100-gpt3-125m"], ids=["gpt3-1.3b", "gpt3-125m"])
def test_each_recording_reproduces_its_live_result(run: Path) -> None:
    df = replay(run / "telemetry" / "rank0.parquet")
    res = result(run)
    t0, t1 = res["provenance"]["measure_window_unix_s"]
    got = combine([gpu_window_summary(df, t0, t1)])
    for k in ("energy_gpu_j", "energy_counter_j", "peak_power_w", "avg_gpu_temp_c", "telemetry_samples"):
        assert got[k] == pytest.approx(res["metrics"][k], rel=1e-9), k


def test_full_window_reproduces_the_live_result_and_energy_agrees() -> None:
    df = replay(H100 / "telemetry" / "rank0.parquet")
    res = result(H100)
    t0, t1 = res["provenance"]["measure_window_unix_s"]
    m = res["metrics"]
    got = combine([gpu_window_summary(df, t0, t1)])
    for k in ("energy_gpu_j", "energy_counter_j", "energy_mem_j", "avg_power_w", "peak_power_w", "avg_gpu_temp_c",
              "peak_gpu_temp_c", "avg_sm_clock_mhz", "sampling_rate_min_hz", "telemetry_samples",
              "throttle_sw_power_cap_s", "nvml_errors"):  # fmt: skip
        assert got[k] == pytest.approx(m[k], rel=1e-9), k
    # over the 11 s window the sampled 20 Hz power agrees with NVML's energy counter within 1 %
    assert got["energy_counter_j"] / got["energy_gpu_j"] == pytest.approx(1.0, abs=0.01)
    assert got["sampling_rate_min_hz"] >= 19.0
    em = energy_metrics(
        got, measured_steps=10, global_batch=32, seq_len=2048, step_time_median_s=m["step_time_median_s"]
    )
    assert em["energy_per_step_j"] == pytest.approx(got["energy_gpu_j"] / 10)
    assert em["energy_per_token_j"] == pytest.approx(got["energy_gpu_j"] / (10 * 32 * 2048))
    assert em["energy_per_step_j"] == pytest.approx(m["energy_per_step_j"], rel=1e-9)
    # the recorded result.json carries the efficiency under its older name (a read-alias)
    assert em["efficiency_samples_per_s_mj"] == pytest.approx(
        canonical_metrics(m)["efficiency_samples_per_s_mj"], rel=1e-9
    )


def test_step_metrics_from_the_recorded_steps_csv() -> None:
    res = result(H100)
    cell = res["provenance"]["cell"]
    rows = list(csv.DictReader((H100 / "steps.csv").open()))
    recs = [StepRecord(int(r["step"]), r["phase"], float(r["start_unix_s"]), float(r["end_unix_s"]), float(r["loss"]),
                       int(r["tokens"])) for r in rows]  # fmt: skip
    m = step_metrics(recs, shape=ModelShape(**cell["model"]), seq_len=2048, global_batch=32, world_size=1,
                     gpu_type="h100", precision="bf16", recompute=False)  # fmt: skip
    durations = sorted(float(r["duration_s"]) for r in rows if r["phase"] == "measure")
    assert m["step_time_median_s"] == pytest.approx((durations[4] + durations[5]) / 2, abs=2e-6)
    for k in ("step_time_median_s", "tokens_per_s", "mfu", "step_time_p90_s"):
        assert m[k] == pytest.approx(res["metrics"][k], rel=1e-5), k
    assert m["mfu"] == pytest.approx(0.543, abs=0.001)


def test_two_gpu_recording_combines_over_gpus() -> None:
    res = result(H200X2)
    t0, t1 = res["provenance"]["measure_window_unix_s"]
    per = [gpu_window_summary(replay(H200X2 / "telemetry" / f"rank{r}.parquet"), t0, t1) for r in (0, 1)]
    got = combine(per)
    m = res["metrics"]
    assert got["energy_gpu_j"] == pytest.approx(per[0]["energy_gpu_j"] + per[1]["energy_gpu_j"])
    assert got["energy_gpu_j"] == pytest.approx(m["energy_gpu_j"], rel=1e-9)
    assert got["peak_gpu_temp_c"] == max(p["peak_gpu_temp_c"] for p in per)
    assert got["avg_gpu_temp_c"] == pytest.approx((per[0]["avg_gpu_temp_c"] + per[1]["avg_gpu_temp_c"]) / 2)
    assert got["sampling_rate_min_hz"] == min(p["sampling_rate_hz"] for p in per)
    assert got["telemetry_gpus"] == 2
    # FSDP moves parameters and gradients over NVLink; both GPUs saw traffic both ways
    assert all(p["nvlink_tx_bytes"] > 1e9 and p["nvlink_rx_bytes"] > 1e9 for p in per)
    uuids = {replay(H200X2 / "telemetry" / f"rank{r}.parquet")["gpu_uuid"].iloc[0] for r in (0, 1)}
    assert len(uuids) == 2


def test_pcie_counters_wrap_at_32_bits() -> None:
    df = pd.read_parquet(H200X2 / "telemetry" / "rank1.parquet")
    raw = df["pcie_tx_total_bytes"].to_numpy()
    assert (np.diff(raw) < 0).any(), "this recording has a wrap-around"
    assert (np.diff(unwrap(raw, 2.0**32)) >= 0).all()
    whole = gpu_window_summary(df, df.unix_s.iloc[0], df.unix_s.iloc[-1])
    assert whole["pcie_tx_bytes"] > 0
    assert np.array_equal(
        unwrap(np.array([10.0, 4e9, 5.0, np.nan, 20.0]), 2.0**32),
        [10.0, 4e9, 2**32 + 5.0, np.nan, 2**32 + 20.0],
        equal_nan=True,
    )


def test_bad_recording_is_a_monitor_error(tmp_path: Path) -> None:
    with pytest.raises(MonitorError):
        ReplaySource(tmp_path / "missing.parquet")
    pd.DataFrame({"x": [1.0]}).to_parquet(tmp_path / "no_time.parquet")
    with pytest.raises(MonitorError, match="unix_s"):
        ReplaySource(tmp_path / "no_time.parquet")

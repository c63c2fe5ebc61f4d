"""NVML errors become NaNs and a counter, never a crash (a fake NVML stands in for the driver).

The fake is used only for what cannot run here, the error path; everything above the
sampler is tested on recorded GPU data in test_replay.py.
"""

from __future__ import annotations

import math
import threading
import time
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from charllm.telemetry import Sampler, temperature_slope_c_per_s
from charllm.telemetry.errors import MonitorError
from charllm.telemetry.nvml_source import NvmlSource


class FakeNVML:
    """Enough of pynvml for NvmlSource; ``fail`` decides per call whether NVML errors."""

    NVMLError = pynvml.NVMLError
    NVML_SUCCESS = pynvml.NVML_SUCCESS

    def __init__(self, unsupported_fields: set[int] = frozenset(), fail: Any = None) -> None:  # type: ignore[assignment]
        for k in dir(pynvml):
            if k.startswith(("NVML_FI_", "NVML_POWER_SCOPE", "NVML_TEMPERATURE", "NVML_CLOCK_", "NVML_VALUE_TYPE")):
                setattr(self, k, getattr(pynvml, k))
        self.unsupported_fields = set(unsupported_fields)
        self.fail = fail or (lambda what: False)
        self.calls = 0
        self.energy_mj = 1_000_000

    def _maybe_fail(self, what: str) -> None:
        self.calls += 1
        if self.fail(what):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)

    # identity
    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        if uuid != "GPU-fake":
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return "h"

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return "h"

    def nvmlDeviceGetIndex(self, h: str) -> int:
        return 3

    def nvmlDeviceGetUUID(self, h: str) -> str:
        return "GPU-fake"

    def nvmlDeviceGetPciInfo(self, h: str) -> Any:
        return SimpleNamespace(busId=b"00000000:19:00.0")

    def nvmlDeviceGetName(self, h: str) -> bytes:
        return b"Fake H100"

    def nvmlDeviceGetSerial(self, h: str) -> str:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    # readings
    def nvmlDeviceGetFieldValues(self, h: str, ids: list[tuple[int, int]]) -> list[Any]:
        self._maybe_fail("fields")
        out = []
        for fid, _scope in ids:
            ret = pynvml.NVML_ERROR_NOT_SUPPORTED if fid in self.unsupported_fields else pynvml.NVML_SUCCESS
            if ret == pynvml.NVML_SUCCESS and self.fail(f"field{fid}"):
                ret = pynvml.NVML_ERROR_UNKNOWN
            if fid == pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION:
                self.energy_mj += 35_000
                val = SimpleNamespace(ullVal=self.energy_mj)
                vt = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
            else:
                power = fid in (pynvml.NVML_FI_DEV_POWER_INSTANT, pynvml.NVML_FI_DEV_POWER_AVERAGE)
                val = SimpleNamespace(uiVal=700_000 if power else 55)
                vt = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
            out.append(SimpleNamespace(nvmlReturn=ret, valueType=vt, value=val))
        return out

    def nvmlDeviceGetTemperature(self, h: str, sensor: int) -> int:
        self._maybe_fail("temp")
        return 66

    def nvmlDeviceGetClockInfo(self, h: str, clk: int) -> int:
        self._maybe_fail("clock")
        return 1755 if clk == pynvml.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetUtilizationRates(self, h: str) -> Any:
        self._maybe_fail("util")
        return SimpleNamespace(gpu=100, memory=40)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: str) -> int:
        self._maybe_fail("reasons")
        return 0x4

    def nvmlDeviceGetEnforcedPowerLimit(self, h: str) -> int:
        self._maybe_fail("limit")
        return 700_000

    def nvmlDeviceGetPowerUsage(self, h: str) -> int:
        self._maybe_fail("usage")
        return 650_000


def test_healthy_fake_reads_every_field_in_units() -> None:
    nv = FakeNVML(
        unsupported_fields={pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX}
    )
    src = NvmlSource(uuid="GPU-fake", nvml=nv)
    assert src.identity == {"gpu_index": 3, "gpu_uuid": "GPU-fake", "pci_bus_id": "00000000:19:00.0"}
    assert src.info["serial"] == ""  # unsupported identity detail degrades to empty
    assert set(src.unsupported) == {"nvlink_tx_total_kib", "nvlink_rx_total_kib"}  # probed once, not errors
    row = src.read()
    assert row["power_w"] == 700.0 and row["gpu_temp_c"] == 66.0 and row["sm_clock_mhz"] == 1755.0
    assert row["clock_event_reasons"] == 4.0 and row["power_limit_w"] == 700.0
    assert row["energy_total_j"] > 1000.0
    assert "nvlink_tx_total_kib" not in row
    assert src.errors == 0 and src.power_source == "NVML_FI_DEV_POWER_INSTANT"


def test_instant_power_unsupported_falls_back_to_power_usage() -> None:
    nv = FakeNVML(unsupported_fields={pynvml.NVML_FI_DEV_POWER_INSTANT})
    src = NvmlSource(index=0, nvml=nv)
    assert src.power_source == "nvmlDeviceGetPowerUsage"
    assert src.read()["power_w"] == 650.0


def test_unknown_gpu_fails_loudly() -> None:
    with pytest.raises(MonitorError, match="NVML has no GPU GPU-other"):
        NvmlSource(uuid="GPU-other", nvml=FakeNVML())


def test_sampler_keeps_going_through_nvml_errors() -> None:
    counts: dict[str, int] = {}
    lock = threading.Lock()
    armed = threading.Event()
    every = {"temp": 2, "fields": 5, f"field{pynvml.NVML_FI_DEV_POWER_AVERAGE}": 3}

    def fail(what: str) -> bool:
        # after the probe: the temperature call fails every 2nd time, the whole field batch
        # every 5th, the memory-power field every 3rd
        if not armed.is_set() or what not in every:
            return False
        with lock:
            counts[what] = counts.get(what, 0) + 1
            return counts[what] % every[what] == 0

    nv = FakeNVML(fail=fail)
    src = NvmlSource(uuid="GPU-fake", nvml=nv)
    armed.set()
    s = Sampler([src], hz=200.0, identity={"host": "h", "rank": 5, "local_rank": 1}).start()
    time.sleep(0.4)
    alive = s._thread is not None and s._thread.is_alive()
    s.stop()
    assert alive, "the sampler thread died on an NVML error"
    df = s.frame()
    assert len(df) >= 20
    for col in ("gpu_temp_c", "power_w", "mem_power_w"):
        assert df[col].isna().any() and df[col].notna().any(), col
    assert df["mem_power_w"].isna().sum() > df["power_w"].isna().sum()  # batch failures + its own
    assert df["sm_clock_mhz"].notna().all()  # other fields unaffected
    nvml_cols = [f[0] for f in src._fields] + [c for cols, _ in src._calls for c in cols]
    assert src.errors == int(df[nvml_cols].isna().sum().sum())  # one counted error per NaN
    assert src.errors_by_field["gpu_temp_c"] == df["gpu_temp_c"].isna().sum()
    assert df["nvml_errors_total"].is_monotonic_increasing and df["nvml_errors_total"].iloc[-1] == src.errors
    assert (df["rank"] == 5).all() and (df["gpu_uuid"] == "GPU-fake").all()
    assert df["unix_s"].is_monotonic_increasing


def test_sampler_rate_and_final_sample() -> None:
    class Counter:
        errors = 0
        unsupported: list[str] = []

        def read(self) -> dict[str, float]:
            return {"gpu_temp_c": 50.0}

        def close(self) -> None:
            pass

    s = Sampler([Counter()], hz=50.0).start()
    time.sleep(0.5)
    t_stop = time.time()
    s.stop()
    n = len(s.rows)
    assert 20 <= n <= 30  # ~25 ticks plus the final sample
    assert s.rows[-1]["unix_s"] >= t_stop  # stop() takes a last sample after everything before it


def test_temperature_slope() -> None:
    ts = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert temperature_slope_c_per_s(ts, [60, 60.5, 61, 61.5, 62], min_span_s=3) == pytest.approx(0.5)
    assert temperature_slope_c_per_s(ts[:2], [60, 61], min_span_s=3) == math.inf  # too short to tell
    assert math.isnan(temperature_slope_c_per_s([], [], min_span_s=3))

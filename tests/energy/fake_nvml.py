"""A recording fake of the pynvml calls the GPU controller makes (never real GPUs in tests).

Every call is appended to ``calls`` and, when ``CHARLLM_FAKE_NVML_LOG`` names a file, written
there as one JSON line (so a child process killed by SIGTERM leaves its record behind).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

SETTERS = ("nvmlDeviceSetGpuLockedClocks", "nvmlDeviceResetGpuLockedClocks", "nvmlDeviceSetPowerManagementLimit")


class FakeNvml:
    """``CHARLLM_FAKE_NVML_FAIL=<handle>:<n>``: the n-th clock lock (1-based) on that handle raises,
    as a driver error would (the job's exception path); ``CHARLLM_FAKE_NVML_HANG=<handle>:<n>``: the
    n-th clock lock on that handle hangs (sleeps a minute: a stuck rank, stopped by SIGTERM)."""

    def __init__(self, power_limit_mw: int = 700_000, log: str | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.power_limit_mw = {0: power_limit_mw, 1: power_limit_mw}
        self.locked: dict[int, tuple[int, int] | None] = {0: None, 1: None}
        self.log = log if log is not None else os.environ.get("CHARLLM_FAKE_NVML_LOG")
        fail = os.environ.get("CHARLLM_FAKE_NVML_FAIL", "")
        self.fail_at = tuple(int(x) for x in fail.split(":")) if fail else None
        hang = os.environ.get("CHARLLM_FAKE_NVML_HANG", "")
        self.hang_at = tuple(int(x) for x in hang.split(":")) if hang else None
        self.locks = {0: 0, 1: 0}

    def _rec(self, *call: Any) -> None:
        self.calls.append(call)
        if self.log:
            with open(self.log, "a") as fh:
                fh.write(json.dumps(list(call)) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def nvmlInit(self) -> None:
        self._rec("nvmlInit")

    def nvmlDeviceGetHandleByIndex(self, idx: int) -> int:
        self._rec("nvmlDeviceGetHandleByIndex", idx)
        return idx

    def nvmlDeviceSetGpuLockedClocks(self, h: int, lo: int, hi: int) -> None:
        self.locks[h] += 1
        if self.fail_at == (h, self.locks[h]):
            self._rec("raise", h, self.locks[h])
            raise RuntimeError(f"fake NVML: clock lock {self.locks[h]} on GPU {h} fails")
        if self.hang_at == (h, self.locks[h]):
            self._rec("hang", h, self.locks[h])
            time.sleep(60)
        self._rec("nvmlDeviceSetGpuLockedClocks", h, lo, hi)
        self.locked[h] = (lo, hi)

    def nvmlDeviceResetGpuLockedClocks(self, h: int) -> None:
        self._rec("nvmlDeviceResetGpuLockedClocks", h)
        self.locked[h] = None

    def nvmlDeviceGetPowerManagementLimit(self, h: int) -> int:
        self._rec("nvmlDeviceGetPowerManagementLimit", h)
        return self.power_limit_mw[h]

    def nvmlDeviceSetPowerManagementLimit(self, h: int, mw: int) -> None:
        self._rec("nvmlDeviceSetPowerManagementLimit", h, mw)
        self.power_limit_mw[h] = mw

    def setter_calls(self) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] in SETTERS]

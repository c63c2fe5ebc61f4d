"""A recording fake of the pynvml calls the GPU controller makes (never real GPUs in tests).

Every call is appended to ``calls`` and, when ``CHARLLM_FAKE_NVML_LOG`` names a file, written
there as one JSON line (so a child process killed by SIGTERM leaves its record behind).
"""

from __future__ import annotations

import json
import os
from typing import Any

SETTERS = ("nvmlDeviceSetGpuLockedClocks", "nvmlDeviceResetGpuLockedClocks", "nvmlDeviceSetPowerManagementLimit")


class FakeNvml:
    def __init__(self, power_limit_mw: int = 700_000, log: str | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.power_limit_mw = {0: power_limit_mw, 1: power_limit_mw}
        self.locked: dict[int, tuple[int, int] | None] = {0: None, 1: None}
        self.log = log if log is not None else os.environ.get("CHARLLM_FAKE_NVML_LOG")

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

"""Replay a recorded telemetry Parquet through the live sampling path (Zeus's replay idea).

``Sampler([ReplaySource(path)]).replay()`` yields the same rows, columns and error counts
as the live run that recorded them, so windowing and metrics are tested on real GPU data
without a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from charllm.telemetry.errors import MonitorError
from charllm.telemetry.schema import IDENTITY_COLUMNS


class ReplaySource:
    """Hands out the rows of a recording one per :meth:`read`, then raises StopIteration."""

    def __init__(self, data: str | Path | Any) -> None:
        import pandas as pd

        if isinstance(data, (str, Path)):
            try:
                df = pd.read_parquet(data)
            except (OSError, ValueError) as err:
                raise MonitorError(f"cannot read telemetry recording {data}: {err}") from err
        else:
            df = data
        if "unix_s" not in df.columns:
            raise MonitorError("telemetry recording has no unix_s column")
        df = df.sort_values("unix_s", kind="stable").reset_index(drop=True)
        first = df.iloc[0] if len(df) else None
        self.identity = {
            c: (first[c].item() if hasattr(first[c], "item") else first[c])
            for c in IDENTITY_COLUMNS
            if first is not None and c in df.columns
        }
        self._records = df.drop(columns=[c for c in IDENTITY_COLUMNS if c in df.columns]).to_dict("records")
        self._i = 0
        self.errors = 0
        self.unsupported: list[str] = []

    def __len__(self) -> int:
        return len(self._records)

    def read(self) -> dict[str, float]:
        if self._i >= len(self._records):
            raise StopIteration
        row = self._records[self._i]
        self._i += 1
        recorded = row.get("nvml_errors_total", math.nan)
        if recorded == recorded:
            self.errors = int(recorded)
        return {k: float(v) for k, v in row.items() if k != "nvml_errors_total"}

    def close(self) -> None:
        pass

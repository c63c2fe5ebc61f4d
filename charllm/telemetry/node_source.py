"""Node CPU utilisation and memory from /proc (Linux), read with each telemetry tick."""

from __future__ import annotations

import math
from pathlib import Path

NAN = math.nan


class NodeSource:
    """CPU busy share since the previous read, and memory in use (MemTotal - MemAvailable)."""

    def __init__(self, proc: str | Path = "/proc") -> None:
        self.proc = Path(proc)
        self.errors = 0
        self.unsupported: list[str] = []
        self._last: tuple[int, int] | None = self._cpu_times()

    def _cpu_times(self) -> tuple[int, int] | None:
        try:
            with open(self.proc / "stat") as f:
                parts = f.readline().split()
        except OSError:
            return None
        if not parts or parts[0] != "cpu":
            return None
        vals = [int(x) for x in parts[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals[:8]), idle  # user..steal; guest time is already in user

    def read(self) -> dict[str, float]:
        out = {"cpu_util_pct": NAN, "mem_used_bytes": NAN, "mem_total_bytes": NAN}
        now = self._cpu_times()
        if now is not None and self._last is not None:
            total, idle = now[0] - self._last[0], now[1] - self._last[1]
            if total > 0:
                out["cpu_util_pct"] = 100.0 * (total - idle) / total
        self._last = now
        try:
            info = {}
            with open(self.proc / "meminfo") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("MemTotal", "MemAvailable"):
                        info[key] = int(rest.split()[0]) * 1024
            out["mem_total_bytes"] = float(info["MemTotal"])
            out["mem_used_bytes"] = float(info["MemTotal"] - info["MemAvailable"])
        except (OSError, KeyError, ValueError):
            pass
        return out

    def close(self) -> None:
        pass

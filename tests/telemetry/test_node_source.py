"""Node CPU and memory from a /proc-like folder."""

from __future__ import annotations

import math
from pathlib import Path

from charllm.telemetry import NodeSource


def _write(proc: Path, user: int, idle: int) -> None:
    proc.joinpath("stat").write_text(f"cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    proc.joinpath("meminfo").write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    400 kB\n")


def test_cpu_share_between_reads_and_memory(tmp_path: Path) -> None:
    _write(tmp_path, user=100, idle=100)
    src = NodeSource(tmp_path)
    _write(tmp_path, user=175, idle=125)  # 75 busy of 100 ticks
    row = src.read()
    assert row["cpu_util_pct"] == 75.0
    assert row["mem_total_bytes"] == 1000 * 1024 and row["mem_used_bytes"] == 600 * 1024


def test_missing_proc_gives_nan(tmp_path: Path) -> None:
    row = NodeSource(tmp_path / "none").read()
    assert all(math.isnan(v) for v in row.values())


def test_real_proc_reads() -> None:
    row = NodeSource().read()
    assert row["mem_total_bytes"] > 0

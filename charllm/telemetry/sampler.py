"""A sampler thread: reads its sources at a fixed rate and keeps one row per tick.

The same :meth:`Sampler.sample_once` serves a live source (a thread calling it every
``1/hz`` seconds) and a :class:`~charllm.telemetry.replay.ReplaySource` (called in a loop
until the recording ends, by :meth:`Sampler.replay`), so the code above it runs the same on
recorded GPU data in CPU-only CI.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from charllm.telemetry.schema import ALL_COLUMNS, IDENTITY_COLUMNS


class Source(Protocol):
    errors: int
    unsupported: list[str]

    def read(self) -> dict[str, float]: ...

    def close(self) -> None: ...


class Sampler:
    """Rows of ``identity`` + every source's reading + ``unix_s`` at ``hz`` ticks per second."""

    def __init__(
        self,
        sources: Sequence[Source],
        hz: float = 20.0,
        identity: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        name: str = "telemetry",
    ) -> None:
        if not hz > 0:
            raise ValueError(f"sampling rate must be > 0 Hz, got {hz}")
        self.sources = list(sources)
        self.hz = float(hz)
        self.period_s = 1.0 / self.hz
        self.clock = clock
        self.identity: dict[str, Any] = {}
        for src in self.sources:
            self.identity.update(getattr(src, "identity", {}))
        self.identity.update(identity or {})
        self.rows: list[dict[str, Any]] = []
        self.missed_ticks = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._name = name

    @property
    def errors(self) -> int:
        return sum(src.errors for src in self.sources)

    def sample_once(self) -> dict[str, Any]:
        """Read every source once and keep the row. A source may set ``unix_s`` (replay)."""
        t0 = self.clock()
        row: dict[str, Any] = dict(self.identity)
        row["unix_s"] = t0
        for src in self.sources:
            row.update(src.read())
        row["read_latency_s"] = row.get("read_latency_s", self.clock() - t0)
        row["nvml_errors_total"] = float(self.errors)
        with self._lock:
            self.rows.append(row)
        return row

    def _run(self) -> None:
        next_t = self.clock()
        while not self._stop.is_set():
            self.sample_once()
            next_t += self.period_s
            now = self.clock()
            if now > next_t + self.period_s:
                # fell more than a tick behind (e.g. a stalled NVML call): skip, don't burst
                skipped = int((now - next_t) / self.period_s)
                self.missed_ticks += skipped
                next_t += skipped * self.period_s
            self._stop.wait(max(0.0, next_t - now))

    def start(self) -> Sampler:
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and take one last sample, so the rows bracket everything before."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.sample_once()

    def replay(self) -> int:
        """Drain a replay source through :meth:`sample_once`; returns the number of rows."""
        n = 0
        while True:
            try:
                self.sample_once()
            except StopIteration:
                return n
            n += 1

    def recent(self, column: str, seconds: float) -> tuple[list[float], list[float]]:
        """(unix_s, value) of the rows of the last ``seconds`` (for the warm-up criterion)."""
        with self._lock:
            if not self.rows:
                return [], []
            t_end = self.rows[-1]["unix_s"]
            ts, vs = [], []
            for row in reversed(self.rows):
                if row["unix_s"] < t_end - seconds:
                    break
                v = row.get(column, math.nan)
                if v == v:  # not NaN
                    ts.append(row["unix_s"])
                    vs.append(v)
        return ts[::-1], vs[::-1]

    def frame(self) -> Any:
        """The rows as a pandas DataFrame with the schema's columns (missing ones NaN)."""
        import pandas as pd

        with self._lock:
            rows = list(self.rows)
        df = pd.DataFrame(rows)
        for col in ALL_COLUMNS:
            if col not in df.columns:
                df[col] = "" if col in ("host", "gpu_uuid", "pci_bus_id") else math.nan
        extra = [c for c in df.columns if c not in ALL_COLUMNS]
        df = df[list(ALL_COLUMNS) + extra]
        for col in df.columns:
            if col in IDENTITY_COLUMNS:
                continue
            df[col] = df[col].astype("float64")
        return df

    def write_parquet(self, path: str | Path) -> Path:
        """Write the rows atomically (temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        # lz4: ~25 % faster to decode than snappy (docs/analysis.md)
        self.frame().to_parquet(tmp, index=False, compression="lz4")
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        self.stop()
        for src in self.sources:
            src.close()


def temperature_slope_c_per_s(ts: Sequence[float], temps: Sequence[float], min_span_s: float) -> float:
    """Least-squares slope of temperature over time; +inf while the rows span < ``min_span_s``.

    NaN when there are no temperature readings at all (no GPU telemetry): the caller treats
    that as "no thermal criterion", not as steady-state evidence.
    """
    if not ts:
        return math.nan
    if len(ts) < 2 or ts[-1] - ts[0] < min_span_s:
        return math.inf
    n = len(ts)
    mt, mv = sum(ts) / n, sum(temps) / n
    sxx = sum((t - mt) ** 2 for t in ts)
    sxy = sum((t - mt) * (v - mv) for t, v in zip(ts, temps, strict=True))
    return sxy / sxx if sxx > 0 else 0.0

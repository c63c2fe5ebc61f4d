"""Upstream Zeus over the measured steps: one ``ZeusMonitor`` window per rank.

Zeus covers window energy: the GPU's energy counter (NVML on NVIDIA) and, where the node
exposes RAPL, CPU package and DRAM energy, which our NVML sampler cannot see. The sampler
still gives the time series (every metric at 20 Hz); this window gives Zeus's own totals for
the same steps, so every cell carries an independent energy figure from upstream code.

``mode``: ``auto`` uses Zeus when it imports and there is an energy counter for it to read (a
GPU, or RAPL on the node leader), and says why not otherwise; ``on`` fails loudly
(:class:`MonitorError`, with how to fix it) when it cannot; ``off`` does nothing. CPU and DRAM
energy are read by the first rank of each node only, so summing ranks counts each node once.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from charllm.telemetry.errors import MonitorError

ZEUS_MODES = ("auto", "on", "off")
NAN = math.nan
WINDOW = "charllm-measure"


RAPL_ROOT = Path("/sys/class/powercap")


def rapl_readable(root: Path = RAPL_ROOT) -> bool:
    """Whether this node exposes an Intel RAPL package energy counter Zeus could read."""
    try:
        return any(
            (d / "energy_uj").is_file() and os.access(d / "energy_uj", os.R_OK) for d in root.glob("intel-rapl:*")
        )
    except OSError:
        return False


class ZeusWindow:
    """Begin/end one Zeus measurement window; :meth:`end` returns the totals in joules."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor
        self.open = False

    @classmethod
    def create(cls, mode: str, gpu_index: int | None, node_leader: bool) -> tuple[ZeusWindow | None, str]:
        """A window for this rank, or None and the reason (``auto``/``off``)."""
        if mode not in ZEUS_MODES:
            raise MonitorError(f"telemetry.zeus must be one of {', '.join(ZEUS_MODES)}, got {mode!r}")
        if mode == "off":
            return None, "off"
        if mode == "auto" and gpu_index is None and not (node_leader and rapl_readable()):
            # a CPU rank with no RAPL counters: Zeus would measure time only (and importing its
            # monitor costs ~2 s of scikit-learn per rank); telemetry.zeus: on forces it
            return None, "skipped: no GPU and no readable RAPL counters for Zeus to measure"
        try:
            import zeus
            from zeus.monitor import ZeusMonitor
        except ImportError as err:
            if mode == "on":
                raise MonitorError(
                    f"telemetry.zeus is 'on' but zeus does not import ({err}); install it in the training "
                    "environment (pip install zeus==0.16.0, in charllm's train extra and the GPU cluster "
                    "profiles' train_packages) or set telemetry.zeus to auto/off"
                ) from err
            return None, f"zeus not installed ({err})"
        try:
            monitor = ZeusMonitor(
                gpu_indices=[] if gpu_index is None else [gpu_index],
                cpu_indices=None if node_leader else [],
            )
        except Exception as err:  # zeus raises its own and NVML's errors here; a failure is a reason, not a crash
            if mode == "on":
                raise MonitorError(f"telemetry.zeus is 'on' but ZeusMonitor failed: {err}") from err
            return None, f"ZeusMonitor failed: {type(err).__name__}: {err}"
        return cls(monitor), f"zeus {getattr(zeus, '__version__', '?')}"

    def begin(self) -> None:
        self.monitor.begin_window(WINDOW)
        self.open = True

    def end(self) -> dict[str, float]:
        """Close the window: ``zeus_window_s`` and the GPU, CPU and DRAM energies (NaN where none)."""
        if not self.open:
            return {}
        self.open = False
        m = self.monitor.end_window(WINDOW)
        gpu = sum(m.gpu_energy.values()) if m.gpu_energy else NAN
        cpu = sum(m.cpu_energy.values()) if m.cpu_energy else NAN
        dram = sum(m.dram_energy.values()) if m.dram_energy else NAN
        return {"zeus_window_s": float(m.time), "zeus_gpu_energy_j": gpu, "zeus_cpu_energy_j": cpu,
                "zeus_dram_energy_j": dram}  # fmt: skip


def combine_zeus(per_rank: list[dict[str, float]], sampled_gpu_energy_j: float | None) -> dict[str, float]:
    """Cell totals: energies summed over ranks (NaN if no rank had one), the longest window."""
    rows = [r for r in per_rank if r]
    if not rows:
        return {}
    out: dict[str, float] = {"zeus_window_s": max(r["zeus_window_s"] for r in rows)}
    for key in ("zeus_gpu_energy_j", "zeus_cpu_energy_j", "zeus_dram_energy_j"):
        vals = [r[key] for r in rows if not math.isnan(r.get(key, NAN))]
        out[key] = float(sum(vals)) if vals else NAN
    gpu = out["zeus_gpu_energy_j"]
    if sampled_gpu_energy_j and not math.isnan(gpu) and not math.isnan(sampled_gpu_energy_j):
        out["zeus_over_sampled"] = gpu / sampled_gpu_energy_j
    return out

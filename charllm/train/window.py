"""The adaptive measurement window: stop measuring once the step time is known well enough.

``opt.window: adaptive`` (campaign ``window: adaptive``): after each measured step the job asks
:func:`should_stop`; measuring ends when

- the median step time's 95 % confidence half-width is at most ``rel_ci`` (1 %) of the
  median, and
- the measured window (the energy integration window) is at least ``min_energy_s`` (10 s:
  NVML's energy counter updates every 100 ms, so 10 s keeps its quantisation under 1 %), and
- at least ``min_steps`` (5) steps were measured;

and in any case after the cell's ``steps`` (the cap: the fixed window). Pure Python, no torch:
the job calls it per step and the tests replay recorded step logs through it.

The half-width uses the large-sample standard error of a median, ``1.2533 * sigma / sqrt(n)``,
with sigma estimated robustly from the median absolute deviation (``1.4826 * MAD``, so one
slow step does not stop or prolong the window by itself), and Student's t quantile for n - 1
degrees of freedom.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

REL_CI = 0.01
MIN_ENERGY_S = 10.0
MIN_STEPS = 5
WINDOW_MODES = ("fixed", "adaptive")

# two-sided 95 % Student t quantiles by degrees of freedom (1..30); beyond: the normal 1.96
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t95(dof: int) -> float:
    if dof < 1:
        return math.inf
    return _T95[dof - 1] if dof <= len(_T95) else 1.96


def median_ci_half_width_rel(durations_s: Sequence[float]) -> float:
    """95 % half-width of the median step time over the median (inf below 3 steps)."""
    n = len(durations_s)
    if n < 3:
        return math.inf
    med = statistics.median(durations_s)
    if med <= 0:
        return math.inf
    mad = statistics.median(abs(d - med) for d in durations_s)
    sigma = 1.4826 * mad
    return t95(n - 1) * 1.2533 * sigma / math.sqrt(n) / med


@dataclass(frozen=True)
class WindowDecision:
    stop: bool
    reason: str  # ci+energy | cap | continue
    measured_steps: int
    ci_half_width_rel: float
    window_s: float


def should_stop(
    durations_s: Sequence[float],
    window_s: float,
    cap_steps: int,
    *,
    rel_ci: float = REL_CI,
    min_energy_s: float = MIN_ENERGY_S,
    min_steps: int = MIN_STEPS,
) -> WindowDecision:
    """Whether the adaptive window ends after the steps measured so far."""
    n = len(durations_s)
    ci = median_ci_half_width_rel(durations_s)
    if n >= cap_steps:
        return WindowDecision(True, "cap", n, ci, window_s)
    if n >= min_steps and window_s >= min_energy_s and ci <= rel_ci:
        return WindowDecision(True, "ci+energy", n, ci, window_s)
    return WindowDecision(False, "continue", n, ci, window_s)


def replay(durations_s: Sequence[float], cap_steps: int | None = None, **kw: Any) -> WindowDecision:
    """Run the rule over a recorded sequence of measured steps; the decision where it stops."""
    cap = len(durations_s) if cap_steps is None else min(cap_steps, len(durations_s))
    window = 0.0
    for i, d in enumerate(durations_s[:cap], 1):
        window += d
        dec = should_stop(durations_s[:i], window, cap, **kw)
        if dec.stop:
            return dec
    return WindowDecision(True, "cap", cap, median_ci_half_width_rel(durations_s[:cap]), window)


def record(dec: WindowDecision, mode: str) -> dict[str, Any]:
    """The provenance entry (``provenance.measure_window``)."""
    return {
        "mode": mode,
        **asdict(dec),
        "rule": f"median 95 % CI half-width <= {REL_CI:.0%} and window >= {MIN_ENERGY_S:g} s and >= {MIN_STEPS} "
        "steps, capped at the cell's steps",
    }

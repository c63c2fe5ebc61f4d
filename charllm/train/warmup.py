"""When to stop warming up: step time steady and GPU temperature flat, or a step budget.

Pure (no torch): fed one step at a time with numbers that are identical on every rank
(the max over ranks of step time and of the temperature slope), so every rank takes the
same decision without another collective.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from charllm.train.cell import WarmupSpec


@dataclass
class WarmupMonitor:
    spec: WarmupSpec
    step_times_s: list[float] = field(default_factory=list)
    last_cv: float = math.nan
    last_slope_c_per_s: float = math.nan
    converged: bool = False
    done: bool = False
    reason: str = ""

    def update(self, step_time_s: float, temp_slope_c_per_s: float) -> bool:
        """Record one warm-up step; True once the warm-up is over (then stays True)."""
        if self.done:
            return True
        s = self.spec
        self.step_times_s.append(step_time_s)
        self.last_slope_c_per_s = temp_slope_c_per_s
        n = len(self.step_times_s)
        window = self.step_times_s[-s.cv_window_steps :]
        if len(window) >= s.cv_window_steps:
            mean = statistics.fmean(window)
            self.last_cv = statistics.stdev(window) / mean if mean > 0 else math.inf
        time_ok = self.last_cv <= s.step_time_cv
        # NaN slope: no GPU temperature at all (CPU run); the thermal criterion does not apply
        temp_ok = math.isnan(temp_slope_c_per_s) or abs(temp_slope_c_per_s) <= s.temp_slope_c_per_s
        if n >= s.min_steps and time_ok and temp_ok:
            self.done, self.converged, self.reason = True, True, "steady"
        elif n >= s.max_steps:
            self.done, self.reason = True, "max_steps"
        return self.done

    def record(self) -> dict[str, Any]:
        """What result.json says about the warm-up: criteria, steps taken, final values."""
        s = self.spec
        return {
            "criteria": {
                "min_steps": s.min_steps,
                "max_steps": s.max_steps,
                "step_time_cv": s.step_time_cv,
                "cv_window_steps": s.cv_window_steps,
                "temp_slope_c_per_s": s.temp_slope_c_per_s,
                "temp_window_s": s.temp_window_s,
            },
            "steps": len(self.step_times_s),
            "converged": self.converged,
            "reason": self.reason or ("no_warmup" if s.max_steps == 0 else ""),
            "final_step_time_cv": None if math.isnan(self.last_cv) else self.last_cv,
            "final_temp_slope_c_per_s": None
            if math.isnan(self.last_slope_c_per_s) or math.isinf(self.last_slope_c_per_s)
            else self.last_slope_c_per_s,
            "thermal_criterion": "n/a (no GPU telemetry)"
            if math.isnan(self.last_slope_c_per_s)
            else "max over GPUs of |d gpu_temp_c / dt| over the last temp_window_s",
        }

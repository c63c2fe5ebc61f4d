"""GPU and node telemetry: NVML sampler threads, a replay source, and window summaries.

Layering: :mod:`schema` (columns) <- sources (:mod:`nvml_source`, :mod:`node_source`,
:mod:`replay`) <- :mod:`sampler` <- :mod:`summary` (pure numpy over a window). Nothing here
imports torch at module level, pydantic or Airflow.
"""

from __future__ import annotations

from charllm.telemetry.errors import MonitorError
from charllm.telemetry.node_source import NodeSource
from charllm.telemetry.replay import ReplaySource
from charllm.telemetry.sampler import Sampler, temperature_slope_c_per_s
from charllm.telemetry.summary import combine, gpu_window_summary

__all__ = [
    "MonitorError",
    "NodeSource",
    "ReplaySource",
    "Sampler",
    "combine",
    "gpu_window_summary",
    "temperature_slope_c_per_s",
]

"""Errors of the telemetry package."""

from __future__ import annotations


class MonitorError(Exception):
    """Telemetry was asked for explicitly and cannot be given (no NVML, no such GPU, bad file)."""

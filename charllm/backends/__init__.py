"""Execution backends: where a rendered job script runs (local subprocess, Slurm over SSH)."""

from __future__ import annotations

from typing import Any

from charllm.backends.base import Backend, JobHandle, JobIdentity, JobSpec, JobState, JobStatus
from charllm.errors import ConfigError

__all__ = ["Backend", "JobHandle", "JobIdentity", "JobSpec", "JobState", "JobStatus", "make_backend"]


def make_backend(spec: dict[str, Any]) -> Backend:
    """Build a backend from its serialisable spec (``{"kind": "local", ...}``)."""
    kind = spec.get("kind")
    if kind == "local":
        from charllm.backends.local import LocalBackend

        return LocalBackend.from_spec(spec)
    if kind == "slurm":
        from charllm.backends.slurm import SlurmBackend

        return SlurmBackend.from_spec(spec)
    raise ConfigError("<backend spec>", "kind", f"unknown backend kind {kind!r}")

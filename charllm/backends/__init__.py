"""Execution backends: where a rendered job script runs (local subprocess, Slurm through a transport).

Backends are found by kind in one registry: :func:`make_backend` (specs, triggers), the
campaign schema (``backend:``) and the runner (:meth:`Backend.spec_for`) all read it. A new
backend registers itself with :func:`register_backend`; nothing else needs an edit.
"""

from __future__ import annotations

import importlib
from typing import Any

from charllm.backends.base import Backend, JobHandle, JobIdentity, JobSpec, JobState, JobStatus
from charllm.errors import ConfigError

__all__ = [
    "Backend",
    "JobHandle",
    "JobIdentity",
    "JobSpec",
    "JobState",
    "JobStatus",
    "backend_class",
    "backend_kinds",
    "make_backend",
    "register_backend",
    "unregister_backend",
]

# kind -> the class, or "module:Class" imported on first use (DAG files stay cheap to parse)
_REGISTRY: dict[str, type[Backend] | str] = {
    "local": "charllm.backends.local:LocalBackend",
    "slurm": "charllm.backends.slurm:SlurmBackend",
}


def register_backend(kind: str, backend: type[Backend] | str) -> None:
    """Make ``kind`` a backend campaigns can name: a :class:`Backend` subclass or ``"module:Class"``."""
    if not kind.isidentifier():
        raise ValueError(f"backend kind {kind!r} must be an identifier")
    _REGISTRY[kind] = backend


def backend_kinds() -> list[str]:
    return sorted(_REGISTRY)


def backend_class(kind: object, where: str = "<backend spec>", field: str = "kind") -> type[Backend]:
    """The class registered for ``kind``; a ConfigError naming ``where`` and ``field`` if none is."""
    entry = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if entry is None:
        raise ConfigError(where, field, f"unknown backend kind {kind!r} (known: {', '.join(backend_kinds())})")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = _REGISTRY[str(kind)] = getattr(importlib.import_module(module), attr)
    return entry


def make_backend(spec: dict[str, Any]) -> Backend:
    """Build a backend from its serialisable spec (``{"kind": "local", ...}``)."""
    return backend_class(spec.get("kind")).from_spec(spec)


def unregister_backend(kind: str) -> None:
    """Forget ``kind`` (tests that register a toy backend)."""
    _REGISTRY.pop(kind, None)

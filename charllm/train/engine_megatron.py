"""Placeholder for a megatron-core engine (optional, lower priority than the torch engine).

Selecting ``engine: megatron`` fails with a message that says what is missing, rather than
silently running the torch engine under a different name.
"""

from __future__ import annotations

from typing import Any

from charllm.train.errors import EngineUnavailableError


def build(cell: Any, denv: Any, device: Any) -> Any:
    try:
        import megatron.core  # noqa: F401
    except ImportError as err:
        raise EngineUnavailableError(
            "engine 'megatron' needs megatron-core (pip install megatron-core) on the compute nodes; "
            "or set engine: torch"
        ) from err
    raise EngineUnavailableError(
        "engine 'megatron' is not implemented yet in charllm (megatron-core is installed); use engine: torch"
    )

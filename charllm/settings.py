"""Run-time settings of the lifecycle: an environment variable, else the cluster profile's field, else a default.

Light on purpose (no SQLAlchemy, no Airflow): the DAG factory reads ``max_jobs_in_flight``
while Airflow parses the DAG file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from charllm.errors import ConfigError

T = TypeVar("T")


def setting(name: str, cluster: Any, default: T, kind: Callable[[Any], T]) -> T:
    """``CHARLLM_<NAME>`` from the environment, else the cluster profile's ``name``, else ``default``."""
    env = os.environ.get(f"CHARLLM_{name.upper()}")
    if env not in (None, ""):
        try:
            return kind(env)
        except ValueError as err:
            raise ConfigError(f"$CHARLLM_{name.upper()}", name, f"not a valid value: {env!r}") from err
    value = getattr(cluster, name, None)
    return kind(value) if value is not None else default

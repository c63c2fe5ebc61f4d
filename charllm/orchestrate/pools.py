"""One Airflow pool per cluster profile that limits its jobs in flight.

A cluster profile with ``max_jobs_in_flight: N`` puts the ``submit`` and ``wait`` tasks of
every campaign on it into the pool ``charllm_<cluster>`` of N slots with ``include_deferred``
(a deferred ``wait`` keeps its slot while its job is in flight), so the scheduler itself keeps
a 10,000-cell campaign from flooding a shared queue. The catalog enforces the same limit across
DAG runs and ``charllm run`` (:meth:`charllm.catalog.Catalog.reserve`), so a missing or wrong
pool never lets more jobs out; the pool only saves the scheduler from starting tasks that would
wait.

Airflow tasks cannot create pools (Airflow 3 gives task code no metadata access), so they are
made where the metadata database is: ``python -m charllm.orchestrate.pools`` (``make
airflow-init`` runs it after ``airflow db migrate``) creates or updates the pool of every
cluster profile the campaigns use. A task whose pool does not exist is never scheduled, so run
it after adding or changing a limit.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

POOL_PREFIX = "charllm_"


def pool_name(cluster_name: str) -> str:
    return f"{POOL_PREFIX}{cluster_name}"


def max_jobs_in_flight(cluster: Any) -> int | None:
    """The cluster's limit: ``CHARLLM_MAX_JOBS_IN_FLIGHT``, else the profile's ``max_jobs_in_flight``, if any.

    The same setting the catalog enforces (:attr:`charllm.runner.CampaignRunner.max_in_flight`).
    """
    from charllm.settings import setting

    value = setting("max_jobs_in_flight", cluster, 0, int)
    return value if value > 0 else None


def pool_for(cluster: Any) -> str | None:
    """The pool a cluster's cell tasks run in: only where its profile limits jobs in flight."""
    return pool_name(cluster.name) if max_jobs_in_flight(cluster) else None


def wanted_pools(campaigns: Path | None = None) -> dict[str, int]:
    """Pool name -> slots, for every cluster profile with a limit that a campaign file uses."""
    from charllm.campaign import discover, load_campaign
    from charllm.errors import ConfigError
    from charllm.paths import campaigns_dir

    pools: dict[str, int] = {}
    for path in discover(campaigns or campaigns_dir()):
        try:
            lc = load_campaign(path)
        except ConfigError as err:
            log.warning("skipping %s: %s", path, err)
            continue
        limit = max_jobs_in_flight(lc.cluster)
        if limit:
            name = pool_name(lc.cluster.name)
            pools[name] = min(pools.get(name, limit), limit)
    return pools


def sync_pools(campaigns: Path | None = None) -> dict[str, int]:
    """Create or update the pools in Airflow's metadata database (run where it is reachable)."""
    from airflow.models.pool import Pool

    pools = wanted_pools(campaigns)
    for name, slots in pools.items():
        Pool.create_or_update_pool(
            name,
            slots,
            f"charllm: jobs in flight on cluster {name.removeprefix(POOL_PREFIX)} (max_jobs_in_flight)",
            include_deferred=True,
        )
        log.info("pool %s: %d slot(s), deferred tasks included", name, slots)
    return pools


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = argv if argv is not None else sys.argv[1:]
    pools = sync_pools(Path(args[0]) if args else None)
    print(f"charllm: {len(pools)} pool(s) in Airflow: {pools}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

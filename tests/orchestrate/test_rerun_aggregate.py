"""A cell rerun after its DAG run's ``aggregate`` ran updates the tables itself (and tells the figures DAG).

Clearing a cell's task group in the UI does not clear ``aggregate`` (it is downstream of the
group, and a group's clear does not include downstream tasks): without this the tables missed
the rerun cell until ``aggregate`` was cleared on its own.
"""

from __future__ import annotations

from typing import Any

import pytest

from charllm.orchestrate import factory


class _Events(dict):
    def __missing__(self, key: Any) -> Any:
        self[key] = _Alias()
        return self[key]


class _Alias:
    def __init__(self) -> None:
        self.added: list[tuple[Any, dict]] = []

    def add(self, asset: Any, extra: dict | None = None) -> None:
        self.added.append((asset, extra or {}))


class _Ti:
    dag_id = "charllm_demo"

    def __init__(self, state: str | None) -> None:
        self.state = state

    def get_task_states(self, dag_id: str, task_ids: list[str], run_ids: list[str]) -> dict:
        assert task_ids == ["aggregate"]
        return {run_ids[0]: {"aggregate": self.state}} if self.state else {run_ids[0]: {}}


@pytest.mark.parametrize(
    ("state", "aggregated"), [(None, False), ("scheduled", False), ("success", True), ("failed", True)]
)
def test_collect_after_aggregate_updates_the_tables(monkeypatch, state, aggregated):
    calls: list[str] = []

    class _Runner:
        def aggregate(self) -> dict:
            calls.append("aggregate")
            return {"rows": 6, "outcomes": {"ok": 6}}

    events = _Events()
    ctx = {"ti": _Ti(state), "run_id": "manual__1", "outlet_events": events}
    monkeypatch.setattr(factory, "get_current_context", lambda: ctx)
    monkeypatch.setattr(factory, "runner_for", lambda src: _Runner())
    tables = factory.tables_asset("demo")
    alias = factory.AssetAlias(name="charllm_tables_rerun_demo")
    factory.reaggregate_after_rerun("demo.yaml", tables, alias)
    assert calls == (["aggregate"] if aggregated else [])
    added = events[alias].added if alias in events else []
    assert [(a.name, e["run_id"]) for a, e in added] == ([(tables.name, "manual__1")] if aggregated else [])

"""A replayed campaign: the recorded GPU runs of tests/data/gpu committed as cell attempts.

The attempts go through the real results store (``charllm.store.commit_attempt``) and the
real catalog, as the runner's collect step would put them there. Recorded runs:

- ``h100-gpt3-1.3b``: GPT-3 1.3B on one H100 (kernel breakdown) -> the four codes at mb 8,
  mb 16 at 01000, and two more repeats of the 01000 cell on later nights (drift);
- ``h200x2-fsdp-zero2``: 2 x H200, FSDP -> the TP1+FSDP cell; its host is renamed to
  ``h200-node`` in the copy, so that the heatmaps see two hosts;
- ``h100-gpt3-125m``: GPT-3 125M on one H100 -> a second model;
- ``oom``: the recorded out-of-memory result -> the mb 32 cell.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from charllm.backends.base import JobIdentity
from charllm.campaign import LoadedCampaign, load_campaign
from charllm.catalog import Catalog
from charllm.store import commit_attempt, read_result

REPO = Path(__file__).resolve().parents[2]
RECORDED = REPO / "tests" / "data" / "gpu"

CAMPAIGN = """
name: replay
cluster: {name: replay, gpu_type: h100, gpus_per_node: 2, nodes: 1}
model: gpt3-1.3b
precision: bf16
profile_kernels: true
references:
  - {metric: energy_counter_ratio, value: 1.0, lower: 0.95, upper: 1.05, unit: ratio}
  - {metric: peak_gpu_temp_c, value: 60.0, lower: 0.0, upper: 65.0, unit: C, cells: "gpt3-1.3b-tp1pp1dp1-*"}
sweep:
  dp: [1]
  micro_batch: [8]
  global_batch: [32]
  seq_len: [2048]
  opt_code: ["00000", "10000", "01000", "11000"]
include:
  - {dp: 2, fsdp: true, global_batch: 64, opt_code: "01000"}
  - {micro_batch: 16, opt_code: "01000"}
  - {micro_batch: 32, opt_code: "01000"}
  - {model: gpt3-125m, seq_len: 1024, global_batch: 16, opt_code: "01000"}
"""

SOURCES = {
    "gpt3-1.3b-tp1pp1dp1-mb8-gb32-s2048-00000": "h100-gpt3-1.3b",
    "gpt3-1.3b-tp1pp1dp1-mb8-gb32-s2048-10000": "h100-gpt3-1.3b",
    "gpt3-1.3b-tp1pp1dp1-mb8-gb32-s2048-01000": "h100-gpt3-1.3b",
    "gpt3-1.3b-tp1pp1dp1-mb8-gb32-s2048-11000": "h100-gpt3-1.3b",
    "gpt3-1.3b-tp1pp1dp2-fsdp-mb8-gb64-s2048-01000": "h200x2-fsdp-zero2",
    "gpt3-1.3b-tp1pp1dp1-mb16-gb32-s2048-01000": "h100-gpt3-1.3b",
    "gpt3-1.3b-tp1pp1dp1-mb32-gb32-s2048-01000": "oom",
    "gpt3-125m-tp1pp1dp1-mb8-gb16-s1024-01000": "h100-gpt3-125m",
}
DRIFT_CELL = "gpt3-1.3b-tp1pp1dp1-mb8-gb32-s2048-01000"
NIGHTS = ("2026-03-01T02:00:00+00:00", "2026-03-02T02:00:00+00:00", "2026-03-03T02:00:00+00:00")
RENAMED_HOST = "h200-node"


def _copy_recorded(src: Path, dest: Path, host: str | None) -> None:
    out = dest / "out"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("cell.json"))
    shutil.copy2(src / "cell.json", dest / "cell.json")
    if host:
        for p in (out / "telemetry").glob("rank*.parquet"):
            t = pq.read_table(p)
            i = t.column_names.index("host")
            t = t.set_column(i, "host", pa.array([host] * t.num_rows, pa.string()))
            pq.write_table(t, p)


@dataclass
class Replay:
    home: Path
    include: Path
    lc: LoadedCampaign
    catalog: Catalog

    def cell(self, name: str):
        return next(c for c in self.lc.cells if c.name == name)

    def commit(
        self,
        name: str,
        repeat: int,
        monkeypatch: pytest.MonkeyPatch,
        when: str | None = None,
        source: str | None = None,
    ) -> Path:
        """Commit one attempt of cell ``name`` from its recorded run (as the runner's collect does)."""
        cell = self.cell(name)
        src = source or SOURCES[name]
        attempt = self.catalog.new_attempt(cell.cell_id, repeat, self.lc.name, "local", "replay")
        ident = JobIdentity(self.lc.name, cell.cell_id, repeat, attempt)
        host = RENAMED_HOST if src == "h200x2-fsdp-zero2" else None

        def classify(d: Path):
            r = read_result(d)
            return r["outcome"], r, str(r.get("error") or "")

        fields = {
            "campaign": self.lc.name,
            "cell_id": cell.cell_id,
            "cell_name": cell.name,
            "cell": cell.model_dump(mode="json"),
            "backend": "local",
            "job_id": f"{src}-{repeat}-{attempt}",
            "job_state": "COMPLETED",
            "exit_code": 0,
            "nodes": "vm",
            "elapsed_s": 1.0,
        }
        if when:
            monkeypatch.setattr("charllm.store.now_iso", lambda: when)
        final, manifest = commit_attempt(
            self.home, ident, lambda d: _copy_recorded(RECORDED / src, d, host), fields, classify
        )
        if when:
            monkeypatch.undo()
        self.catalog.update_attempt(
            cell.cell_id, repeat, attempt, state="ended", outcome=manifest["outcome"], result_dir=str(final)
        )
        return final


def build_replay(root: Path, mp: pytest.MonkeyPatch) -> Replay:
    home = root / "home"
    include = root / "include"
    (include / "campaigns").mkdir(parents=True)
    (include / "clusters").mkdir()
    path = include / "campaigns" / "replay.yaml"
    path.write_text(CAMPAIGN)
    mp.setenv("CHARLLM_HOME", str(home))
    mp.setenv("CHARLLM_INCLUDE", str(include))
    mp.delenv("CHARLLM_CATALOG_URL", raising=False)
    lc = load_campaign(path)
    catalog = Catalog(f"sqlite:///{home / 'catalog.db'}")
    catalog.register(lc.name, str(path), [(c.cell_id, c.name, c.model_dump(mode="json")) for c in lc.cells])
    rp = Replay(home, include, lc, catalog)
    with pytest.MonkeyPatch.context() as clock:
        for name in SOURCES:
            rp.commit(name, 0, clock, when=NIGHTS[0] if name == DRIFT_CELL else None)
        for rep, night in enumerate(NIGHTS[1:], start=1):
            rp.commit(DRIFT_CELL, rep, clock, when=night)
    return rp


@pytest.fixture
def replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Replay:
    """A fresh replayed campaign (tests that add attempts use this one)."""
    return build_replay(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def replay_module(tmp_path_factory: pytest.TempPathFactory):
    """One replayed campaign, aggregated, shared by the read-only tests of a module."""
    from charllm.analysis.aggregate import aggregate

    root = tmp_path_factory.mktemp("replay")
    with pytest.MonkeyPatch.context() as mp:
        rp = build_replay(root, mp)
        info = aggregate(rp.catalog, rp.lc.name, rp.home / "tables" / rp.lc.name)
        yield rp, info

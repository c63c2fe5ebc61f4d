"""The extension points of docs/extending.md, used the way a newcomer would: nothing else is edited.

A toy third backend (jobs that end the moment they are submitted, with the outputs a small
measured run writes) is registered here and carries a campaign through plan, submit, judge
and collect; a toy figure is registered here and drawn by ``draw_all`` where its data fits.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from charllm import backends
from charllm.analysis import figures
from charllm.backends import make_backend, register_backend, unregister_backend
from charllm.backends.base import Backend, BackendCapabilities, JobHandle, JobIdentity, JobSpec, JobState, JobStatus
from charllm.campaign import LoadedCampaign, load_campaign
from charllm.catalog import Catalog
from charllm.errors import ConfigError
from charllm.outcomes import Action, Outcome
from charllm.runner import CampaignRunner
from tests.fake_slurm.fake_slurm import STEPS


class ToyBackend(Backend):
    """Jobs on no cluster at all: each ends COMPLETED at once with a valid result (the fake Slurm's)."""

    name = "toy"
    capabilities = BackendCapabilities(runs_here=True)

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ToyBackend:
        return cls(spec["root"])

    @classmethod
    def spec_for(cls, lc: LoadedCampaign, home: Path) -> dict[str, Any]:
        return {"kind": "toy", "root": str(home / "toy-cluster")}

    def spec(self) -> dict[str, Any]:
        return {"kind": "toy", "root": str(self.root)}

    def job_dir(self, identity: JobIdentity) -> str:
        return str(self.root / identity.relpath)

    def find(self, identity: JobIdentity) -> JobHandle | None:
        jobid = Path(self.job_dir(identity)) / "jobid"
        return JobHandle(self.name, jobid.read_text(), str(jobid.parent), identity) if jobid.exists() else None

    def submit(self, spec: JobSpec) -> JobHandle:
        found = self.find(spec.identity)
        if found is not None:
            return found
        wd = Path(self.job_dir(spec.identity))
        (wd / "out").mkdir(parents=True)
        (wd / "job.sbatch").write_text(spec.script)
        result = {"outcome": "ok", "error": None, "metrics": {"tokens_per_s": 1000.0, "step_time_median_s": 0.064}}
        (wd / "out" / "result.json").write_text(json.dumps(result))
        (wd / "out" / "steps.csv").write_text(STEPS)
        (wd / "stdout.log").write_text("toy job\n")
        job_id = str(len(list(self.root.rglob("jobid"))) + 1)
        (wd / "jobid").write_text(job_id)
        return JobHandle(self.name, job_id, str(wd), spec.identity)

    def statuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        known = {p.read_text() for p in self.root.rglob("jobid")}
        return {j: JobStatus(j, JobState.COMPLETED if j in known else JobState.LOST, 0) for j in job_ids}

    def cancel(self, job_id: str) -> None:
        return None

    def fetch(self, handle: JobHandle, dest: Path) -> None:
        shutil.copytree(handle.workdir, dest, dirs_exist_ok=True)

    def tail(self, handle: JobHandle, n_bytes: int = 4000, tries: int | None = None) -> tuple[str, str]:
        out = Path(handle.workdir) / "stdout.log"
        return (out.read_text()[-n_bytes:] if out.exists() else "", "")


@pytest.fixture
def toy_backend() -> Iterator[None]:
    register_backend("toy", ToyBackend)
    try:
        yield
    finally:
        unregister_backend("toy")


def _campaign(include: Path, backend: str) -> Path:
    data = yaml.safe_load((include / "campaigns" / "demo.yaml").read_text())
    data.update(name="toy", backend=backend, schedule=None, nightly=None)
    data["sweep"] = {"dp": [1], "micro_batch": [2], "global_batch": [8], "seq_len": [64]}
    data.pop("include", None)
    path = include / "campaigns" / "toy.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
    return path


def test_a_toy_backend_registered_here_runs_a_campaign(toy_backend, include_tmp, charllm_home):
    assert "toy" in backends.backend_kinds()
    runner = CampaignRunner.from_file(_campaign(include_tmp, "toy"), catalog=Catalog())
    assert isinstance(runner.backend, ToyBackend) and runner.data_home == charllm_home  # runs_here
    assert make_backend(runner.backend.spec()).spec() == runner.backend.spec()  # what a trigger rebuilds
    (item,) = runner.plan()
    sub = runner.submit_or_reattach(item["cell_id"], item["repeat"], "r1")
    assert sub.handle is not None and sub.handle.backend == "toy"
    status = runner.backend.statuses([sub.handle.job_id])[sub.handle.job_id]
    verdict = runner.on_end(sub.handle, status, "r1")
    assert (verdict.outcome, verdict.action) == (Outcome.OK, Action.FINISHED)
    summary = runner.finish(sub.handle, status)
    print("toy backend:", summary)
    assert summary["outcome"] == "ok" and (Path(summary["result_dir"]) / "out" / "result.json").exists()
    # submitting the cell repeat again finds its result: nothing runs twice
    assert runner.submit_or_reattach(item["cell_id"], item["repeat"], "r2").kind == "done"


def test_an_unknown_backend_is_refused_naming_file_field_and_the_known_kinds(include_tmp):
    path = _campaign(include_tmp, "toy")  # not registered in this test
    with pytest.raises(ConfigError) as err:
        load_campaign(path)
    print(err.value)
    assert "toy.yaml" in str(err.value) and "backend" in str(err.value) and "'slurm'" in str(err.value)


def test_a_toy_figure_registered_here_is_drawn_where_it_applies(tmp_path, monkeypatch):
    builtin = list(figures.load_figure_modules())
    assert builtin[:2] == ["throughput", "loss"] and "pareto" in builtin and "scaling" in builtin
    # this test's registration stays here; the built-in figures are left out to keep it fast
    monkeypatch.setattr(figures, "FIGURES", {})

    def draw(d: figures.FigureData) -> list[Path]:
        p = d.out_dir / "toy_outcomes.csv"
        d.cells.groupby("outcome").size().rename("cells").to_csv(p)
        return [p]

    figures.register_figure("toy_outcomes", lambda d: "oom" in set(d.cells["outcome"]), draw)
    cells = pd.DataFrame(
        {
            "cell_id": ["a", "b"],
            "cell_name": ["tiny-a", "tiny-b"],
            "repeat": [0, 0],
            "model": ["tiny", "tiny"],
            "layout": ["tp1pp1dp1", "tp1pp1dp1"],
            "micro_batch": [2, 4],
            "opt_code": ["00000", "00000"],
            "outcome": ["ok", "oom"],
            "tokens_per_s": [1000.0, float("nan")],
        }
    )
    common: dict[str, Any] = {"gpus": pd.DataFrame(), "kernels": pd.DataFrame(), "references": [], "schedule": ""}
    paths = figures.draw_all(cells, pd.DataFrame(), tmp_path / "a", "toy", report=False, **common)
    names = sorted(p.name for p in paths)
    print("drawn:", names)
    assert names == ["toy_outcomes.csv"]
    assert (tmp_path / "a" / "toy_outcomes.csv").read_text().splitlines() == ["outcome,cells", "ok,1", "oom,1"]
    only_ok = figures.draw_all(cells.iloc[:1], pd.DataFrame(), tmp_path / "b", "toy", report=False, **common)
    assert "toy_outcomes.csv" not in {p.name for p in only_ok}  # applies_to said no

"""engine: nemo's step clock: the StepBoundaries Lightning callback inside the real job (CPU).

NeMo's trainer cannot run here (no GPU, no NeMo in the Airflow venv), so the trainer alone is
replaced by a minimal loop that calls the Lightning hooks in Lightning's order
(``on_train_start``, then per batch ``on_train_batch_start`` / work / ``on_train_batch_end``
until ``trainer.should_stop``). Everything else is the job's own: ``Job._run`` with its real
sampler (node telemetry at 20 Hz), its Zeus window (``telemetry.zeus: on``, time-only on a
CPU), the warm-up monitor, ``reduce_step_stats`` over a one-rank gloo group, and the writers of
steps.csv, result.json and the telemetry Parquet. Each step does real work (a matrix product)
and a real sleep of a known length, so the recorded step times can be checked against it.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from charllm.train.cell import CellSpec
from charllm.train.dist import DistEnv, init_process_group, reduce_step_stats
from charllm.train.engine_nemo import NemoEngine, StepBoundaries
from charllm.train.run import Job
from tests.train.conftest import make_cell

SLEEPS_S = [0.30, 0.12, 0.12, 0.12, 0.12, 0.12, 0.12, 0.12, 0.12, 0.12, 0.12, 0.12]


class MinimalTrainer:
    """Only the trainer is stand-in: Lightning's hook order around real steps."""

    def __init__(self, callbacks: list[Any], max_steps: int) -> None:
        self.callbacks, self.max_steps = callbacks, max_steps
        self.should_stop = False
        self.steps_run = 0

    def fit(self, model: Any, data: Any) -> None:
        # NeMo's MegatronStrategy creates the process group itself (the engine hands the job's
        # over, else NeMo skips its model-parallel setup); this trainer does the same, one rank
        self.group_existed_at_fit = dist.is_initialized()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        w = torch.randn(256, 256)
        for cb in self.callbacks:
            cb.on_train_start(self, model)
        for i in range(self.max_steps):
            batch = torch.randn(64, 256)
            for cb in self.callbacks:
                cb.on_train_batch_start(self, model, batch, i)
            loss = (batch @ w).pow(2).mean() / (i + 1)
            time.sleep(SLEEPS_S[min(i, len(SLEEPS_S) - 1)])
            self.steps_run += 1
            for cb in self.callbacks:
                cb.on_train_batch_end(self, model, {"loss": loss}, batch, i)
            if self.should_stop:
                return


class CpuLoopEngine(NemoEngine):
    """NemoEngine with the CPU's sync and NeMo's objects left out (build returns the minimal trainer)."""

    def __init__(self, cell: CellSpec, denv: DistEnv, device: torch.device) -> None:  # no CUDA, no NeMo
        from charllm.nemo_config import nemo_config

        self.cell, self.denv, self.device = cell, denv, device
        self.config = nemo_config(cell)
        self.accum, self.grad_sync, self.te, self.spec_name = cell.grad_accum, "none", False, "local"
        self.boundaries = None
        self.trainer: MinimalTrainer | None = None

    def build(self, callbacks: list[Any]) -> tuple[Any, Any, Any]:
        self.trainer = MinimalTrainer(callbacks, self.config["trainer"]["max_steps"])
        return self.trainer, None, None

    def callback(self, boundaries: StepBoundaries) -> Any:
        return boundaries  # lightning is not in this venv; the hooks are the same methods

    def sync(self) -> None:
        pass

    def reduce_step_stats(self, loss: Any, step_time_s: float, temp_slope: float) -> tuple[float, float, float]:
        return reduce_step_stats(loss, step_time_s, temp_slope, True, self.device)

    def describe(self) -> dict[str, Any]:
        return {"engine": "nemo", "trainer": "MinimalTrainer (CPU test)", "strategy": self.config["strategy"]}


def test_step_boundaries_drive_the_job_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = make_cell(
        engine="nemo",
        steps=4,
        warmup={"min_steps": 2, "max_steps": 6, "step_time_cv": 0.10, "cv_window_steps": 3},
        telemetry={"hz": 20, "zeus": "on"},
    )
    cell = CellSpec.from_dict(raw)
    out = tmp_path / "out"
    out.mkdir()
    device = torch.device("cpu")
    denv = DistEnv(rank=0, world_size=1, local_rank=0, launcher="single")
    engines: list[CpuLoopEngine] = []

    def build(c: CellSpec, d: DistEnv, dev: torch.device) -> CpuLoopEngine:
        engines.append(CpuLoopEngine(c, d, dev))
        return engines[-1]

    monkeypatch.setattr("charllm.train.run.build_engine", build)
    init_process_group(denv, device)
    try:
        Job(cell, denv, out)._run(device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

    eng = engines[0]
    assert eng.trainer is not None and eng.boundaries is not None and eng.boundaries.done
    rows = list(csv.DictReader((out / "steps.csv").open()))
    phases = [r["phase"] for r in rows]
    n_warm = phases.count("warmup")
    # the warm-up ends once 3 steps of 0.12 s agree within 10 % (the 0.30 s first step is out of the window)
    assert 2 <= n_warm <= 6 and phases[n_warm:] == ["measure"] * 4, phases
    assert eng.trainer.steps_run == len(rows) and eng.trainer.should_stop  # the callback stopped the trainer
    assert not eng.trainer.group_existed_at_fit  # the job's process group was handed over to the trainer
    starts = [float(r["start_unix_s"]) for r in rows]
    ends = [float(r["end_unix_s"]) for r in rows]
    assert all(abs(s - e) < 1e-9 for s, e in zip(starts[1:], ends[:-1], strict=True)), "steps tile the run"
    durs = [float(r["duration_s"]) for r in rows]
    for d, planned in zip(durs, SLEEPS_S, strict=False):
        assert planned <= d < planned + 0.25, (d, planned)  # the step clock holds the step's real sleep
    assert all(r["loss"] != "nan" for r in rows)

    res = json.loads((out / "result.json").read_text())
    assert res["outcome"] == "ok"
    m = res["metrics"]
    assert m["measured_steps"] == 4
    assert m["step_time_median_s"] == pytest.approx(sorted(durs[n_warm:])[1:3][0], abs=0.1)
    assert 0.12 <= m["step_time_median_s"] < 0.3
    assert res["provenance"]["engine"]["engine"] == "nemo"
    window = res["provenance"]["measure_window_unix_s"]
    assert window == pytest.approx([starts[n_warm], ends[-1]], abs=1e-5)  # steps.csv rounds to 1 us
    assert res["provenance"]["warmup"]["steps"] == n_warm
    # Zeus's window opened when the warm-up ended and closed after the last measured step
    zeus_s = m.get("zeus_window_s")
    if zeus_s is not None:
        assert zeus_s == pytest.approx(window[1] - window[0], abs=0.1)
    print("zeus:", res["provenance"]["telemetry"]["zeus"], "window", zeus_s, "measured span", window[1] - window[0])
    # the sampler ran through the trainer's loop on the same clock
    frame = pd.read_parquet(out / "telemetry" / "node_rank0.parquet")
    ts = frame["unix_s"] if "unix_s" in frame else frame[frame.columns[0]]
    inside = ((ts >= window[0]) & (ts <= window[1])).sum()
    span = window[1] - window[0]
    assert inside >= 0.5 * 20 * span, (inside, span)
    print(f"{len(rows)} steps ({n_warm} warm-up), durations {[round(d, 3) for d in durs]}, {inside} samples in window")

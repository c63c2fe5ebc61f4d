"""Replay of the recorded H200 stage-profiler run (docs/gpu/perseus-stage-profile-h200/run2/).

The run timed every instruction of two GPT-3 1.3B stages with CUDA events and sampled NVML's
energy counter every 10 ms (clocks untouched, 1980 MHz). Laid out as a job's outputs (per-rank
timeline, step windows, telemetry Parquet), :mod:`charllm.energy.runprofile` must give each
instruction the energy the GPU run computed, rebuild its stage profile, and account for the
counter over the window within 3 %.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from charllm.energy.attribution import read_stage_profile
from charllm.energy.runprofile import rank_profile, run_profile

RUN = Path(__file__).resolve().parents[2] / "docs" / "gpu" / "perseus-stage-profile-h200" / "run2"


def _job_dir(tmp: Path) -> Path:
    """The recorded run as the job lays out its outputs: stage s on rank s."""
    import pandas as pd

    out = tmp / "out"
    (out / "telemetry").mkdir(parents=True)
    series = pd.read_csv(RUN / "energy_series.csv")
    for s in (0, 1):
        shutil.copy(RUN / f"instructions-stage{s}.csv", out / f"instructions-{s}.csv")
        steps = json.loads((RUN / f"instruction_steps-stage{s}.json").read_text())
        (out / f"instruction_steps-{s}.json").write_text(json.dumps({"rank": s, "stage": s, "steps": steps["steps"]}))
        series.assign(sm_clock_mhz=1980.0).to_parquet(out / "telemetry" / f"rank{s}.parquet")
    return out


def test_replay_recorded_h200_run(tmp_path: Path) -> None:
    out = _job_dir(tmp_path)
    rows, summary = run_profile(out, skip_steps=0)
    assert [r["stage"] for r in summary] == [0, 1] and all(r["instructions"] > 500 for r in summary)
    for s in (0, 1):
        p = rank_profile(out, s, skip_steps=0)
        with (RUN / f"instructions-stage{s}.csv").open() as fh:
            recorded = [float(r["energy"]) for r in csv.DictReader(fh)]
        assert p["energies"] == pytest.approx(recorded, abs=1e-9)  # the GPU run's own attribution
        total = sum(p["energies"]) + p["idle_j"]
        print(f"stage {s}: {len(p['rows'])} instructions over {p['window_s']:.2f} s at {p['frequency']} MHz; "
              f"instructions {sum(p['energies']):.1f} J + idle {p['idle_j']:.1f} J = {total:.1f} J; "
              f"counter {p['counter_j']:.1f} J")  # fmt: skip
        assert p["window_s"] >= 10.0 and p["frequency"] == 1980
        assert total == pytest.approx(p["counter_j"], rel=0.03)
    published = read_stage_profile(RUN / "stage_profile.csv")
    for r in rows:
        t, e = published[(r.stage, r.instruction)][r.frequency]
        assert (r.time, r.energy) == pytest.approx((t, e), rel=1e-12)
        assert r.trusted and r.window_s >= 10.0  # each row rests on >= 10 s of the counter
    print([(r.stage, r.instruction, r.count, round(r.busy_s, 2), round(r.window_s, 2)) for r in rows])


def test_gpu_rank_writes_its_stage_profile(tmp_path: Path) -> None:
    """The recorder of a GPU rank writes stage_profile-<rank>.csv beside its timeline (replayed rank 0)."""
    from charllm.energy.attribution import read_timeline
    from charllm.energy.recorder import InstructionRecorder

    out = _job_dir(tmp_path)
    rec = InstructionRecorder("cpu", 0)
    rec.cuda = True  # what a CUDA rank does at write time (its events are already resolved to rows)
    rec.rows = read_timeline(out / "instructions-0.csv")
    rec.steps = json.loads((out / "instruction_steps-0.json").read_text())["steps"]
    rec.write(out, 0)
    got = read_stage_profile(out / "stage_profile-0.csv")
    print(got)
    assert set(got) == {(0, "forward"), (0, "backward")} and set(got[(0, "forward")]) == {1980}
    # the first step is left out as the job's warm-up: close to, not equal to, the whole run's row
    want = read_stage_profile(RUN / "stage_profile.csv")[(0, "backward")][1980]
    assert got[(0, "backward")][1980] == pytest.approx(want, rel=0.02)

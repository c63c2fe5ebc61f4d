"""The adaptive measurement window on recorded step logs, and ``profile: layers`` in a real job (CPU)."""

from __future__ import annotations

import io
import json
import math
import statistics
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from charllm.predict.profile import LayerProfile
from charllm.predict.recorded import REPO, all_recorded
from charllm.train import window
from tests.train.conftest import make_cell

LOGS = [r for r in all_recorded() if len(r.step_times_s) >= 6]


def test_window_rule_basics() -> None:
    steady = [1.0, 1.001, 0.999, 1.0, 1.002, 0.998, 1.0]
    assert window.median_ci_half_width_rel(steady[:2]) == math.inf
    assert window.median_ci_half_width_rel(steady) < 0.002
    # known to 0.2 % after five steps, but 5 s of energy are not 10 s: continue; 10 s: stop
    assert not window.should_stop(steady[:5], 5.0, 20).stop
    dec = window.should_stop(steady[:5], 10.0, 20)
    assert dec.stop and dec.reason == "ci+energy" and dec.measured_steps == 5
    noisy = [1.0, 1.3, 0.8, 1.2, 0.9, 1.25]
    assert not window.should_stop(noisy, 60.0, 20).stop
    assert window.should_stop(noisy, 60.0, 6).reason == "cap"  # the cell's steps cap it
    assert window.record(dec, "adaptive")["mode"] == "adaptive"


def _power_energy(tele: pd.DataFrame, t0: float, t1: float) -> float:
    t = tele["unix_s"].to_numpy(float)
    p = tele["power_w"].to_numpy(float)
    m = (t >= t0) & (t <= t1)
    return float(np.trapezoid(p[m], t[m])) if m.sum() >= 2 else math.nan


def _small_campaign_logs() -> list[tuple[str, list[tuple[float, float]], pd.DataFrame]]:
    """(cell, measured steps as (start, end), its power samples) from the small campaign's tables."""
    base = REPO / "docs" / "gpu" / "small-campaign" / "tables"
    steps = pd.read_parquet(base / "steps.parquet")
    out = []
    for cid, g in steps[steps["phase"] == "measure"].groupby("cell_id"):
        tele = pd.read_parquet(base / "telemetry.parquet" / f"{cid}_r0_a1.parquet")
        out.append((str(cid), list(zip(g["start_unix_s"], g["end_unix_s"], strict=True)), tele))
    return out


@pytest.mark.parametrize("energy_floor", [True, False], ids=["full-rule", "ci-rule-only"])
def test_adaptive_window_on_replayed_step_logs(energy_floor: bool) -> None:
    """Median step time within 1 % of the fixed window on every recorded log (>= 6 measured steps)."""
    kw = {} if energy_floor else {"min_energy_s": 0.0}
    fixed_n = adaptive_n = 0
    for r in LOGS:
        s = list(r.step_times_s)
        dec = window.replay(s, **kw)
        err = statistics.median(s[: dec.measured_steps]) / statistics.median(s) - 1
        fixed_n += len(s)
        adaptive_n += dec.measured_steps
        print(f"{r.source:<92} fixed {len(s):2d} adaptive {dec.measured_steps:2d} ({dec.reason}) median {err:+.4f}")
        assert abs(err) <= 0.01
        assert dec.measured_steps <= len(s)
    saving = 1 - adaptive_n / fixed_n
    print(f"{'full rule' if energy_floor else 'CI rule alone'}: {adaptive_n} of {fixed_n} steps, {saving:.1%} fewer")
    if not energy_floor:
        assert saving >= 0.30
    # with the 10 s energy floor the recorded windows (1.5-14 s long) leave little to save: reported


def test_adaptive_window_energy_per_step_on_recorded_power() -> None:
    """Energy per step over the adaptive window (sampled power) within 1 % of the fixed window's."""
    logs = _small_campaign_logs()
    assert len(logs) == 8
    for cid, spans, tele in logs:
        durs = [b - a for a, b in spans]
        for kw in ({}, {"min_energy_s": 0.0}):
            n = window.replay(durs, **kw).measured_steps
            e_fixed = _power_energy(tele, spans[0][0], spans[-1][1]) / len(spans)
            e_adapt = _power_energy(tele, spans[0][0], spans[n - 1][1]) / n
            err = e_adapt / e_fixed - 1
            print(f"{cid} {'CI rule alone' if kw else 'full rule'}: {n}/{len(spans)} steps, energy/step {err:+.2%}")
            if not kw:  # without the 10 s floor a 2-3 s window misses by up to 2.5 %: why the floor is there
                assert abs(err) <= 0.01


def test_job_profile_layers_and_adaptive_window_on_cpu(tmp_path: Path) -> None:
    """A real job (tiny model, CPU): profile: layers writes a valid profile; the window is recorded."""
    from charllm.train.run import run

    cell = make_cell(
        opt={"profile_mode": "layers", "profile_steps": 1, "window": "adaptive"},
        warmup={"min_steps": 0, "max_steps": 0},
        steps=6,
    )
    path = tmp_path / "cell.json"
    path.write_text(json.dumps(cell))
    assert run(path, tmp_path / "out", env={}) == 0
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["outcome"] == "ok", res.get("error")
    win = res["provenance"]["measure_window"]
    print(win)
    assert win["mode"] == "adaptive" and win["reason"] == "cap" and win["measured_steps"] == 6  # < 10 s on CPU
    prof = LayerProfile.read(tmp_path / "out" / "profiles" / "cpu_tp1_mb2.json")
    assert [x.kind for x in prof.layers] == ["embedding", "block", "block", "head"]
    assert prof.grad_accum == 4 and prof.step_time_s > 0 and prof.optimizer_step_s > 0
    assert all(x.fwd_s > 0 and x.bwd_s > 0 for x in prof.layers)
    assert prof.blocks[0].params == prof.blocks[1].params > 0
    print(prof.to_json()[:400])


def test_profile_layers_refused_where_it_cannot_run() -> None:
    from charllm.capabilities import refusals
    from charllm.train.cell import CellSpec

    view = CellSpec.from_dict(make_cell(opt={"profile_mode": "layers"})).view()
    assert refusals(view) == []
    from dataclasses import replace

    pp = refusals(replace(view, pp=2, global_batch=8, world_size=None))
    meg = refusals(replace(view, engine="megatron"))
    print(pp, meg)
    assert any("profile: layers" in r.reason and "pp = 1" in r.reason for r in pp)
    assert any(r.field == "profile" and "engine: torch" in r.reason for r in meg)


def test_megatron_tarball_logs_are_in_the_replay() -> None:
    # the megatron runs' step logs (6 measured steps each) are part of LOGS
    assert sum("megatron" in r.source for r in LOGS) == 5
    with tarfile.open(REPO / "docs" / "gpu" / "validate-h200-megatron-complete-runs.tar.gz") as tar:
        f = tar.extractfile("meg-1.3b-00000/steps.csv")
        assert f is not None
        rows = pd.read_csv(io.BytesIO(f.read()))
    assert (rows["phase"] == "measure").sum() == 6

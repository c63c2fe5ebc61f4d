"""The adaptive measurement window on recorded step logs, and ``profile: layers`` in a real job (CPU)."""

from __future__ import annotations

import io
import json
import math
import statistics
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from charllm.predict.profile import LayerProfile
from charllm.predict.recorded import REPO, all_recorded
from charllm.telemetry.summary import counter_delta, integrate
from charllm.train import window
from tests.train.conftest import make_cell


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


REPLAY = json.loads((REPO / "tests" / "data" / "gpu" / "window-replay" / "logs.json").read_text())


def _energy(cell: dict, t1: float, col: str) -> float:
    """Energy of all ranks from the first measured step's start to t1: the job's own definitions
    (``power_w``: trapezoid of sampled power; ``energy_j``: NVML counter, interpolated at the edges)."""
    t0 = cell["steps"][0][0]
    total = 0.0
    for r in cell["ranks"]:
        t, v = np.asarray(r["t_s"]), np.asarray(r[col])
        total += integrate(t, v, t0, t1) if col == "power_w" else counter_delta(t, v, t0, t1)
    return total


def _replay_cell(cell: dict, **kw: Any) -> dict[str, Any]:
    steps = cell["steps"]
    durs = [b - a for a, b in steps]
    n = len(durs)
    dec = window.replay(durs, **kw)
    k = dec.measured_steps
    out: dict[str, Any] = {"fixed": n, "adaptive": k, "window_s": steps[-1][1] - steps[0][0], "saving": 1 - k / n}
    out["median_err"] = statistics.median(durs[:k]) / statistics.median(durs) - 1
    for col, key in (("power_w", "energy_err"), ("energy_j", "counter_err")):
        if all(col in r for r in cell["ranks"]):  # the Perseus profile kept the counter only
            out[key] = (_energy(cell, steps[k - 1][1], col) / k) / (_energy(cell, steps[-1][1], col) / n) - 1
    return out | {"reason": dec.reason}


def test_window_replay_data_is_every_recorded_step_log() -> None:
    """logs.json holds every recorded step log of the repository, and its numbers are the recorded ones."""
    have = {c["source"] for c in REPLAY["cells"]} | {x["source"] for x in REPLAY["durations_only"]}
    have |= {x["source"] for x in REPLAY["measured_adaptively"]}
    for r in all_recorded():
        if r.step_times_s:
            src = r.source.removesuffix("/result.json").replace("tests/data/gpu/", "tests/data/gpu:")
            assert src in have, f"{src} has measured steps but is not in window-replay/logs.json"
    assert {x["source"] for x in REPLAY["excluded"]} == {
        "tests/data/gpu:oom/",
        "docs/gpu/kwai-remat-1gpu-run/charllm-home.tgz:results/cells/e787f45b0abd6b94/r0/a1-bd9f3eaa/out/",
    }  # the two OOM cells: no measured step
    for c in REPLAY["cells"]:  # the extracted steps and power reproduce the job's own metrics
        durs = [b - a for a, b in c["steps"]]
        rec = c["recorded"]
        assert len(durs) == rec["measured_steps"]
        if "energy_per_step_j" in rec:  # a job's result.json
            assert statistics.median(durs) == pytest.approx(rec["step_time_median_s"], rel=1e-5)
            e = _energy(c, c["steps"][-1][1], "power_w") / len(durs)
            assert e == pytest.approx(rec["energy_per_step_j"], rel=1e-4), c["source"]
        else:  # the Perseus stage profile: its counter over its window
            t0, t1 = rec["window_rel_s"]
            r = c["ranks"][0]
            e = counter_delta(np.asarray(r["t_s"]), np.asarray(r["energy_j"]), t0, t1)
            assert e == pytest.approx(rec["counter_window_j"], abs=0.01), c["source"]
    # the jobs that measured adaptively on the GPU (predict-h200-job.json's; window-long's
    # gpt3-1.3b-mb8-gb8-adaptive, with telemetry): each step log reproduces the job's own stop
    assert len(REPLAY["measured_adaptively"]) == 2
    for m in REPLAY["measured_adaptively"]:
        mw = m["measure_window"]
        if "steps" in m:  # step timestamps: the window is first start to last end, as the job's
            d = [b - a for a, b in m["steps"]]
            spans = [b - m["steps"][0][0] for _, b in m["steps"]]
            # the job's own window_s at its decision (10.006 s) is timed inside the step loop, the
            # step log's first start to last end is 10.052 s: both over the 10 s floor
            assert spans[-1] == pytest.approx(mw["window_s"], abs=0.1)
            assert statistics.median(d) == pytest.approx(m["recorded"]["step_time_median_s"], rel=1e-5)
            e = _energy(m, m["steps"][-1][1], "power_w") / len(d)
            assert e == pytest.approx(m["recorded"]["energy_per_step_j"], rel=1e-4), m["source"]
        else:
            d = m["durations_s"]
            spans = [sum(d[:i]) for i in range(1, len(d) + 1)]
        stop = window.should_stop(d, spans[-1], len(d) + 1)
        assert stop.stop and stop.reason == mw["reason"] == "ci+energy" and len(d) == mw["measured_steps"]
        # the job decided on its in-loop step timings; the logged ones give a CI within 4 % of its own
        assert stop.ci_half_width_rel == pytest.approx(mw["ci_half_width_rel"], rel=0.05)
        assert not window.should_stop(d[:-1], spans[-2], len(d) + 1).stop, m["source"]


#: logs where the full rule's energy per step misses the fixed window's by more than 1 % (it stops
#: early on a steady median, but the board power still drifts over the 50-69 s fixed window:
#: GPT-3 125M mb 8 (power from samples -1.35 %, counter -1.27 %), GPT-3 1.3B selective (counter
#: +1.19 %); their median step times are within 0.61 %)
ENERGY_MISSES = {"gpt3-125m-mb8-gb32": ("energy_err", "counter_err"), "gpt3-1.3b-mb4-gb16-selective": ("counter_err",)}


@pytest.mark.parametrize("energy_floor", [True, False], ids=["full-rule", "ci-rule-only"])
def test_adaptive_window_on_replayed_step_logs(energy_floor: bool) -> None:
    """The rule replayed on every recorded step log with an energy series (tests/data/gpu/window-replay).

    33 logs: 22 short quick-check windows and 11 long fixed windows (docs/gpu/window-long, 46-69 s
    after the job's warm-up). Which logs cannot save: windows of at most ~14 s (the 10 s energy
    floor leaves nothing or a few steps: H100 small campaign, megatron, NeMo, tests/data/gpu), and
    the launch-bound eager cells (GPT-3 1.3B mb 1, 1.3B mb 2 full recompute, 350M mb 4: steps vary
    ~+-12 % step to step on that host, median CI half-width 2.6-3.7 % after 46-61 s), where no
    window of about 50 s reaches 1 %: they run to the cap. Pooled over all steps the rule measures
    57 % fewer steps (the issue's >= 30 %), per log on average 25 % (most logs are short); over the
    11 long logs 58 % per log on average (80-85 % on the 8 that stop early), 66 % pooled.
    """
    kw: dict[str, Any] = {} if energy_floor else {"min_energy_s": 0.0}
    rows = []
    for c in REPLAY["cells"]:
        r = _replay_cell(c, **kw) | {"name": c["name"], "long": "window-long" in c["source"]}
        rows.append(r)
        print(
            f"{c['name'][:46]:<46} {c['gpu_type']} {c['engine']:<8} {r['window_s']:5.1f} s "
            f"fixed {r['fixed']:3d} adaptive {r['adaptive']:3d} ({r['reason']:<9}) saving {r['saving']:6.1%} "
            f"median {r['median_err']:+.2%} energy/step {format(r['energy_err'], '+.2%') if 'energy_err' in r else 'n/a':>6} "
            f"counter {r['counter_err']:+.2%}"
        )

    def savings(sel: list[dict[str, Any]]) -> tuple[float, float]:
        mean = statistics.mean(r["saving"] for r in sel)
        return mean, 1 - sum(r["adaptive"] for r in sel) / sum(r["fixed"] for r in sel)

    mean_saving, pooled = savings(rows)
    long_mean, long_pooled = savings([r for r in rows if r["long"]])
    worst = {k: max(abs(r[k]) for r in rows if k in r) for k in ("median_err", "energy_err", "counter_err")}
    print(f"{len(rows)} logs: per-log mean saving {mean_saving:.1%}, pooled {pooled:.1%}, worst {worst}")
    print(f"11 long logs (docs/gpu/window-long): per-log mean saving {long_mean:.1%}, pooled {long_pooled:.1%}")
    short = [window.replay(x["durations_s"], **kw).measured_steps for x in REPLAY["durations_only"]]
    n_short = sum(len(x["durations_s"]) for x in REPLAY["durations_only"])
    print(f"step-time-only logs (no energy series): {sum(short)} of {n_short} steps")
    assert len(rows) == 33 and sum(r["long"] for r in rows) == 11
    assert all(r["adaptive"] <= r["fixed"] for r in rows)
    if energy_floor:
        assert worst["median_err"] <= 0.01  # every log
        misses = {
            r["name"]: tuple(k for k in ("energy_err", "counter_err") if abs(r.get(k, 0.0)) > 0.01)
            for r in rows
            if any(abs(r.get(k, 0.0)) > 0.01 for k in ("energy_err", "counter_err"))
        }
        assert misses == ENERGY_MISSES  # every other log within 1 % on both energy definitions
        assert worst["energy_err"] <= 0.014 and worst["counter_err"] <= 0.013
        assert pooled >= 0.30 and pooled == pytest.approx(0.569, abs=0.005)
        assert mean_saving == pytest.approx(0.251, abs=0.005)  # < 30 %: 21 of 33 logs cannot save
        assert long_mean == pytest.approx(0.579, abs=0.005) and long_pooled == pytest.approx(0.655, abs=0.005)
        capped = {r["name"] for r in rows if r["long"] and r["saving"] == 0}
        assert capped == {"gpt3-1.3b-mb1-gb8", "gpt3-1.3b-mb2-gb8-full", "gpt3-350m-mb4-gb16"}  # launch-bound
    else:  # without the floor short windows miss energy per step by more than 1 %: why the floor is there
        assert worst["energy_err"] > 0.01
        short_miss = [r for r in rows if r["window_s"] <= 14.5 and abs(r.get("energy_err", 0.0)) > 0.01]
        assert short_miss


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


def test_layer_profile_telescopes_to_the_step(tmp_path: Path) -> None:
    """The layers, optimizer and step overhead add up to the profiled steps exactly (the marks
    leave no gap: host time between blocks is a block's; means add up). Six blocks, two timed one
    by one per micro batch (the rest of the stack whole): the split still adds up."""
    from charllm.train.layer_profile import SAMPLED_BLOCKS
    from charllm.train.run import run
    from tests.train.conftest import EXAMPLE_CELL

    cell = make_cell(
        opt={"profile_mode": "layers", "profile_steps": 3},
        warmup={"min_steps": 0, "max_steps": 0},
        steps=2,
        global_batch=4,
        model={**EXAMPLE_CELL["model"], "n_layers": 6},
    )
    path = tmp_path / "cell.json"
    path.write_text(json.dumps(cell))
    assert run(path, tmp_path / "out", env={}) == 0
    prof = LayerProfile.read(tmp_path / "out" / "profiles" / "cpu_tp1_mb2.json")
    wall = prof.provenance["profiled_step_s"]
    print(
        f"layers {prof.layers_time_s():.6f} s = batch {prof.batch_time_s:.6f} s; + optimizer "
        f"{prof.optimizer_step_s:.6f} + overhead {prof.step_overhead_s:.6f} = {prof.profiled_step_s():.6f} "
        f"vs the step {wall:.6f} s"
    )
    assert prof.grad_accum == 2 and prof.provenance["steps_profiled"] == 3
    assert prof.n_layers == 6 and prof.provenance["blocks_timed_per_micro_batch"] == SAMPLED_BLOCKS == 2
    assert prof.layers_time_s() == pytest.approx(prof.batch_time_s, rel=1e-9)
    assert prof.step_overhead_s > 0
    assert prof.profiled_step_s() == pytest.approx(wall, rel=1e-9)
    assert all(x.fwd_s > 0 and x.bwd_s > 0 for x in prof.layers)


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
    # the megatron runs' step logs (6 measured steps each) are in logs.json as recorded in the tarball
    meg = [c for c in REPLAY["cells"] if "validate-h200-megatron" in c["source"]]
    assert len(meg) == 5
    with tarfile.open(REPO / "docs" / "gpu" / "validate-h200-megatron-complete-runs.tar.gz") as tar:
        f = tar.extractfile("meg-1.3b-00000/steps.csv")
        assert f is not None
        rows = pd.read_csv(io.BytesIO(f.read()))
    m = rows[rows["phase"] == "measure"]
    assert len(m) == 6
    c = next(c for c in meg if c["name"] == "meg-1.3b-00000")
    got = [(a + c["t0_unix_s"], b + c["t0_unix_s"]) for a, b in c["steps"]]
    want = list(zip(m["start_unix_s"], m["end_unix_s"], strict=True))
    assert np.allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)

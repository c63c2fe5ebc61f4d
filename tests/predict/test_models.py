"""The memory, time and cost models against every GPU cell recorded in the repository.

No GPU here: the models are pure arithmetic, checked against real recorded results
(``charllm.predict.recorded``: tests/data/gpu, the small campaign's store, the megatron runs,
the issue-14 H200 sweeps). Each case prints predicted against measured.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import pytest

from charllm import modelcat
from charllm.errors import ConfigError
from charllm.predict import memory, timing
from charllm.predict.profile import LayerProfile, ProfileSet
from charllm.predict.recorded import Recorded, all_recorded, oom_sweeps

RECORDED = all_recorded()
OK = [r for r in RECORDED if r.outcome == "ok"]


def test_recorded_cells_found() -> None:
    # tests/data/gpu (3 ok + 1 oom), small campaign (8), megatron (5), H200 sweeps run1-4 (4 x 10)
    # and run5 (3), the in-job check (1), docs/gpu/window-long (12)
    assert len(OK) == 72 and any(r.outcome == "oom" for r in RECORDED)
    assert {r.cell.get("engine", "torch") for r in OK} == {"torch", "megatron"}


def test_memory_model_within_10_percent_on_every_recorded_cell() -> None:
    worst = 0.0
    for r in OK:
        q = memory.query_of_job_cell(r.cell)
        est = memory.estimate(q)
        meas = r.metrics["max_memory_allocated_bytes"]
        ratio = est.peak_bytes / meas
        worst = max(worst, abs(ratio - 1))
        print(f"{r.source:<90} measured {meas / 2**30:7.2f} GiB predicted {est.peak_bytes / 2**30:7.2f} ({ratio:.3f})")
        assert 0.9 <= ratio <= 1.1, r.source
        assert not est.oom
    print(f"worst |error| {worst:.1%} over {len(OK)} cells")


def test_recorded_oom_cell_predicted_oom() -> None:
    ooms = [r for r in RECORDED if r.outcome == "oom"]
    assert ooms
    for r in ooms:
        est = memory.estimate(memory.query_of_job_cell(r.cell))
        print(f"{r.source}: predicted {est.peak_bytes / 2**30:.1f} GiB of {est.capacity_bytes / 2**30:.1f}")
        assert est.oom


def test_oom_boundary_of_the_h200_sweeps() -> None:
    sweeps = oom_sweeps()
    assert sweeps
    shape = modelcat.get("gpt3-1.3b")
    for source, rows in sweeps:
        measured = max(r["micro_batch"] for r in rows if r["outcome"] == "ok")
        assert any(r["outcome"] == "oom" for r in rows)
        fits = [
            r["micro_batch"]
            for r in rows
            if not memory.estimate(
                memory.MemoryQuery(shape, gpu_type="h200", micro_batch=r["micro_batch"], global_batch=r["micro_batch"]),
                first_step=True,
            ).oom
        ]
        print(f"{source}: largest micro batch that ran {measured}, predicted {max(fits)}")
        assert max(fits) == measured


def _fp32_weights(r: Recorded) -> bool:
    """Whether the recorded torch run kept fp32 weights under autocast.

    The H200 sweeps' profiles say so (``params_dtype``: bf16 compute copies); the torch cells of
    tests/data/gpu and the small campaign ran before ``opt.bf16_params`` existed (fp32 weights on
    one GPU too), except FSDP's (bf16 at the gather). Megatron keeps bf16 weights.
    """
    if r.profile is not None:
        return not str(r.profile.get("provenance", {}).get("params_dtype", "")).startswith("bf16")
    if r.params is not None:  # the job says (docs/gpu/window-long: bf16 compute copies on one GPU)
        return not r.params.startswith("bf16")
    cell = r.cell
    return cell.get("engine", "torch") == "torch" and not cell["parallel"].get("fsdp")


def _config_key(r: Recorded) -> str:
    """What a repeat of the same configuration on another lease shares (not the run or cell id)."""
    c = r.cell
    opt = c.get("opt") or {}
    key = {
        "model": {k: c["model"].get(k) for k in ("family", "n_layers", "hidden", "ffn_hidden", "num_experts")},
        "parallel": c.get("parallel"),
        "mb": c["micro_batch"],
        "gb": c["global_batch"],
        "seq": c["seq_len"],
        "recompute": (bool(opt.get("recompute")), opt.get("recompute_granularity", "full")),
        "compile": bool(opt.get("compile")),
        "engine": c.get("engine", "torch"),
        "gpu": c.get("gpu_type"),
        "precision": c.get("precision"),
        "fp32_w": _fp32_weights(r),
    }
    return json.dumps(key, sort_keys=True)


def test_time_model_on_every_recorded_cell() -> None:
    """Within 15 % of every recorded configuration's median step time; every cell within 15 % too,
    except a cell whose configuration was also recorded on other leases, where the prediction
    must lie inside the range the leases measured; MAPE over cells at most 4.5 %.

    The launch-bound eager GPT-3 1.3B mb 1 cells vary +-12 % step to step and by 1.4x between
    leases of the same H200 type (mb 1, no recompute: 0.510 s run4 ... 0.721 s run3, six leases):
    no time model puts every one of those within 15 %; the group's median is the checkable number.

    The small micro batches of the eager H100 cells (16 and 32 per step) pay the autocast
    weight casts and fp32 gradient accumulation once per micro batch
    (``timing.AUTOCAST_BYTES_PER_PARAM``); without that term the mb 2 cells were 18 % short.
    """
    groups: dict[str, list[tuple[Recorded, float, float]]] = {}
    errs = []
    for r in OK:
        q = replace(memory.query_of_job_cell(r.cell), fp32_weights=_fp32_weights(r))
        est = timing.predict_step(q)
        meas = r.metrics["step_time_median_s"]
        err = est.step_s / meas - 1
        errs.append(abs(err))
        groups.setdefault(_config_key(r), []).append((r, meas, est.step_s))
        print(f"{r.source:<90} measured {meas:.4f} s predicted {est.step_s:.4f} s ({err:+.1%})")
    misses, spread_groups = [], []
    for members in groups.values():
        meas = sorted(m for _, m, _ in members)
        pred = members[0][2]
        med = statistics.median(meas)
        assert abs(pred / med - 1) <= 0.15, (members[0][0].name, pred, meas)
        if len(members) > 1:
            spread_groups.append((members[0][0].name, len(meas), meas[0], meas[-1], pred / med - 1))
        for r, m, p in members:
            if abs(p / m - 1) > 0.15:
                misses.append((r.source, round(p / m - 1, 3)))
                # only where the same configuration ran on other leases, and inside their range
                assert len(members) > 1 and meas[0] <= p <= meas[-1], (r.source, p, meas)
    mape = sum(errs) / len(errs)
    for name, n, lo, hi, e in spread_groups:
        print(
            f"repeated on {n} leases: {name:<28} measured {lo:.4f}-{hi:.4f} s ({hi / lo:.2f}x), predicted vs median {e:+.1%}"
        )
    print(
        f"{len(groups)} configurations, all within 15 % of their median; cells within 15 %: "
        f"{len(errs) - len(misses)}/{len(errs)}; MAPE {mape:.1%}; outside 15 % (inside their lease spread): {misses}"
    )
    assert mape <= 0.045


def test_time_model_reads_a_profile_when_one_matches() -> None:
    run = next(r for r in OK if r.profile is not None and r.cell["micro_batch"] == 8 and not r.cell["opt"]["recompute"])
    prof = LayerProfile.from_dict(run.profile)
    q = memory.query_of_job_cell(run.cell)
    est = timing.predict_step(q, ProfileSet([prof]))
    assert est.source == "profile"
    overhead = prof.step_overhead_s or timing.STEP_OVERHEAD_S  # measured by profiles since run3
    expect = prof.grad_accum * prof.layers_time_s() + overhead
    assert est.step_s == pytest.approx(expect + est.optimizer_s, rel=1e-9)
    # the same profile stands for a 4-layer proxy of the model: 4 blocks + embedding + head
    small = memory.MemoryQuery(modelcat.get("gpt3-1.3b", 4), gpu_type="h200", micro_batch=8, global_batch=8)
    est4 = timing.predict_step(small, ProfileSet([prof]))
    mean = prof.mean_block().time_s
    assert est4.compute_s == pytest.approx(4 * mean + prof.layers[0].time_s + prof.layers[-1].time_s)


@pytest.mark.parametrize(
    ("step_s", "warmup", "steps", "prof", "compile", "world", "repeats", "job_s", "hours"),
    [
        # 60 s start-up + 2.0 s x (10 + 5) steps = 90 s; x 32 GPUs = 0.8 GPU-hours
        (2.0, 10, 5, 0, False, 32, 1, 90.0, 0.8),
        # 60 + 90 (compile) + 0.5 x (20 + 20 + 3) = 171.5 s; x 8 GPUs x 3 repeats / 3600 = 1.143333...
        (0.5, 20, 20, 3, True, 8, 3, 171.5, 171.5 * 8 * 3 / 3600),
        # 60 + 1.25 x (0 + 48) = 120 s; x 64 GPUs x 2 repeats = 15360 GPU-s = 4.266... GPU-hours
        (1.25, 0, 48, 0, False, 64, 2, 120.0, 15360 / 3600),
    ],
)
def test_cost_model_hand_computed(
    step_s: float,
    warmup: int,
    steps: int,
    prof: int,
    compile: bool,
    world: int,
    repeats: int,
    job_s: float,
    hours: float,
) -> None:
    got = timing.job_seconds(step_s, warmup, steps, prof, compile)
    assert got == job_s
    assert timing.gpu_hours(got, world, repeats) == hours


def test_profile_json_round_trip_and_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = next(r for r in OK if r.profile is not None)
    prof = LayerProfile.from_dict(run.profile)
    path = prof.write(tmp_path)
    assert path.name == f"h200_tp1_mb{prof.micro_batch}.json"
    assert LayerProfile.read(path) == prof
    assert ProfileSet.load(tmp_path).get("h200", 1, prof.micro_batch) == prof
    bad = json.loads(path.read_text())
    bad["layers"][1]["fwd_s"] = -1.0
    (tmp_path / "h200_tp1_mb99.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"h200_tp1_mb99.json.*layers\[1\]\.fwd_s"):
        ProfileSet.load(tmp_path)
    bad = json.loads(path.read_text())
    bad["layers"][0]["kind"] = "block"
    with pytest.raises(ConfigError, match="embedding, then the blocks"):
        LayerProfile.from_dict(bad, "x.json")


def test_recorded_profiles_add_up_to_their_steps() -> None:
    """Layer sums of the H200 profiles against the measured step (5 % where the GPU bounds the step)."""
    for r in OK:
        if r.profile is None or not ("run2" in r.source or r.source.endswith(":job")):
            continue
        prof = LayerProfile.from_dict(r.profile)
        ratio = prof.profiled_step_s() / r.metrics["step_time_median_s"]
        gpu_bound = r.cell["micro_batch"] >= 4 or r.cell["model"]["hidden"] >= 4096
        print(f"{r.source}: profile sum / measured step {ratio:.3f} ({'GPU' if gpu_bound else 'launch'}-bound)")
        # launch-bound (eager, one or two sequences per micro batch): host time outside the
        # micro batches (data, FSDP root hooks, zero_grad) is not in any layer: up to 10.04 % recorded
        assert abs(ratio - 1) <= (0.05 if gpu_bound else 0.11)

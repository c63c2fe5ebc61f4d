"""``charllm search``: memory-first pruning on the generated scenarios, hand-computed costs, the CLI.

The scenarios are the Metis variant's table rows 1-3 (10 blocks on 16+16 GPUs, 20 on 32+32,
20 on 64+64; here H100 + H200 nodes of 8, Llama-3 70B blocks at seq 8192, global batch 128,
roofline profiles). Their wall time is a benchmark (``benchmarks/search_scenarios.py``), not
asserted here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from charllm import cli
from charllm.modelcat import ModelShape
from charllm.predict.profile import LayerCost, LayerProfile, ProfileSet
from charllm.predict.search import (
    Pool,
    Problem,
    iteration_time,
    partition,
    plan_of,
    search,
    shapes,
)
from charllm.predict.search_scenarios import SCENARIOS, roofline_profile, scenario

# -- the generated scenarios -------------------------------------------------------------------


def test_memory_first_pruning_on_the_scenarios() -> None:
    rows = []
    for name, blocks, each in SCENARIOS:
        t0 = time.perf_counter()
        full = search(scenario(blocks, each), prune=False)
        t1 = time.perf_counter()
        pruned = search(scenario(blocks, each), prune=True)
        t2 = time.perf_counter()
        ratio = pruned.steps / full.steps
        rows.append((name, full.steps, pruned.steps, ratio, full, pruned))
        print(
            f"{name}: {full.candidates} candidates, unpruned {full.steps} steps ({t1 - t0:.2f} s), "
            f"pruned {pruned.steps} steps ({t2 - t1:.2f} s; {pruned.cuts} cuts, {pruned.memo_hits} memo hits), "
            f"ratio {ratio:.3f}, {len(full.ranked)} plans fit, best {full.ranked[0][0]:.4f} s"
        )
        assert full.steps == full.candidates  # the unpruned search prices every candidate
        assert ratio <= 0.95, name
        # the same best cost, and in fact the same ranked plans: pruning only drops plans that do not fit
        assert pruned.ranked[0][0] == full.ranked[0][0]
        assert pruned.ranked == full.ranked
        assert len(full.ranked) < full.candidates  # some plans do not fit: pruning has work to do
    assert min(r[3] for r in rows) <= 0.80, [(r[0], round(r[3], 3)) for r in rows]
    # the best plan re-priced in full detail costs what the search ranked it at, and fits its GPUs
    best = rows[-1][5].best
    assert best is not None and best.cost_s == rows[-1][5].ranked[0][0]
    prob = scenario(20, 64)
    for st in best.stages:
        pool = next(p for p in prob.pools if p.name == st.pool)
        assert st.memory_bytes <= pool.memory_bytes
    assert sum(st.blocks for st in best.stages) == 20


# -- the cost model against hand-computed fixtures -----------------------------------------------

TOY = ModelShape("toy", "gpt3", 4, 2, 1, 8, 4)


def _toy_profile() -> LayerProfile:
    def layer(name: str, kind: str, fwd: float, bwd: float, act: int, params: int, pb: int, gb: int, ob: int):
        return LayerCost(name, kind, fwd, bwd, act, params, pb, gb, ob)

    layers = (
        layer("embedding", "embedding", 0.05, 0.05, 0, 10, 40, 20, 0),  # 0.1 s, state 60
        *(layer(f"block.{i}", "block", 0.25, 0.75, 50, 25, 100, 50, 50) for i in range(4)),  # 1 s, state 200
        layer("head", "head", 0.1, 0.2, 40, 10, 40, 20, 0),  # 0.3 s, state 60
    )
    return LayerProfile(
        gpu_type="h100", tp=1, micro_batch=1, seq_len=1, precision="bf16", recompute="none", compile=False,
        engine="torch", model=TOY, layers=layers, optimizer_step_s=1.2, batch_time_s=4.4,
    )  # fmt: skip


def _toy(gpus_per_node: int, memory: int = 1200) -> Problem:
    pool = Pool("p", "h100", 2, gpus_per_node, memory, nvlink_bytes_s=100.0, network_bytes_s=10.0)
    return Problem(
        pools=(pool,), profiles=ProfileSet([_toy_profile()]), n_blocks=4, global_batch=4, seq_len=1, hidden=2,
    )  # fmt: skip


def _shape(prob: Problem, stages: tuple[tuple[int, int], ...]):
    return next(s for s in shapes(prob.pools, 4) if s.stages == stages)


def test_cost_model_hand_computed() -> None:
    assert iteration_time([1.0, 2.0], [0.5], [0.3, 0.4], 4).total_s == pytest.approx(1 + 2 + 0.5 + 3 * 2 + 0.4)
    assert partition([0.0, 0.0], [1.0, 2.0], [10, 10], 6) == [4, 2]
    assert partition([0.0, 0.0], [1.0, 2.0], [3, 10], 6) == [3, 3]  # memory caps the faster stage

    # 1. two 1-GPU stages in one node, M = 4 (dp 1, mb 1). Memory: stage 0 holds 2 micro batches in
    # flight, 60 + k*(200 + 2*50) -> cap 3; stage 1: 60 + 40 + k*(200 + 50) -> cap 4. Blocks 2+2:
    # stage times 0.1 + 2 = 2.1 and 0.3 + 2 = 2.3; hop 2*1*1*2*2 = 8 bytes over NVLink 100 B/s = 0.08;
    # sync: dp 1, optimizer 0.01 s a parameter: 10*0.01 + 2*25*0.01 = 0.6 each.
    prob = _toy(gpus_per_node=2)
    p = plan_of(prob, _shape(prob, ((0, 1), (0, 1))), 4, (0,))
    assert [s.blocks for s in p.stages] == [2, 2]
    assert [s.memory_bytes for s in p.stages] == [660, 600]
    assert p.cost_s == pytest.approx((2.1 + 2.3 + 0.08) + 3 * 2.3 + 0.6)  # 11.98

    # 2. one stage of 2 GPUs in one node, M = 2 (dp 2, mb 1): 0.1 + 0.3 + 4 = 4.4 per micro batch;
    # gradient all-reduce of 20 + 20 + 4*50 = 240 bytes, ring 2*(1/2)*240 / 100 = 2.4 s; optimizer 1.2 s.
    p = plan_of(prob, _shape(prob, ((0, 2),)), 2, (0,))
    assert (p.stages[0].dp, p.stages[0].micro_batch) == (2, 1)
    assert p.cost_s == pytest.approx(4.4 + 1 * 4.4 + 2.4 + 1.2)  # 12.4

    # 3. the same across two nodes of 1 GPU: the all-reduce runs at the network's 10 B/s -> 24 s
    prob3 = _toy(gpus_per_node=1)
    p = plan_of(prob3, _shape(prob3, ((0, 2),)), 2, (0,))
    assert p.cost_s == pytest.approx(8.8 + 24.0 + 1.2)  # 34.0
    # and the two-stage plan of fixture 1 hops over the network: 8 bytes / 10 B/s = 0.8 s
    p = plan_of(prob3, _shape(prob3, ((0, 1), (0, 1))), 4, (0,))
    assert p.cost_s == pytest.approx((2.1 + 2.3 + 0.8) + 3 * 2.3 + 0.6)

    # with 1000 bytes the single stage holds 3 blocks only: it is not among the plans, pruned or not
    small = _toy(gpus_per_node=2, memory=1000)
    for prune in (False, True):
        res = search(small, prune=prune)
        assert all(len(small_plan.stages) > 1 for small_plan in res.plans())
        print(f"toy, 1000 B, prune={prune}: {res.steps} steps, {len(res.ranked)} plans fit")


# -- the CLI ---------------------------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what earlier calls echoed for the log
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    print(out[-3000:], err)
    return rc, out, err


def test_cli_ranks_plans_and_emits_a_valid_campaign(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "plans.yaml"
    rc, out, _ = _run(
        capsys, "search", "--cluster", "h100-8x8:16", "--cluster", "h200-4x8:16", "--model", "llama3-70b",
        "--layers", "8", "--seq-len", "8192", "--top", "3", "--emit-campaign", str(dest),
    )  # fmt: skip
    assert rc == 0
    assert "#1 " in out and "device groups:" in out and "strategies:" in out and "layers:" in out
    assert "roofline" in out  # says its costs are assumptions
    written = sorted(tmp_path.glob("plans*.yaml"))
    assert dest in written
    rc, out, _ = _run(capsys, "validate", *map(str, written))
    assert rc == 0, out
    assert "0 refused" in out
    text = dest.read_text()
    assert "proxy_layers: 8" in text and "connection_id:" in text


def test_cli_reads_measured_profile_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from charllm import modelcat

    model = modelcat.get("llama3-70b", 4)
    for g in ("h100", "h200"):
        for tp in (1, 2, 4, 8):
            for mb in (1, 2, 4, 8, 16, 32, 64):
                roofline_profile(model, g, tp, mb, 8192).write(tmp_path / "prof")
    args = ["search", "--cluster", "h100-8x8:8", "--cluster", "h200-4x8:8", "--model", "llama3-70b", "--layers", "4"]
    args += ["--seq-len", "8192", "--global-batch", "64", "--top", "1"]
    rc, from_files, _ = _run(capsys, *args, "--profiles", str(tmp_path / "prof"))
    assert rc == 0 and "profiles: 56 from" in from_files
    rc, roofline, _ = _run(capsys, *args)
    assert rc == 0
    best = [ln for ln in from_files.splitlines() if ln.startswith("#1 ")]
    assert best and best == [ln for ln in roofline.splitlines() if ln.startswith("#1 ")]


# -- bad input: a clear error naming the file (or option) and the field -----------------------------


def _bad_profile_dir(tmp_path: Path, edit) -> Path:
    from charllm import modelcat

    d = tmp_path / "bad"
    path = roofline_profile(modelcat.get("llama3-70b", 4), "h100", 1, 1, 8192).write(d)
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    "case",
    [
        "unknown-cluster",
        "zero-gpus",
        "zero-nodes-file",
        "profile-field",
        "profile-json",
        "profile-model",
        "no-cluster",
        "too-many-shapes",
    ],
)
def test_cli_bad_input(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["search", "--model", "llama3-70b", "--layers", "4", "--seq-len", "8192"]
    if case == "unknown-cluster":
        args, want = (
            [*base, "--cluster", "h100-9x9"],
            ["--cluster h100-9x9", "cluster", "no cluster profile", "h200-4x8"],
        )
    elif case == "zero-gpus":
        args, want = (
            [*base, "--cluster", "h100-8x8:0", "--cluster", "h200-4x8"],
            ["--cluster h100-8x8:0", "gpus", "0 GPUs"],
        )
    elif case == "zero-nodes-file":
        f = tmp_path / "empty-h100.yaml"
        f.write_text("name: empty-h100\ngpu_type: h100\ngpus_per_node: 8\nnodes: 0\n")
        args, want = [*base, "--cluster", str(f)], [str(f), "nodes", "greater than or equal to 1"]
    elif case == "profile-field":
        path = _bad_profile_dir(tmp_path, lambda r: r["layers"][2].update(fwd_s="fast"))
        args = [*base, "--cluster", "h100-8x8:8", "--profiles", str(path.parent)]
        want = [str(path), "layers[2].fwd_s", "must be a number"]
    elif case == "profile-json":
        path = _bad_profile_dir(tmp_path, lambda r: None)
        path.write_text(path.read_text()[:100])
        args, want = [*base, "--cluster", "h100-8x8:8", "--profiles", str(path.parent)], [str(path), "JSON"]
    elif case == "profile-model":
        path = _bad_profile_dir(tmp_path, lambda r: r["model"].update(hidden=4096))
        args = [*base, "--cluster", "h100-8x8:8", "--profiles", str(path.parent)]
        want = [str(path), "model.hidden", "another model"]
    elif case == "too-many-shapes":  # refused at once, before the enumeration runs away
        args = ["search", "--model", "llama3-70b", "--cluster", "h100-8x8", "--cluster", "h200-4x8"]
        args += ["--max-stages", "64", "--max-group-sizes", "8"]
        want = ["max_stages", "more than 5000 device-group shapes", "--max-group-sizes"]
    else:
        args, want = base, ["--cluster", "at least one cluster"]
    rc, out, err = _run(capsys, *args)
    assert rc == 2, (out, err)
    assert "Traceback" not in err
    for w in want:
        assert w in err, (w, err)


def test_emitted_campaign_leaves_out_what_the_engine_refuses(tmp_path: Path) -> None:
    """gpt3-125m has 12 heads: a tp-8 plan cannot run, the tp-4 one can; the file keeps only that."""
    import argparse

    from charllm import modelcat
    from charllm.campaign import load_campaign, load_cluster
    from charllm.paths import include_dir
    from charllm.predict.search import Plan, StagePlan
    from charllm.predict.search_cli import emit_campaigns

    def plan(tp: int, cost: float) -> Plan:
        st = StagePlan("h100-8x8", "h100", 8, 8 // tp, tp, 128 // (8 // tp) // 4, 0, 12, 1.0, 1 << 30)
        return Plan(cost_s=cost, micro_batches=4, stages=(st,), bubble_s=0.0, p2p_s=0.0, sync_s=0.0)

    cluster = load_cluster("h100-8x8", include_dir() / "clusters", "test")
    args = argparse.Namespace(emit_max=8, campaign_name="t", connection_id=None, global_batch=128, seq_len=2048)
    model = modelcat.get("gpt3-125m")
    dest = tmp_path / "c.yaml"
    lines = emit_campaigns(dest, [plan(8, 1.0), plan(4, 2.0)], {"h100-8x8": cluster}, model, None, args)
    print(lines)
    assert "1 plans left out: the engine refuses them" in lines[0]
    lc = load_campaign(dest, check=False)
    assert not lc.refused and [(c.parallel.tp, c.parallel.dp) for c in lc.cells] == [(4, 2)]
    assert "*id" not in dest.read_text()  # no YAML aliases
    # nothing runnable: no file
    lines = emit_campaigns(tmp_path / "none.yaml", [plan(8, 1.0)], {"h100-8x8": cluster}, model, None, args)
    assert "every homogeneous plan is refused" in lines[0] and not (tmp_path / "none.yaml").exists()


def test_memo_only_where_memory_grows_with_the_micro_batch() -> None:
    """The dominance memo assumes memory grows with the micro batch; a profile set where it does not is priced."""
    from dataclasses import replace

    from charllm.predict.search import _monotone

    base = _toy_profile()
    bigger = replace(
        base,
        micro_batch=2,
        layers=tuple(replace(x, saved_activation_bytes=x.saved_activation_bytes * 2) for x in base.layers),
    )
    smaller = replace(base, micro_batch=2, layers=tuple(replace(x, saved_activation_bytes=0) for x in base.layers))
    pool = Pool("p", "h100", 4, 4, 1000, nvlink_bytes_s=100.0, network_bytes_s=10.0)
    for second, mono in ((bigger, {(0, 1)}), (smaller, set())):
        prob = Problem((pool,), ProfileSet([base, second]), n_blocks=4, global_batch=8, seq_len=1, hidden=2)
        assert _monotone(prob) == mono
        full, pruned = search(prob, prune=False), search(prob, prune=True)
        print(f"mono={mono}: unpruned {full.steps}, pruned {pruned.steps} steps, {len(full.ranked)} fit")
        assert pruned.ranked == full.ranked and full.ranked


def test_search_prices_the_recorded_h200_cells() -> None:
    """Replay: the profiles recorded on one H200 (docs/gpu/predict-h200-run*.json, GPT-3 1.3B and a
    2-block Llama-3 8B, micro batch 1-8, no recompute). On a pool of that one GPU the search's only
    plan is the recorded cell (dp 1, tp 1, M = global / micro batch); its cost must be the measured
    median step time within 15 % and its memory the measured peak within 10 %."""
    repo = Path(__file__).resolve().parent.parent
    ratios = []
    for run in (1, 2):
        rec = json.loads((repo / "docs" / "gpu" / f"predict-h200-run{run}.json").read_text())
        for cell in rec["sweep"] + rec["llama"]:
            if cell["recompute"]:
                continue
            prof = LayerProfile.from_dict(cell["profile"], f"predict-h200-run{run}.json: {cell['name']}")
            prob = Problem(
                pools=(Pool.of("h200", "h200", 1, 8),), profiles=ProfileSet([prof]), n_blocks=prof.n_layers,
                global_batch=cell["global_batch"], seq_len=prof.seq_len, hidden=prof.model.hidden,
            )  # fmt: skip
            res = search(prob)
            assert len(res.ranked) == 1
            best = res.best
            assert best is not None and best.micro_batches == cell["global_batch"] // cell["micro_batch"]
            t = best.cost_s / cell["step_time_median_s"]
            m = best.stages[0].memory_bytes / cell["max_memory_allocated_bytes"]
            ratios.append(t)
            print(f"run{run} {cell['name']}: step {best.cost_s:.4f} / {cell['step_time_median_s']:.4f} s = {t:.3f}, "
                  f"memory {m:.3f}")  # fmt: skip
            assert 0.85 <= t <= 1.15 and 0.90 <= m <= 1.10, cell["name"]
    assert len(ratios) == 12


def test_per_stage_strategies() -> None:
    """Every stage its own dp/tp: a superset of the per-class space (best no worse), pruned == unpruned."""
    cls = search(scenario(10, 16, max_stages=4), prune=True)
    full = search(scenario(10, 16, max_stages=4, per_stage=True), prune=False)
    pruned = search(scenario(10, 16, max_stages=4, per_stage=True), prune=True)
    print(
        f"per stage, 10 blocks 16+16, <= 4 stages: {full.candidates} candidates (per class {cls.candidates}); "
        f"steps {pruned.steps}/{full.steps} = {pruned.steps / full.steps:.3f}; best {full.ranked[0][0]:.4f} s "
        f"(per class {cls.ranked[0][0]:.4f} s)"
    )
    assert full.candidates > cls.candidates
    assert pruned.ranked == full.ranked and pruned.steps <= 0.95 * full.steps
    assert full.ranked[0][0] <= cls.ranked[0][0]
    assert any(len({s.tp for s in p.stages}) > 1 for p in pruned.plans(200))  # stages of one plan differ

"""The megatron engine's parallel layouts on 2 and 4 CPU processes (gloo), real megatron-core, no mocks.

All two-rank layouts run in ONE ``torchrun --nproc-per-node 2``, the four-rank ones in one
``--nproc-per-node 4`` (this module's ``__main__`` is the worker: it builds one engine after
the other in the same process group), so the megatron-core import (~10 s a process on 2
cores) is paid once per launch; each test reads its layout's losses and ``describe()`` from
that run. The one-rank references run in the pytest process.

Equal-function comparisons (pp 2 vs pp 1, pp 2 x 2 virtual vs pp 1, ep 2 vs ep 1, FSDP vs
Megatron DDP, tp 2 vs tp 1 with ep 2 and with FSDP) use fp32 and :meth:`MegatronEngine.reinit_layout_invariant` (the same weights
whatever rank builds a layer or an expert). Tolerance :data:`LOSS_ATOL`: the layouts do the
same arithmetic per layer, but sums run in different orders (gradient norms over shards,
reduce-scatter vs all-reduce, tokens regrouped per expert by the all-to-all), which moves fp32
losses by ~1e-7 relative per step; 6 Adam steps at lr 1e-2 keep that below 1e-5 (observed:
<= 1.9e-6). A wrong gradient (a missing reduction, a mis-routed token) moves them by > 1e-2.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core==0.16.1)")

from charllm.train.cell import CellSpec
from charllm.train.dist import DistEnv
from tests.train.conftest import REPO, child_env, free_port, make_cell
from tests.train.test_parallel_modes import TINY_LLAMA, TINY_MOE

CPU = torch.device("cpu")
STEPS = 6
LOSS_ATOL = 1e-4
TINY4 = {**make_cell()["model"], "name": "tiny-4l", "n_layers": 4}  # pp 2 x vp 2 needs 4 layers

# name -> (cell overrides, reinit_layout_invariant), per number of ranks
LAYOUTS: dict[int, dict[str, tuple[dict[str, Any], bool]]] = {
    2: {
        "pp2": ({"parallel": {"pp": 2}, "model": TINY4}, True),
        "pp2_vp2": ({"parallel": {"pp": 2, "pp_virtual": 2}, "model": TINY4}, True),
        "tp2_sp_llama_recompute": ({"parallel": {"tp": 2}, "model": TINY_LLAMA, "opt": {"recompute": True}}, False),
        "dp2_distopt_overlap": ({"parallel": {"dp": 2}, "opt": {"overlap": True}}, False),
        "fsdp_dp2": ({"parallel": {"dp": 2, "fsdp": True}}, False),
        "moe_ep1": ({"parallel": {"dp": 2}, "model": TINY_MOE}, True),
        "moe_ep2": ({"parallel": {"dp": 2, "ep": 2}, "model": TINY_MOE}, True),
        # references for the 4-rank layouts (Megatron's CPU init gives tp 1 and tp 2 the same weights)
        "moe_ep2_overlap": ({"parallel": {"dp": 2, "ep": 2}, "model": TINY_MOE, "opt": {"overlap": True}}, False),
        "llama_dp2": ({"parallel": {"dp": 2}, "model": TINY_LLAMA}, False),
    },
    4: {
        # the campaigns' Mixtral layouts: expert parallelism with tp > 1 (uneven token gathers)
        "tp2_dp2_ep2": (
            {"parallel": {"tp": 2, "dp": 2, "ep": 2}, "model": TINY_MOE, "opt": {"overlap": True}},
            False,
        ),
        # the campaigns' TP8 + FSDP layouts, scaled down
        "tp2_dp2_fsdp": ({"parallel": {"tp": 2, "dp": 2, "fsdp": True}, "model": TINY_LLAMA}, False),
        # FSDP2 under Megatron's 1F1B schedule, against Megatron DDP
        "pp2_dp2_fsdp": ({"parallel": {"pp": 2, "dp": 2, "fsdp": True}, "model": TINY4}, False),
        "pp2_dp2": ({"parallel": {"pp": 2, "dp": 2}, "model": TINY4}, False),
        # tp + interleaved pp + selective recompute + overlap
        "tp2_pp2_vp2": (
            {
                "parallel": {"tp": 2, "pp": 2, "pp_virtual": 2},
                "model": {**TINY_LLAMA, "name": "tiny-llama-4l", "n_layers": 4},
                "opt": {"overlap": True, "recompute": True, "recompute_granularity": "selective"},
            },
            False,
        ),
    },
}


def layout_cell(over: dict[str, Any]) -> dict[str, Any]:
    cell = make_cell(engine="megatron", steps=STEPS, **{k: v for k, v in over.items() if k != "opt"})
    cell["opt"].update({"lr": 1e-2, **over.get("opt", {})})
    return cell


def train(cell: CellSpec, denv: DistEnv, reinit: bool) -> tuple[list[float], dict[str, Any]]:
    """Build the engine in this process (its group already started) and run STEPS steps."""
    from megatron.core import parallel_state as ps

    from charllm.train.engine_megatron import build

    eng = build(cell, denv, CPU)
    try:
        if reinit:
            eng.reinit_layout_invariant(cell.seed)
        losses = []
        for s in range(STEPS):
            loss, _, _ = eng.reduce_step_stats(eng.step(s), 0.0, math.nan)
            losses.append(loss)
        return losses, eng.describe()
    finally:
        ps.destroy_model_parallel()


def in_process(over: dict[str, Any], reinit: bool) -> tuple[list[float], dict[str, Any]]:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return train(CellSpec.from_dict(layout_cell(over)), DistEnv(0, 1, 0, "single"), reinit)
    finally:
        dist.destroy_process_group()


def _worker(out: Path) -> None:
    """``torchrun --nproc-per-node N -m tests.train.test_megatron_layouts OUT``: every layout of LAYOUTS[N]."""
    from datetime import timedelta

    import torch.distributed as dist

    from charllm.train.dist import detect

    denv = detect()
    dist.init_process_group("gloo", rank=denv.rank, world_size=denv.world_size, timeout=timedelta(seconds=120))
    results: dict[str, Any] = {}
    for name, (over, reinit) in LAYOUTS[denv.world_size].items():
        t0 = time.time()
        losses, desc = train(CellSpec.from_dict(layout_cell(over)), denv, reinit)
        descs: list[Any] = [None] * denv.world_size
        dist.all_gather_object(descs, desc)
        results[name] = {"losses": losses, "engines": descs, "seconds": time.time() - t0}
        if denv.rank == 0:
            out.write_text(json.dumps(results))  # what finished so far, should a later layout fail
    dist.destroy_process_group()


def _launch(nproc: int, out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "tests.train.test_megatron_layouts", str(out),
    ]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results["_log"] = p.stdout[-3000:] + p.stderr[-6000:]
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _launch(2, tmp_path_factory.mktemp("megatron-layouts") / "results2.json")


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _launch(4, tmp_path_factory.mktemp("megatron-layouts") / "results4.json")


def _run(results: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in results:
        pytest.fail(f"layout {name} did not finish in the two-rank run:\n{results['_log']}")
    r: dict[str, Any] = results[name]
    losses = r["losses"]
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[0] == pytest.approx(math.log(512), abs=0.3)  # starts near uniform over the vocab
    assert min(losses[-2:]) < losses[0] - 0.2, losses  # and learns the token chain (4 layers: > 0.25)
    return r


@pytest.fixture(scope="module")
def pp1_reference() -> list[float]:
    return in_process({"model": TINY4}, reinit=True)[0]


@pytest.mark.multiproc
def test_pp2_1f1b_matches_pp1(two_ranks: dict[str, Any], pp1_reference: list[float]) -> None:
    r = _run(two_ranks, "pp2")
    assert r["losses"] == pytest.approx(pp1_reference, abs=LOSS_ATOL)
    e0, e1 = r["engines"]
    assert e0["pp_schedule"] == "1F1B (megatron-core)" and (e0["coords"]["pp"], e1["coords"]["pp"]) == (0, 1)
    assert e0["mesh"] == {"pp": 2, "dp": 1, "tp": 1, "ep": 1, "vp": 1} and e0["grad_accum"] == 4


@pytest.mark.multiproc
def test_pp2_interleaved_matches_pp1(two_ranks: dict[str, Any], pp1_reference: list[float]) -> None:
    r = _run(two_ranks, "pp2_vp2")
    assert r["losses"] == pytest.approx(pp1_reference, abs=LOSS_ATOL)
    e = r["engines"][0]
    assert e["pp_schedule"] == "interleaved 1F1B (megatron-core, 2 virtual stages)"
    assert e["overlap"]["p2p"] is True  # Megatron-LM's P2P mode for interleaving


@pytest.mark.multiproc
def test_tp2_sequence_parallel_llama_with_recompute(two_ranks: dict[str, Any]) -> None:
    r = _run(two_ranks, "tp2_sp_llama_recompute")
    e = r["engines"][0]
    assert e["sequence_parallel"] is True and e["mesh"]["tp"] == 2
    assert e["recompute"] == "full (uniform, 1 layer per group)" and e["cpu_shim"] is True
    # each rank holds its column/row (and vocabulary) shards: about half of the whole model
    shape = CellSpec.from_dict(layout_cell({"model": TINY_LLAMA})).model
    whole = shape.n_params() + shape.vocab_size * shape.hidden  # + the untied output layer
    assert [x["params_local"] for x in r["engines"]] == [e["params_local"]] * 2
    assert e["params_local"] < 0.6 * whole


@pytest.mark.multiproc
def test_dp2_distributed_optimizer_with_overlap(two_ranks: dict[str, Any]) -> None:
    r = _run(two_ranks, "dp2_distopt_overlap")
    e = r["engines"][0]
    assert e["ddp"] == {
        "use_distributed_optimizer": True,
        "overlap_grad_reduce": True,
        "overlap_param_gather": True,
        "grad_reduce_in_fp32": False,
        "bucket_size": 40_000_000,
    }
    assert e["overlap"] == {
        "requested": True,
        "grad_reduce": True,
        "param_gather": True,
        "tp_comm": False,
        "p2p": False,
    }
    assert e["optimizer"].startswith("megatron DistributedOptimizer") and e["grad_accum"] == 2


@pytest.mark.multiproc
def test_fsdp_dp2_matches_megatron_ddp(two_ranks: dict[str, Any]) -> None:
    r = _run(two_ranks, "fsdp_dp2")
    ddp = _run(two_ranks, "dp2_distopt_overlap")
    assert r["losses"] == pytest.approx(ddp["losses"], abs=LOSS_ATOL)  # same data, same init, same math
    e = r["engines"][0]
    assert e["fsdp"].startswith("torch FSDP2") and e["ddp"] is None
    assert e["optimizer"].startswith("megatron FP32Optimizer")


@pytest.mark.multiproc
def test_moe_ep2_matches_ep1(two_ranks: dict[str, Any]) -> None:
    ep1 = _run(two_ranks, "moe_ep1")
    ep2 = _run(two_ranks, "moe_ep2")
    assert ep2["losses"] == pytest.approx(ep1["losses"], abs=LOSS_ATOL)
    e1, e2 = ep1["engines"][0], ep2["engines"][0]
    assert e2["moe"] == {
        "experts": 4,
        "top_k": 2,
        "dispatcher": "alltoall",
        "aux_loss_coeff": 0.01,
        "grouped_gemm": False,
    }
    assert [e["coords"]["ep"] for e in ep2["engines"]] == [0, 1]
    assert e2["params_local"] < e1["params_local"]  # each rank holds 2 of the 4 experts


@pytest.mark.multiproc
def test_four_ranks_tp2_with_ep2_fsdp_and_interleaved_pp(two_ranks: dict[str, Any], four_ranks: dict[str, Any]) -> None:
    """tp 2 added to dp 2 x ep 2, and to dp 2 + FSDP, computes what tp 1 computes; FSDP under pp 2 what DDP
    computes; tp 2 x pp 2 x vp 2 trains."""
    ep = _run(four_ranks, "tp2_dp2_ep2")
    assert ep["losses"] == pytest.approx(_run(two_ranks, "moe_ep2_overlap")["losses"], abs=LOSS_ATOL)
    assert [e["coords"]["ep"] for e in ep["engines"]] == [0, 0, 1, 1]  # tp innermost, then ep
    fsdp = _run(four_ranks, "tp2_dp2_fsdp")
    assert fsdp["losses"] == pytest.approx(_run(two_ranks, "llama_dp2")["losses"], abs=LOSS_ATOL)
    assert fsdp["engines"][0]["sequence_parallel"] is True and fsdp["engines"][0]["fsdp"] is not None
    assert _run(four_ranks, "pp2_dp2_fsdp")["losses"] == pytest.approx(
        _run(four_ranks, "pp2_dp2")["losses"], abs=LOSS_ATOL
    )
    e = _run(four_ranks, "tp2_pp2_vp2")["engines"][0]
    assert e["pp_schedule"].startswith("interleaved") and e["recompute"] == "selective (core_attn)"
    assert [x["coords"]["pp"] for x in _run(four_ranks, "tp2_pp2_vp2")["engines"]] == [0, 0, 1, 1]


def test_check_layout_refusals() -> None:
    from charllm.train.cell import ParallelSpec
    from charllm.train.engine_megatron import check_layout
    from charllm.train.errors import EngineUnavailableError

    base = CellSpec.from_dict(layout_cell({"model": TINY4}))
    moe = CellSpec.from_dict(layout_cell({"model": TINY_MOE, "parallel": {"dp": 2}}))
    cases = [
        (replace(base, parallel=ParallelSpec(cp=2)), "context parallelism"),
        (replace(base, opt=replace(base.opt, compile=True)), "opt.compile"),
        (replace(base, parallel=ParallelSpec(pp=2), opt=replace(base.opt, pp_schedule="gpipe")), "1F1B"),
        (replace(base, parallel=ParallelSpec(pp_virtual=2)), "needs pp > 1"),
        (replace(base, parallel=ParallelSpec(pp=3)), "not divisible by pp"),
        (replace(base, parallel=ParallelSpec(pp=2, pp_virtual=4)), "not divisible by pp"),
        (replace(base, parallel=ParallelSpec(pp=2, pp_virtual=2), global_batch=6, micro_batch=2), "multiple of pp"),
        (replace(base, parallel=ParallelSpec(tp=2), seq_len=63), "seq_len 63 is not divisible by tp"),
        (replace(base, parallel=ParallelSpec(tp=3)), "padded vocabulary 512 is not divisible by tp 3"),
        (replace(moe, parallel=ParallelSpec(dp=2, ep=4)), "must divide dp"),
        (replace(moe, parallel=ParallelSpec(dp=2, ep=2, fsdp=True)), "fsdp with ep"),
    ]
    for cell, words in cases:
        for device in (CPU, torch.device("cuda")):  # the same refusals on both
            with pytest.raises(EngineUnavailableError, match=words):
                check_layout(cell, device)
    # what the campaigns ask for passes
    for p in (
        ParallelSpec(pp=2, pp_virtual=2),
        ParallelSpec(tp=2, dp=2, fsdp=True),
        ParallelSpec(dp=2),
        ParallelSpec(pp=2, dp=2, fsdp=True),
    ):
        check_layout(replace(base, parallel=p, opt=replace(base.opt, recompute=True, overlap=True)), CPU)
    check_layout(replace(moe, parallel=ParallelSpec(dp=2, ep=2)), CPU)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker(Path(sys.argv[1]))

"""The megatron-core engine on CPU (gloo): real megatron-core GPTModel, DDP, optimizer, schedules; no mocks.

Skipped only when ``megatron.core`` cannot be imported (install: megatron-core==0.16.1). The
two-rank layouts (pp, interleaved pp, tp + sequence parallel, dp + distributed optimizer,
FSDP, MoE with ep) are in test_megatron_layouts.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core==0.16.1)")

from charllm.train import FAILED_EXIT_CODE
from charllm.train.cell import CellSpec
from charllm.train.dist import DistEnv
from charllm.train.run import run
from tests.train.conftest import launch, make_cell
from tests.train.test_parallel_modes import TINY_MOE

CPU = torch.device("cpu")


def _cell(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "engine": "megatron",
        "warmup": {"min_steps": 1, "max_steps": 4, "step_time_cv": 0.5},
        "steps": 8,
    }
    opt = over.pop("opt", {})
    base.update(over)
    cell = make_cell(**base)
    cell["opt"].update({"lr": 1e-2, **opt})
    return cell


def _in_process(cell: CellSpec, steps: int) -> tuple[list[float], Any]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from charllm.train.engine_megatron import build

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        eng = build(cell, DistEnv(0, 1, 0, "single"), CPU)
        return [float(eng.step(s)) for s in range(steps)], eng
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def test_tiny_gptmodel_builds_and_loss_falls_in_process() -> None:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt.gpt_model import GPTModel

    cell = CellSpec.from_dict(_cell())
    losses, eng = _in_process(cell, 10)
    assert isinstance(eng.chunks[0], GPTModel) and isinstance(eng.model[0], DistributedDataParallel)
    assert len(eng.chunks[0].decoder.layers) == cell.model.n_layers
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(512), abs=0.5)  # starts near uniform over the vocab
    assert min(losses[-3:]) < losses[0] - 1.0, losses
    d = eng.describe()
    assert d["engine"] == "megatron" and d["megatron_core"] == "0.16.1" and "Sdpa" in d["core_attention"]
    assert d["layer_spec"] == "local" and d["transformer_engine"] is False  # TE is not installable here
    assert d["ddp"]["use_distributed_optimizer"] is True and d["overlap"]["grad_reduce"] is False
    assert d["pp_schedule"] is None and d["cpu_shim"] is True and d["params"] == "fp32"
    assert d["fusions"] == {  # torch.compile'd fusions are GPU-only
        "bias_activation": False,
        "bias_dropout": False,
        "cross_entropy": False,
        "gradient_accumulation": False,
        "rope": False,
    }


@pytest.mark.parametrize(
    ("over", "recompute"),
    [
        ({"opt": {"recompute": True}}, "full (uniform, 1 layer per group)"),
        ({"opt": {"recompute": True, "recompute_granularity": "selective"}}, "selective (core_attn)"),
        ({"opt": {"recompute": True, "recompute_layers": 1}}, "full (block, first 1 layers per stage)"),
    ],
)
def test_recompute_runs_on_cpu_and_changes_nothing_but_memory(over: dict[str, Any], recompute: str) -> None:
    """Megatron's checkpointing on CPU (the shim maps its CUDA RNG calls): the same losses as without."""
    plain, _ = _in_process(CellSpec.from_dict(_cell()), 4)
    losses, eng = _in_process(CellSpec.from_dict(_cell(**over)), 4)
    assert eng.describe()["recompute"] == recompute
    assert losses == pytest.approx(plain, abs=1e-5)


def test_bf16_moe_rope_in_process() -> None:
    """Mixtral-shaped MoE (RoPE, GQA, RMSNorm, SwiGLU experts), bf16 parameters with fp32 main params."""
    losses, eng = _in_process(CellSpec.from_dict(_cell(model=TINY_MOE, precision="bf16")), 6)
    assert min(losses[-2:]) < losses[0] - 0.5, losses
    d = eng.describe()
    assert d["params"] == "bf16, fp32 main params" and "DistributedOptimizer" in d["optimizer"]
    assert d["moe"]["experts"] == 4 and d["ddp"]["grad_reduce_in_fp32"] is True
    assert all(q.dtype == torch.bfloat16 for q in eng.chunks[0].parameters())


def test_moe_dispatch_keeps_positions_causal() -> None:
    """Changing tokens from position 40 on leaves the losses before 40 unchanged (router, all-to-all, SDPA)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from charllm.train.engine_megatron import build

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        eng = build(CellSpec.from_dict(_cell(model=TINY_MOE)), DistEnv(0, 1, 0, "single"), CPU)
        x, y = eng.data.micro_batch(0)
        x2 = x.clone()
        x2[:, 40:] = (x2[:, 40:] + 7) % 512
        with eng._device_ctx(), torch.no_grad():
            a = eng.chunks[0](x, eng.position_ids, None, labels=y)
            b = eng.chunks[0](x2, eng.position_ids, None, labels=y)
        assert torch.equal(a[:, :40], b[:, :40])
        assert not torch.allclose(a[:, 40:], b[:, 40:])
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def test_layer_spec_selection_without_transformer_engine() -> None:
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from charllm.train.megatron_spec import select_layer_spec, transformer_engine_importable

    assert transformer_engine_importable() is False  # not installable on this machine
    for on_gpu, te in ((True, False), (False, False), (False, True)):  # TE on a CPU node is not used
        spec, name = select_layer_spec(4, "RMSNorm", on_gpu=on_gpu, te_importable=te)
        assert name == "local" and spec.module is TransformerLayer
        assert spec.submodules.self_attention.submodules.core_attention.__name__ == "SdpaCoreAttention"


def test_cpu_shim_maps_cuda_placements_and_restores_torch_cuda() -> None:
    from charllm.train.megatron_cpu import cpu_shim

    before = (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.get_rng_state)
    with cpu_shim():
        z = torch.zeros(3, device="cuda")
        e = torch.empty(2, device=torch.cuda.current_device())
        assert z.device == CPU and e.device == CPU
        assert torch.ones(1).cuda().device == CPU
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        state = torch.cuda.get_rng_state()  # the CPU generator
        a = torch.rand(2)
        torch.cuda.set_rng_state(state)
        assert torch.equal(a, torch.rand(2))
    assert (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.get_rng_state) == before
    assert torch.ones(1).type() == "torch.FloatTensor"


def test_cli_megatron_cell_writes_ok_result(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = launch(_cell(), out)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "result.json").read_text())
    assert res["outcome"] == "ok" and res["error"] is None
    m = res["metrics"]
    assert m["measured_steps"] == 8
    assert m["loss_last"] < m["loss_first"] - 0.05
    eng = res["provenance"]["engine"]
    assert eng["engine"] == "megatron" and eng["mesh"] == {"pp": 1, "dp": 1, "tp": 1, "ep": 1, "vp": 1}
    assert (out / "steps.csv").exists()


@pytest.mark.multiproc
def test_cli_megatron_pp2_reports_the_last_stage_loss(tmp_path: Path) -> None:
    """Through the job: only the last pipeline stage has the loss; the reported loss is its loss."""
    out = tmp_path / "pp2"
    p = launch(_cell(parallel={"pp": 2}, steps=6, opt={"overlap": True}), out, nproc=2, timeout_s=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    res = json.loads((out / "result.json").read_text())
    assert res["outcome"] == "ok"
    m = res["metrics"]
    assert m["loss_first"] == pytest.approx(math.log(512), abs=0.5)  # not halved by a rank reporting 0
    assert m["loss_last"] < m["loss_first"] - 0.05
    eng = res["provenance"]["engine"]
    assert eng["pp_schedule"] == "1F1B (megatron-core)" and eng["mesh"]["pp"] == 2


def test_unsupported_layout_fails_the_job_with_the_reason(tmp_path: Path) -> None:
    cell = _cell(opt={"compile": True})
    (tmp_path / "c.json").write_text(json.dumps(cell))
    assert run(tmp_path / "c.json", tmp_path / "out", env={}) == FAILED_EXIT_CODE
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["outcome"] == "failed" and "compile" in res["error"]


def test_engine_guard_agrees_with_the_capability_table() -> None:
    """The engine's own last guard (check_layout) and the table refuse exactly the same cells."""
    import random

    from charllm import modelcat
    from charllm.capabilities import job_refusals
    from charllm.train.engine_megatron import check_layout
    from charllm.train.errors import CellConfigError, EngineUnavailableError

    rng = random.Random(20261201)
    shapes = [modelcat.get(n) for n in ("tiny", "tiny-llama", "tiny-moe", "gpt3-1.3b", "llama3-70b", "mixtral-8x7b")]
    shapes += [modelcat.get("gpt3-175b", 12), modelcat.get("mixtral-8x22b", 8)]
    shapes.append(modelcat.ModelShape("gpt3-moe", "gpt3", 2, 64, 4, 256, 512, num_experts=4, top_k=2, max_seq_len=256))
    checked = refused = 0
    for _ in range(10000):
        m = rng.choice(shapes)
        tp, pp, vp, dp, ep = (
            rng.choice(v) for v in ([1, 2, 4, 8], [1, 2, 3, 4], [1, 1, 2, 3], [1, 2, 4, 8], [1, 2, 4, 8])
        )
        mb = rng.choice([1, 2, 4])
        over = {
            "model": m.as_dict(),
            "parallel": {
                "tp": tp,
                "pp": pp,
                "dp": dp,
                "ep": ep,
                "pp_virtual": vp,
                "cp": rng.choice([1, 1, 1, 2]),
                "fsdp": rng.random() < 0.2,
            },
            "opt": {
                "recompute": rng.random() < 0.4,
                "recompute_granularity": rng.choice(["full", "selective"]),
                "overlap": rng.random() < 0.5,
                "compile": rng.random() < 0.05,
                "pp_schedule": rng.choice(["1f1b", "1f1b", "gpipe"]),
            },
            "micro_batch": mb,
            "global_batch": mb * dp * rng.choice([1, 2, 3, 4, 8]),
            "seq_len": rng.choice([64, 100, 128, 256]),
            "world_size": tp * pp * dp,
        }
        over["parallel"]["cp"] = 1 if rng.random() < 0.9 else 2
        over["world_size"] = tp * pp * dp * over["parallel"]["cp"]
        try:
            spec = CellSpec.from_dict(_cell(**over))
        except CellConfigError:
            continue  # a layout no engine runs: refused before any engine guard
        table = job_refusals(spec, "cpu")
        try:
            check_layout(spec, CPU)
            guard = None
        except EngineUnavailableError as err:
            guard = str(err)
        assert bool(table) == (guard is not None), (over, table, guard)
        checked += 1
        refused += bool(table)
    print(f"table and engine guard agree on {checked} cells ({refused} refused)")
    assert checked > 1000 and 0.1 < refused / checked < 0.9


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"opt": {"overlap": True, "recompute": True}},
        {"opt": {"recompute": True, "recompute_granularity": "selective"}},
        {"parallel": {"fsdp": True}},
        {"model": TINY_MOE, "precision": "bf16"},
    ],
    ids=["base", "cc-full", "selective", "fsdp", "moe-bf16"],
)
def test_engine_settings_match_what_the_engine_builds(over: dict[str, Any]) -> None:
    """``capabilities.engine_settings`` (plan, docs) says what ``describe()`` records the engine used."""
    from charllm.capabilities import engine_settings, spec_view

    cell = CellSpec.from_dict(_cell(**over))
    _, eng = _in_process(cell, 1)
    d, s = eng.describe(), engine_settings(spec_view(cell, "cpu"))
    assert s["recompute"].split(" ")[0] == d["recompute"].split(" ")[0]
    assert ("FSDP2" in s["dp"]) == bool(d["fsdp"])
    assert ("distributed optimizer" in s["optimizer"]) == bool(d["ddp"] and d["ddp"]["use_distributed_optimizer"])
    assert ("sequence parallel" in s["tp"]) == d["sequence_parallel"]
    assert (d["pp_schedule"] is None) == (s["pp"] == "1")
    assert s["layer spec"].startswith("megatron-core local") == (d["layer_spec"] == "local")
    assert ("moe" in s) == (d["moe"] is not None)
    if d["moe"]:
        assert f"{d['moe']['experts']} experts, top-{d['moe']['top_k']}" in s["moe"] and d["moe"]["dispatcher"] in s[
            "moe"
        ].replace("-", "")
    assert s["weights"].startswith("bf16") == d["params"].startswith("bf16")

"""The megatron-core engine on CPU (gloo): real megatron-core GPTModel, no mocks.

Skipped only when ``megatron.core`` cannot be imported (install: megatron-core==0.16.1).
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
from charllm.train.errors import EngineUnavailableError
from charllm.train.run import run
from tests.train.conftest import launch, make_cell
from tests.train.test_parallel_modes import TINY_LLAMA, TINY_MOE

CPU = torch.device("cpu")


def _cell(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "engine": "megatron",
        "warmup": {"min_steps": 1, "max_steps": 4, "step_time_cv": 0.5},
        "steps": 8,
    }
    base.update(over)
    cell = make_cell(**base)
    cell["opt"]["lr"] = 1e-2
    return cell


def test_tiny_gptmodel_builds_and_loss_falls_in_process() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    from charllm.train.engine_megatron import build

    cell = CellSpec.from_dict(_cell())
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(cell.seed)
        eng = build(cell, DistEnv(0, 1, 0, "single"), CPU)
        assert isinstance(eng.model, GPTModel)
        assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_data_parallel_world_size() == 1
        assert len(eng.model.decoder.layers) == cell.model.n_layers
        x, y = eng.data.micro_batch(0)
        with torch.no_grad():
            per_token = eng.model(x, eng.position_ids, None, labels=y)
        assert per_token.shape == (cell.micro_batch, cell.seq_len)
        losses = [float(eng.step(s)) for s in range(10)]
        assert all(math.isfinite(v) for v in losses)
        assert losses[0] == pytest.approx(math.log(512), abs=0.5)  # starts near uniform over the vocab
        assert losses[-1] < losses[0] - 0.5, losses
        assert all(q.grad is None for q in eng.params)  # zeroed after each step
        d = eng.describe()
        assert d["engine"] == "megatron" and d["megatron_core"] == "0.16.1" and "Sdpa" in d["core_attention"]
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


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
    assert eng["engine"] == "megatron" and eng["mesh"] == {"pp": 1, "dp": 1, "tp": 1}
    assert (out / "steps.csv").exists()


@pytest.mark.multiproc
def test_cli_megatron_tp2_over_gloo_trains(tmp_path: Path) -> None:
    out = tmp_path / "tp2"
    p = launch(_cell(parallel={"tp": 2}), out, nproc=2, timeout_s=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    res = json.loads((out / "result.json").read_text())
    assert res["outcome"] == "ok"
    m = res["metrics"]
    assert m["loss_last"] < m["loss_first"] - 0.05
    eng = res["provenance"]["engine"]
    assert eng["mesh"]["tp"] == 2 and eng["grad_sync"] == "none"
    # each rank holds its column/row shard, so less than the whole model
    one = launch(_cell(steps=1), tmp_path / "tp1")
    assert one.returncode == 0, one.stderr[-2000:]
    whole = json.loads((tmp_path / "tp1" / "result.json").read_text())["provenance"]["engine"]["params_local"]
    assert eng["params_local"] < 0.75 * whole


@pytest.mark.multiproc
def test_cli_megatron_dp2_averages_gradients(tmp_path: Path) -> None:
    out = tmp_path / "dp2"
    p = launch(_cell(parallel={"dp": 2}), out, nproc=2, timeout_s=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    res = json.loads((out / "result.json").read_text())
    assert res["outcome"] == "ok"
    assert res["metrics"]["loss_last"] < res["metrics"]["loss_first"] - 0.05
    eng = res["provenance"]["engine"]
    assert eng["mesh"]["dp"] == 2 and eng["grad_sync"] == "allreduce-after-backward" and eng["grad_accum"] == 2


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"parallel": {"pp": 2}}, "pipeline parallelism"),
        ({"opt": {"recompute": True}}, "CUDA RNG"),
        ({"model": TINY_LLAMA}, "RotaryEmbedding"),
        ({"model": TINY_MOE}, "MoE"),
        ({"parallel": {"dp": 2, "fsdp": True}}, "fsdp"),
    ],
)
def test_unsupported_layouts_are_refused_clearly(over: dict[str, Any], words: str) -> None:
    from charllm.train.engine_megatron import check_layout

    cell = CellSpec.from_dict(_cell(**over))
    with pytest.raises(EngineUnavailableError, match=words) as err:
        check_layout(cell, CPU)
    assert "engine 'megatron' cannot run this cell" in str(err.value)


def test_unsupported_layout_fails_the_job_with_the_reason(tmp_path: Path) -> None:
    cell = _cell(opt={"recompute": True})
    (tmp_path / "c.json").write_text(json.dumps(cell))
    assert run(tmp_path / "c.json", tmp_path / "out", env={}) == FAILED_EXIT_CODE
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["outcome"] == "failed" and "opt.recompute on CPU" in res["error"]

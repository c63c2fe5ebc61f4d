"""Every parallel mode trains the tiny model on 2 CPU processes (gloo) and its loss falls.

Each case is one ``torchrun --nproc-per-node 2 -m charllm.train`` (about 10 s on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.train.conftest import launch, make_cell

pytestmark = pytest.mark.multiproc

TINY_LLAMA = {
    "name": "tiny-llama", "family": "llama3", "n_layers": 2, "hidden": 64, "n_heads": 4, "ffn_hidden": 192,
    "vocab_size": 512, "n_kv_heads": 2, "num_experts": 0, "top_k": 0, "max_seq_len": 256,
}  # fmt: skip
TINY_MOE = {**TINY_LLAMA, "name": "tiny-moe", "family": "mixtral", "ffn_hidden": 128, "num_experts": 4, "top_k": 2}

CASES: dict[str, dict[str, Any]] = {
    "ddp_overlapped": {"parallel": {"dp": 2}, "opt": {"overlap": True}},
    "dp_allreduce_after_backward": {"parallel": {"dp": 2}},
    "fsdp2": {"parallel": {"dp": 2, "fsdp": True}, "opt": {"recompute": True}},
    "tp_llama_gqa_rope": {"parallel": {"tp": 2}, "model": TINY_LLAMA},
    "pp_1f1b_profiled": {"parallel": {"pp": 2}, "opt": {"profile": True, "profile_steps": 2}},
    "pp_gpipe_moe": {"parallel": {"pp": 2}, "model": TINY_MOE, "opt": {"pp_schedule": "gpipe"}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_process_mode_trains(case: str, tmp_path: Path) -> None:
    over = CASES[case]
    cell = make_cell(
        steps=8,
        warmup={"min_steps": 1, "max_steps": 4, "step_time_cv": 0.5},
        **{k: v for k, v in over.items() if k != "opt"},
    )
    cell["opt"].update({"lr": 1e-2, **over.get("opt", {})})
    out = tmp_path / case
    p = launch(cell, out, nproc=2, timeout_s=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    res = json.loads((out / "result.json").read_text())
    m = res["metrics"]
    assert res["outcome"] == "ok"
    assert m["loss_last"] < m["loss_first"] - 0.05, (m["loss_first"], m["loss_last"])
    eng = res["provenance"]["engine"]
    assert len(res["provenance"]["placement"]) == 2
    assert (out / "telemetry" / "node_rank1.parquet").exists()
    if case == "ddp_overlapped":
        assert eng["grad_sync"] == "ddp-overlapped"
    if case == "dp_allreduce_after_backward":
        assert eng["grad_sync"] == "allreduce-after-backward"
    if case == "fsdp2":
        assert eng["grad_sync"] == "fsdp2" and eng["recompute"].startswith("full")
    if case.startswith("pp"):
        assert eng["pp_schedule"] == ("ScheduleGPipe" if "gpipe" in case else "Schedule1F1B")
    if case == "pp_1f1b_profiled":
        for r in (0, 1):  # one profiled rank per pipeline stage
            text = (out / f"kernels_rank{r}.csv").read_text()
            assert text.startswith("category,time_s,fraction,count")
            assert "send/recv" in text


@pytest.mark.parametrize("mode", ["on", "off"])
def test_one_gpu_bf16_params(mode: str, tmp_path: Path) -> None:
    """bf16 weights through FSDP2 on a one-rank mesh (the GPU default) train like autocast."""
    cell = make_cell(precision="bf16", steps=8, warmup={"min_steps": 1, "max_steps": 3, "step_time_cv": 0.5})
    cell["opt"].update({"lr": 1e-2, "bf16_params": mode, "attn_backend": "cudnn"})
    p = launch(cell, tmp_path, timeout_s=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    m, eng = res["metrics"], res["provenance"]["engine"]
    assert res["outcome"] == "ok"
    assert m["loss_last"] < m["loss_first"] - 0.05, (m["loss_first"], m["loss_last"])
    assert eng["attention"] == "sdpa auto (cpu)"  # backend flags apply to CUDA devices only
    if mode == "on":
        assert eng["grad_sync"] == "fsdp2" and eng["params"].startswith("bf16")
    else:
        assert eng["grad_sync"] == "none" and eng["params"] == "fp32 (autocast)"

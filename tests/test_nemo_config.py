"""engine: nemo's mapping of cells to NeMo 2.7 configuration (charllm.nemo_config; no NeMo import).

Every cell of the CharLLM-PPT paper campaigns, re-targeted at engine nemo, is mapped and
checked against the cell (parallel sizes, batches, precision, the optimisation code's bits);
a few representative cells are compared to golden files in tests/golden/nemo/ (regenerate with
CHARLLM_REGEN_GOLDEN=1 after a deliberate change, and review the diff).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from charllm import capabilities
from charllm.campaign import load_campaign
from charllm.nemo_config import nemo_config
from charllm.train.cell import CellSpec

REPO = Path(__file__).resolve().parent.parent
CAMPAIGNS = REPO / "include" / "campaigns"
GOLDEN = REPO / "tests" / "golden" / "nemo"
PAPER = ("charllm-h200-opt.yaml", "charllm-fig4-parallelism.yaml", "charllm-microbatch.yaml", "charllm-h100-opt.yaml")
# representative cells: one per model family and optimisation code, plus FSDP refused
GOLDEN_CELLS = {
    "h200-gpt3-175b-tp4pp8-00000": ("charllm-h200-opt.yaml", "gpt3-175b", (4, 8), "00000"),
    "h200-gpt3-175b-tp4pp8-11000": ("charllm-h200-opt.yaml", "gpt3-175b", (4, 8), "11000"),
    "h200-llama3-70b-tp8pp2-10000": ("charllm-h200-opt.yaml", "llama3-70b", (8, 2), "10000"),
    "h100-mixtral-8x22b-tp2pp4-01000": ("charllm-h100-opt.yaml", "mixtral-8x22b", (2, 4), "01000"),
}


def _paper_cells():
    out = []
    for f in PAPER:
        lc = load_campaign(CAMPAIGNS / f)
        for c in lc.cells:
            raw = dict(c.job_config(0))
            raw["engine"] = "nemo"
            out.append((f, CellSpec.from_dict(raw)))
    return out


@pytest.fixture(scope="module")
def cells():
    return _paper_cells()


def _code(spec: CellSpec) -> str:
    return f"{int(spec.opt.overlap)}{int(spec.opt.recompute)}000"


def test_every_paper_cell_maps_or_is_refused(cells):
    mapped = refused = 0
    for fname, spec in cells:
        refusals = capabilities.refusals(spec.view("cuda"))
        if refusals:
            # what engine nemo lacks, said at plan time: only FSDP among the paper's cells
            assert spec.parallel.fsdp, (fname, spec.name, refusals)
            assert any(r.field == "fsdp" for r in refusals)
            with pytest.raises(ValueError, match="fsdp"):
                nemo_config(spec)
            refused += 1
            continue
        cfg = nemo_config(spec)
        json.dumps(cfg)  # plain values
        p, s, m = spec.parallel, cfg["strategy"], cfg["model"]
        assert (s["tensor_model_parallel_size"], s["pipeline_model_parallel_size"]) == (p.tp, p.pp)
        assert s["expert_model_parallel_size"] == p.ep and s["sequence_parallel"] == (p.tp > 1)
        d = cfg["data"]
        assert (d["micro_batch_size"], d["global_batch_size"], d["seq_length"]) == (
            spec.micro_batch,
            spec.global_batch,
            spec.seq_len,
        )
        assert cfg["grad_accum"] == spec.grad_accum
        assert cfg["precision"]["precision"] == "bf16-mixed" and cfg["ddp"]["grad_reduce_in_fp32"]
        assert cfg["ddp"]["use_distributed_optimizer"] and cfg["optimizer"]["use_distributed_optimizer"]
        # code a (cc): overlapped grad reduce and param gather, TP comm overlap with tp > 1
        assert cfg["ddp"]["overlap_grad_reduce"] == cfg["ddp"]["overlap_param_gather"] == spec.opt.overlap
        assert m["tp_comm_overlap"] == (spec.opt.overlap and p.tp > 1)
        # code b (act): full activation recompute, uniform, one layer per group
        if spec.opt.recompute:
            assert (m["recompute_granularity"], m["recompute_method"], m["recompute_num_layers"]) == (
                "full",
                "uniform",
                1,
            )
        else:
            assert m["recompute_granularity"] is None
        assert m["num_layers"] == spec.model.n_layers and m["hidden_size"] == spec.model.hidden
        assert m["num_query_groups"] == spec.model.kv_heads
        assert (m.get("num_moe_experts") or 0) == spec.model.num_experts
        t = cfg["trainer"]
        assert t["devices"] * t["num_nodes"] == spec.world_size and t["devices"] <= 8
        mapped += 1
    print(f"{mapped} paper cells mapped to NeMo, {refused} refused (FSDP) across {len(PAPER)} campaigns")
    assert mapped > 150


@pytest.mark.parametrize("golden", sorted(GOLDEN_CELLS))
def test_golden(cells, golden):
    fname, model, (tp, pp), code = GOLDEN_CELLS[golden]
    found = [
        s
        for f, s in cells
        if f == fname
        and s.model.name == model
        and (s.parallel.tp, s.parallel.pp) == (tp, pp)
        and not s.parallel.fsdp
        and _code(s) == code
    ]
    assert found, golden
    cfg = nemo_config(found[0])
    path = GOLDEN / f"{golden}.json"
    text = json.dumps(cfg, indent=1, sort_keys=True) + "\n"
    if os.environ.get("CHARLLM_REGEN_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs: regenerate with CHARLLM_REGEN_GOLDEN=1 and review"


def test_nemo_engine_table_refuses_what_it_lacks():
    from charllm.modelcat import get

    base = dict(engine="nemo", device="cuda", model=get("gpt3-1.3b"), global_batch=8, seq_len=2048)
    assert capabilities.refusals(capabilities.CellView(**base)) == []
    for extra, fld in (
        ({"cp": 2}, "cp"),
        ({"dp": 2, "fsdp": True}, "fsdp"),
        ({"compile": True}, "compile"),
        ({"dataset": "indexed"}, "dataset"),
    ):
        r = capabilities.refusals(capabilities.CellView(**{**base, **extra}))
        assert [x.field for x in r] == [fld], r
        print(fld, "->", r[0])
    for engine in ("torch", "megatron"):  # the other engines keep reading indexed data
        assert capabilities.refusals(capabilities.CellView(**{**base, "engine": engine, "dataset": "indexed"})) == []
    r = capabilities.refusals(capabilities.CellView(**{**base, "device": "cpu"}))
    assert r and "does not run on cpu" in r[0].reason


def test_mapping_needs_no_nemo_or_torch():
    import subprocess

    code = (
        "import sys, charllm.nemo_config; "
        "bad = [m for m in ('torch', 'nemo', 'lightning', 'megatron') if m in sys.modules]; print(bad); assert not bad"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr

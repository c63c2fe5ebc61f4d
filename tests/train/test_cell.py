"""CELL.json validation: every problem is a CellConfigError that names the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from charllm.modelcat import get
from charllm.train.cell import CellSpec
from charllm.train.errors import CellConfigError
from tests.train.conftest import make_cell


def test_example_cell_parses(example_cell: dict[str, Any]) -> None:
    spec = CellSpec.from_dict(example_cell)
    assert spec.model == get("tiny")
    assert spec.grad_accum == 4
    assert spec.tokens_per_step == 8 * 64
    assert spec.telemetry_hz == 20.0
    assert spec.opt.lr > 0 and spec.warmup.cv_window_steps == 5  # optional keys take defaults


def test_from_json_roundtrip(tmp_path: Path, example_cell: dict[str, Any]) -> None:
    p = tmp_path / "cell.json"
    p.write_text(json.dumps(example_cell))
    spec = CellSpec.from_json(p)
    again = CellSpec.from_dict(spec.as_dict())
    assert again == spec


@pytest.mark.parametrize("key", ["cell_id", "seed", "model", "parallel", "micro_batch", "steps", "precision"])
def test_missing_required_key_is_named(example_cell: dict[str, Any], key: str) -> None:
    del example_cell[key]
    with pytest.raises(CellConfigError, match=key):
        CellSpec.from_dict(example_cell)


def test_missing_model_key_is_named(example_cell: dict[str, Any]) -> None:
    del example_cell["model"]["hidden"]
    with pytest.raises(CellConfigError, match="model is missing keys: hidden"):
        CellSpec.from_dict(example_cell)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"micro_batch": "2"}, "micro_batch must be int"),
        ({"steps": True}, "steps must be int, got a boolean"),
        ({"precision": "fp16"}, "precision must be one of bf16, fp32"),
        ({"gpu_type": "tpu"}, "gpu_type must be one of"),
        ({"global_batch": 7}, "global_batch: global batch 7 is not divisible by micro_batch\\*dp"),
        ({"seq_len": 4096}, "seq_len: 4096 exceeds tiny's maximum sequence length 256"),
        ({"parallel": {"tp": 3}}, "world size mismatch: world_size 2"),
        ({"opt": {"recompute": "yes"}}, "opt.recompute must be bool"),
        ({"parallel": {"ep": 2}}, "ep: expert parallel size 2 on dense model tiny"),
        ({"warmup": {"min_steps": 5, "max_steps": 2}}, "min_steps <= max_steps"),
        ({"telemetry": {"hz": 0}}, "telemetry.hz must be > 0"),
    ],
)
def test_bad_values(over: dict[str, Any], message: str) -> None:
    cell = make_cell(**over)
    if "parallel" in over:
        cell["world_size"] = 2 if over["parallel"].get("tp") == 3 else cell["world_size"]
    with pytest.raises(CellConfigError, match=message):
        CellSpec.from_dict(cell)


def test_tp_must_divide_heads() -> None:
    cell = make_cell(parallel={"tp": 8})
    with pytest.raises(CellConfigError, match="tp: tensor parallel size 8 does not divide tiny's 4 attention heads"):
        CellSpec.from_dict(cell)


def test_not_json(tmp_path: Path) -> None:
    p = tmp_path / "cell.json"
    p.write_text("{nope")
    with pytest.raises(CellConfigError, match="not valid JSON"):
        CellSpec.from_json(p)
    with pytest.raises(CellConfigError, match="does not exist"):
        CellSpec.from_json(tmp_path / "missing.json")


def test_every_cell_of_the_shipped_campaigns_parses() -> None:
    from charllm.campaign import load_campaign

    n = 0
    for path in sorted((Path(__file__).resolve().parents[2] / "include" / "campaigns").glob("*.yaml")):
        for cell in load_campaign(path).cells:
            spec = CellSpec.from_dict(cell.job_config(0))
            assert spec.cell_id == cell.cell_id
            n += 1
    assert n > 0

"""The PCIe study's scaling table: its published derived columns, and ours from a replayed campaign."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from charllm.analysis.scaling import DERIVED_COLUMNS, derive, from_cells, scaling_table, strategy_of
from charllm.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "pcie-strategies"
STUDY = ("single-tp-dpp-pp-experiment-results.csv", "simple-single-and-zero-experiment-results.csv")


@pytest.mark.parametrize("name", STUDY)
def test_derived_columns_reproduce_the_study(name: str) -> None:
    published = pd.read_csv(DATA / name)
    raw = published.drop(columns=list(DERIVED_COLUMNS)).sample(frac=1.0, random_state=0)  # order must not matter
    ours = derive(raw, keys=["model_size"]).set_index(["model_size", "strategy", "num_devices"])
    ref = published.set_index(["model_size", "strategy", "num_devices"]).loc[ours.index]
    worst = 0.0
    for col in DERIVED_COLUMNS:
        a, b = ours[col].to_numpy(float), ref[col].to_numpy(float)
        nz = b != 0
        rel = np.abs(a[nz] - b[nz]) / np.abs(b[nz])
        assert np.all(np.abs(a[~nz]) <= 1e-9), col  # 1-GPU rows: 0 % overhead
        assert rel.max() <= 1e-9, (col, rel.max())
        worst = max(worst, float(rel.max()))
    print(f"{name}: {len(ours)} rows, {len(DERIVED_COLUMNS)} derived columns, worst relative error {worst:.2e}")
    one_b = ours.loc[("1b", "megatron_ddp", 2)] if "1b" in ours.index.get_level_values(0) else None
    if one_b is not None:  # REFERENCE.md: 1B DDP2 7847 tok/s, 72.9 % of 2 x 5386
        assert round(one_b["throughput_efficiency_percent"], 1) == 72.9


def test_a_row_without_its_baseline_keeps_nan() -> None:
    raw = pd.DataFrame(
        {
            "model_size": ["a", "a", "b"],
            "num_devices": [1, 2, 2],
            "total_time_sec": [10.0, 6.0, 5.0],
            "throughput_tokens_sec": [100.0, 160.0, 200.0],
            "avg_gpu_mem_mb": [10.0, 6.0, 5.0],
            "total_gpu_mem_mb": [10.0, 12.0, 10.0],
            "peak_gpu_mem_mb": [20.0, 12.0, 10.0],
            "name": ["a1", "a2", "b2"],
        }
    )
    out = derive(raw, ["model_size"], name="name")
    assert out["throughput_efficiency_percent"].tolist()[:2] == [100.0, 80.0]
    assert out["relative_runtime_overhead_percent"][1] == pytest.approx(-40.0)
    assert np.isnan(out["throughput_scaling_factor"][2])
    assert out["baseline_cell"].tolist()[:2] == ["a1", "a1"] and pd.isna(out["baseline_cell"][2])
    with pytest.raises(ValueError, match="peak_gpu_mem_mb"):
        derive(raw.drop(columns=["peak_gpu_mem_mb"]))


def test_strategy_names() -> None:
    cases = [
        ({"tp": 1, "pp": 1, "dp": 1, "world_size": 1}, "single_gpu"),
        ({"tp": 2, "pp": 1, "dp": 1, "world_size": 2}, "tp"),
        ({"tp": 1, "pp": 4, "dp": 1, "world_size": 4}, "pp"),
        ({"tp": 1, "pp": 1, "dp": 4, "world_size": 4}, "ddp"),
        ({"tp": 1, "pp": 1, "dp": 2, "world_size": 2, "zero": 3, "cpu_offload": True}, "zero3_offload"),
        ({"tp": 1, "pp": 1, "dp": 2, "world_size": 2, "fsdp": True}, "fsdp"),
        ({"tp": 2, "pp": 2, "dp": 1, "world_size": 4}, "hybrid"),
    ]
    for row, want in cases:
        assert strategy_of(pd.Series(row)) == want


def test_scaling_table_of_the_replayed_gpu_runs(replay_module, tmp_path: Path) -> None:
    """The recorded 2 x H200 FSDP run against the recorded 1-GPU GPT-3 1.3B cells, through the CLI."""
    rp, info = replay_module
    cells = pd.read_parquet(info["cells_table"])
    raw = from_cells(cells)
    assert len(raw) == cells["cell_name"].nunique()
    table = scaling_table(cells)
    fsdp = table[table["strategy"] == "fsdp"].iloc[0]
    # its baseline: a 1-GPU 1.3B cell with the same micro batch (8), the plainest code, first by name
    assert fsdp["baseline_cell"] == "gpt3-1.3b-tp1pp1dp1-mb8-gb32-s2048-00000"
    base = table[table["cell_name"] == fsdp["baseline_cell"]].iloc[0]
    # by hand from the two recorded result.json files
    res = json.loads((Path(__file__).resolve().parents[1] / "data/gpu/h200x2-fsdp-zero2/result.json").read_text())
    m = res["metrics"]
    assert fsdp["num_devices"] == 2
    assert fsdp["throughput_tokens_sec"] == pytest.approx(m["tokens_per_s"], rel=1e-12)
    assert fsdp["peak_gpu_mem_mb"] == pytest.approx(m["max_memory_allocated_bytes"] / 2**20, rel=1e-12)
    assert fsdp["total_gpu_mem_mb"] == pytest.approx(sum(res["per_rank"]["max_memory_allocated_bytes"]) / 2**20)
    want_eff = m["tokens_per_s"] / (2 * base["throughput_tokens_sec"]) * 100
    assert fsdp["throughput_efficiency_percent"] == pytest.approx(want_eff, rel=1e-12)
    assert base["throughput_scaling_factor"] == 1.0 and base["relative_runtime_overhead_percent"] == 0.0
    oom = table[table["outcome"] == "oom"]
    assert len(oom) == 1 and np.isnan(oom["throughput_tokens_sec"].iloc[0])  # OOM stays, without numbers
    drift = table[table["cell_name"] == "gpt3-1.3b-tp1pp1dp1-mb8-gb32-s2048-01000"].iloc[0]
    assert drift["repeats"] == 3  # three nights, reduced to their median
    print(table[["cell_name", "strategy", "num_devices", "throughput_tokens_sec", "throughput_efficiency_percent"]])

    # the CLI: charllm table scaling NAME --tables DIR --out OUT
    out = tmp_path / "out"
    tables = Path(info["cells_table"]).parent
    assert main(["table", "scaling", rp.lc.name, "--tables", str(tables), "--out", str(out), "--quiet"]) == 0
    csv = pd.read_csv(out / "scaling.csv")
    pq_ = pd.read_parquet(out / "scaling.parquet")
    assert list(csv.columns) == list(pq_.columns) == list(table.columns)
    assert csv["throughput_efficiency_percent"].to_numpy() == pytest.approx(
        table["throughput_efficiency_percent"].to_numpy(), rel=1e-9, nan_ok=True
    )
    # the campaign file finds the tables under $CHARLLM_HOME/tables/<name>
    assert main(["table", "scaling", str(rp.include / "campaigns" / "replay.yaml"), "--quiet"]) == 0
    assert (tables / "scaling.csv").is_file()
    assert main(["table", "scaling", "../etc", "--quiet"]) == 2  # neither a file nor a name
    assert main(["table", "scaling", "replay", "--tables", str(tmp_path / "none")]) == 2
    assert main(["table", "scaling", "replay", "--tables", str(tables), "--by", "nope", "--quiet"]) == 2

"""The job entry point on one CPU rank: outputs, exit statuses, failure and OOM paths."""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from charllm.train import FAILED_EXIT_CODE, OOM_EXIT_CODE
from charllm.train.run import _fail, run
from tests.train.conftest import REPO, child_env, launch, make_cell

RECORDED_OOM = (REPO / "tests/data/gpu/oom/oom_message.txt").read_text().split(": ", 1)[1].strip()


def _fast(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "opt": {"lr": 1e-2},
        "warmup": {"min_steps": 1, "max_steps": 4, "step_time_cv": 0.5},
        "steps": 8,
    }
    base.update(over)
    return make_cell(**base)


def test_single_rank_cli_writes_result_steps_and_node_telemetry(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # zeus: on, as a GPU node's auto would (on a CPU without RAPL, auto skips Zeus: time only)
    p = launch(_fast(telemetry={"hz": 20, "zeus": "on"}), out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[measure] loss" in p.stdout  # progress lines for the Slurm log

    res = json.loads((out / "result.json").read_text())
    assert set(res) >= {"outcome", "error", "metrics", "provenance"}
    assert res["outcome"] == "ok" and res["error"] is None
    m = res["metrics"]
    assert all(isinstance(v, float) for v in m.values())  # flat name -> number
    assert m["step_time_p10_s"] <= m["step_time_median_s"] <= m["step_time_p90_s"]
    assert m["tokens_per_s"] == pytest.approx(8 * 64 / m["step_time_median_s"])
    assert m["samples_per_s"] == pytest.approx(8 / m["step_time_median_s"])
    assert m["loss_last"] < m["loss_first"] - 0.05, "tiny model must learn the synthetic chain"
    assert m["measured_steps"] == 8
    # CPU: no GPU numbers are invented
    for k in ("mfu", "energy_per_step_j", "avg_power_w", "max_memory_allocated_bytes", "sampling_rate_min_hz"):
        assert k not in m
    assert m["node_telemetry_samples"] >= 1
    prov = res["provenance"]
    assert prov["warmup"]["criteria"]["max_steps"] == 4
    assert prov["placement"][0]["rank"] == 0 and prov["software"]["torch"] == torch.__version__
    assert prov["cell"]["cell_id"] == "3f2a9c1b7d4e"
    assert "6*N_active*T" in prov["flops"]["formula"]

    rows = list(csv.DictReader((out / "steps.csv").open()))
    assert list(rows[0]) == ["step", "phase", "start_unix_s", "end_unix_s", "duration_s", "loss", "tokens"]
    phases = [r["phase"] for r in rows]
    assert phases == sorted(phases, key=lambda x: x != "warmup")  # warmup steps, then measured ones
    assert phases.count("measure") == 8 and 1 <= phases.count("warmup") <= 4
    for a, b in itertools.pairwise(rows):
        assert float(b["start_unix_s"]) == pytest.approx(float(a["end_unix_s"]))  # steps tile the timeline
    meas = [r for r in rows if r["phase"] == "measure"]
    t0, t1 = prov["measure_window_unix_s"]
    assert t1 - t0 == pytest.approx(sum(float(r["duration_s"]) for r in meas), abs=1e-4)
    # upstream Zeus measured the same steps (time only: no GPU, no RAPL here)
    assert prov["telemetry"]["zeus"].startswith("zeus 0.16") and prov["software"]["zeus"] == "0.16.0"
    assert m["zeus_window_s"] == pytest.approx(t1 - t0, abs=0.05)
    assert "zeus_gpu_energy_j" not in m

    assert not (out / "telemetry" / "rank0.parquet").exists()
    import pandas as pd

    node = pd.read_parquet(out / "telemetry" / "node_rank0.parquet")
    assert node["power_w"].isna().all() and node["gpu_temp_c"].isna().all()
    assert node["mem_used_bytes"].notna().all() and (node["rank"] == 0).all()


def test_oom_writes_oom_result_and_exit_42(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from charllm.train import engine_torch

    def boom(self: Any, step: int) -> Any:
        raise torch.OutOfMemoryError(RECORDED_OOM)

    monkeypatch.setattr(engine_torch.TorchEngine, "step", boom)
    cell = tmp_path / "cell.json"
    cell.write_text(json.dumps(_fast()))
    assert run(cell, tmp_path / "out", env={}) == OOM_EXIT_CODE == 42
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["outcome"] == "oom" and res["metrics"] == {}
    assert res["oom"]["rank"] == 0 and res["oom"]["attempted_alloc_bytes"] == 2**30
    assert res["error"].startswith("CUDA out of memory")
    # a later failure (say, a peer's NCCL abort caused by this OOM) does not overwrite it
    assert _fail(RuntimeError("NCCL watchdog timeout"), None, tmp_path / "out", {}) == FAILED_EXIT_CODE
    assert json.loads((tmp_path / "out" / "result.json").read_text())["outcome"] == "oom"


def test_failure_writes_failed_result_exit_1_and_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _fast()
    del bad["seq_len"]
    cell = tmp_path / "cell.json"
    cell.write_text(json.dumps(bad))
    assert run(cell, tmp_path / "out", env={}) == FAILED_EXIT_CODE
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["outcome"] == "failed" and "seq_len" in res["error"] and res["metrics"] == {}
    assert "Traceback" in capsys.readouterr().err


def test_world_size_mismatch_and_megatron_are_clear_failures(tmp_path: Path) -> None:
    two = _fast(parallel={"dp": 2})
    (tmp_path / "a.json").write_text(json.dumps(two))
    assert run(tmp_path / "a.json", tmp_path / "a", env={}) == FAILED_EXIT_CODE
    assert "launcher started 1 ranks" in json.loads((tmp_path / "a" / "result.json").read_text())["error"]
    meg = _fast(engine="megatron", model={**make_cell()["model"], "num_experts": 4, "top_k": 2})
    (tmp_path / "b.json").write_text(json.dumps(meg))
    assert run(tmp_path / "b.json", tmp_path / "b", env={}) == FAILED_EXIT_CODE
    assert "megatron" in json.loads((tmp_path / "b" / "result.json").read_text())["error"]


def test_stale_result_is_removed_before_a_rerun(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"outcome": "oom"}))
    bad = _fast()
    del bad["model"]
    (tmp_path / "c.json").write_text(json.dumps(bad))
    assert run(tmp_path / "c.json", out, env={}) == FAILED_EXIT_CODE
    assert json.loads((out / "result.json").read_text())["outcome"] == "failed"


def test_job_imports_neither_pydantic_nor_airflow() -> None:
    code = (
        "import sys, charllm.train.run, charllm.train.engine_torch, charllm.telemetry; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('pydantic', 'airflow')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_oom_exit_code_importable_without_torch() -> None:
    code = "import sys, charllm.train as t; sys.exit(0 if t.OOM_EXIT_CODE == 42 and 'torch' not in sys.modules else 1)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env()).returncode == 0

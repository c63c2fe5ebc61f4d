"""Helpers for the training-job tests: example cells and a 2-process torchrun launcher."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

EXAMPLE_CELL: dict[str, Any] = {
    "campaign": "demo",
    "cell_id": "3f2a9c1b7d4e",
    "name": "tiny-dp1-mb2",
    "repeat": 0,
    "seed": 1234,
    "model": {
        "name": "tiny",
        "family": "gpt3",
        "n_layers": 2,
        "hidden": 64,
        "n_heads": 4,
        "ffn_hidden": 256,
        "vocab_size": 512,
        "n_kv_heads": 0,
        "num_experts": 0,
        "top_k": 0,
        "max_seq_len": 256,
    },
    "parallel": {"tp": 1, "pp": 1, "dp": 1, "cp": 1, "ep": 1, "fsdp": False},
    "micro_batch": 2,
    "global_batch": 8,
    "seq_len": 64,
    "opt": {"recompute": False, "overlap": False, "compile": False},
    "steps": 10,
    "warmup": {"min_steps": 2, "max_steps": 20, "step_time_cv": 0.05, "temp_slope_c_per_s": 0.05},
    "engine": "torch",
    "precision": "fp32",
    "dataset": {"kind": "synthetic", "path": None},
    "telemetry": {"hz": 20},
    "gpu_type": "cpu",
    "world_size": 1,
}


def make_cell(**over: Any) -> dict[str, Any]:
    """The example cell with top-level keys replaced and ``opt``/``parallel`` entries merged."""
    c = copy.deepcopy(EXAMPLE_CELL)
    for k, v in over.items():
        if k in ("opt", "parallel", "warmup") and isinstance(v, dict):
            c[k].update(v)
        else:
            c[k] = v
    p = c["parallel"]
    c["world_size"] = p["tp"] * p["pp"] * p["dp"] * p["cp"]
    return c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def launch(cell: dict[str, Any], out: Path, nproc: int = 1, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m charllm.train`` (through torchrun when nproc > 1) in a subprocess."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cell.json"
    path.write_text(json.dumps(cell))
    if nproc == 1:
        cmd = [sys.executable, "-m", "charllm.train", "--cell", str(path), "--out", str(out)]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "charllm.train", "--cell", str(path), "--out", str(out),
        ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture
def example_cell() -> dict[str, Any]:
    return make_cell()

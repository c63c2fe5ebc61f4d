"""NeMo 2.7.3's real trainer through engine nemo on the CPU (no GPU, NeMo outside .venv).

Run from the repository root with NeMo's locked set on PYTHONPATH (a --target folder, never the
Airflow venv), e.g. ``PYTHONPATH=/tmp/nemo-site:$PWD .venv/bin/python docs/gpu/nemo/cpu_nemo_fit.py``.
Builds a tiny gpt3 cell's NeMo objects with :meth:`NemoEngine.build` (the real MegatronStrategy,
MegatronMixedPrecision, MegatronOptimizerModule, GPTModel, the fixed MockDataModule) and runs
``trainer.fit`` with the StepBoundaries callback under charllm's megatron CPU shim. What is
changed for the CPU, and only here: the Lightning accelerator ("cpu"), no pinned memory, NeMo's
data sampler's pinned tensor, the CUDA sync, a gloo group. This is how the NeMo/megatron-core
incompatibilities the engine works around were found (requirements-nemo.lock, engine_nemo.py).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
from charllm.nemo_config import nemo_config
from charllm.train.cell import CellSpec
from charllm.train.dist import DistEnv, reduce_step_stats
from charllm.train.engine_nemo import NemoEngine
from charllm.train.megatron_cpu import cpu_shim
from tests.train.conftest import make_cell


def main() -> None:
    import nemo
    import nemo.lightning as nl
    from nemo.collections import llm

    raw = make_cell(engine="nemo", steps=3, warmup={"min_steps": 1, "max_steps": 3, "step_time_cv": 0.5})
    raw["gpu_type"] = "h200"  # the cell as a GPU job sees it; run here on the CPU
    cell = CellSpec.from_dict(raw)
    print("cell:", cell.model.name, cell.model.n_layers, "layers, hidden", cell.model.hidden,
          "mb", cell.micro_batch, "gb", cell.global_batch, "seq", cell.seq_len)  # fmt: skip
    print("nemo", nemo.__version__, "megatron-core", __import__("megatron.core").core.__version__)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    class CpuEngine(NemoEngine):
        def __init__(self) -> None:  # no CUDA check
            self.cell, self.denv, self.device = cell, DistEnv(0, 1, 0, "single"), torch.device("cpu")
            self.config = nemo_config(cell)
            self.config["data"]["pin_memory"] = False
            self.accum, self.grad_sync, self.llm, self.te, self.spec_name = cell.grad_accum, "-", llm, False, "local"
            self.boundaries = None

        def sync(self) -> None:
            pass

        def reduce_step_stats(self, loss: Any, t: float, s: float) -> tuple[float, float, float]:
            return reduce_step_stats(loss, t, s, True, torch.device("cpu"))

    real_trainer, real_tensor = nl.Trainer, torch.tensor

    class CpuTrainer(real_trainer):  # type: ignore[misc,valid-type]
        def __init__(self, **kw: Any) -> None:
            kw["accelerator"] = "cpu"
            super().__init__(**kw)

    def tensor(*a: Any, **k: Any) -> Any:
        k.pop("pin_memory", None)
        return real_tensor(*a, **k)

    nl.Trainer, torch.tensor = CpuTrainer, tensor
    torch.cuda.device_count = lambda: 1  # type: ignore[assignment]

    class Job:
        rank, warmup, zeus_totals = 0, None, {}

        def _temp_slope(self, sampler: Any, is_gpu: bool) -> float:
            return float("nan")

    with cpu_shim():
        records = CpuEngine().train(Job(), None, False, None)
    for r in records:
        print(f"record: step {r.step} {r.phase} {r.duration_s:.4f} s loss {r.loss:.4f}")
    n_meas = sum(r.phase == "measure" for r in records)
    print(
        f"ok: {len(records)} steps, {n_meas} measured (warm-up hit its max_steps here, so max_steps and the callback end together)"
    )


if __name__ == "__main__":
    main()

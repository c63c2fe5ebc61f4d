"""Worker of tests/train/test_kwai_pcie_knobs.py: the torch engine under each ZeRO / CP variant.

Run under ``torchrun --nproc-per-node N`` (N = 1 or 2, gloo, fp32 on CPU). Every variant trains
the tiny llama for :data:`STEPS` steps on the *same global batch* whatever N is: a
:class:`Shards` source hands dp rank r (or, on one rank, micro batch r) row r of a fixed
global batch, so one rank with two micro batches and two ranks with one each compute the same
gradients. Writes ``{variant: {"losses": [loss per step], "offloaded": bytes}}`` as JSON to argv[2]
(rank 0; ``offloaded``: activation bytes the offload hooks copied out on rank 0 over the steps,
every saved tensor counting: the tiny model's are below the engine's 64 KiB floor).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.distributed as dist

STEPS = 5
SEQ = 32
TINY_LLAMA = {
    "name": "tiny-llama", "family": "llama3", "n_layers": 4, "hidden": 64, "n_heads": 4, "ffn_hidden": 192,
    "vocab_size": 512, "n_kv_heads": 2, "num_experts": 0, "top_k": 0, "max_seq_len": 256,
}  # fmt: skip

# variant -> (parallel, opt) on 2 ranks; on 1 rank every variant runs as plain dp 1
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "zero0": ({"dp": 2}, {}),
    "zero1": ({"dp": 2}, {"zero": 1}),
    "zero2": ({"dp": 2}, {"zero": 2}),
    "zero3": ({"dp": 2}, {"zero": 3}),
    "zero3_cpu_offload": ({"dp": 2}, {"zero": 3, "cpu_offload": True}),
    "tp2_kwai_offload": ({"tp": 2}, {"recompute": True, "recompute_granularity": "kwai", "offload_alpha": 0.5}),
    "pp2_1f1b_full_offload": ({"pp": 2}, {"recompute": True, "offload_alpha": 0.5}),
    "pp2_gpipe_kwai_offload": (
        {"pp": 2},
        {"recompute": True, "recompute_granularity": "kwai", "offload_alpha": 1.0, "pp_schedule": "gpipe"},
    ),
    "pp2_vp2_kwai_offload": (
        {"pp": 2, "pp_virtual": 2},
        {"recompute": True, "recompute_granularity": "kwai", "offload_alpha": 0.5},
    ),
    "cp2": ({"cp": 2}, {}),
    "cp2_kwai_offload": ({"cp": 2}, {"recompute": True, "recompute_granularity": "kwai", "offload_alpha": 0.5}),
}


class Shards:
    """Row ``(index % accum) * dp + dp_rank`` of a fixed global batch of ``dp * accum`` sequences."""

    def __init__(self, rows: int, dp: int, dp_rank: int, accum: int) -> None:
        gen = torch.Generator().manual_seed(7)
        seq = torch.randint(0, 512, (rows, SEQ + 1), generator=gen)
        self.x, self.y = seq[:, :-1], seq[:, 1:]
        self.dp, self.dp_rank, self.accum = dp, dp_rank, accum

    def micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = (index % self.accum) * self.dp + self.dp_rank
        return self.x[r : r + 1], self.y[r : r + 1]

    def batch(self, step: int, n_micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's micro batches stacked (pipelining splits them again)."""
        parts = [self.micro_batch(step * n_micro + m) for m in range(n_micro)]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def cell_dict(parallel: dict[str, Any], opt: dict[str, Any]) -> dict[str, Any]:
    par = {"tp": 1, "pp": 1, "dp": 1, "cp": 1, "ep": 1, "fsdp": False, **parallel}
    return {
        "campaign": "t", "cell_id": "0" * 16, "name": "knob", "seed": 5, "model": TINY_LLAMA, "parallel": par,
        "micro_batch": 1, "global_batch": 2, "seq_len": SEQ,
        "opt": {"lr": 1e-2, **opt}, "steps": STEPS, "engine": "torch", "precision": "fp32",
        "gpu_type": "cpu", "world_size": par["tp"] * par["pp"] * par["dp"] * par["cp"],
    }  # fmt: skip


def run_variant(parallel: dict[str, Any], opt: dict[str, Any]) -> tuple[list[float], int]:
    from charllm.train import offload
    from charllm.train.cell import CellSpec

    offload.MIN_BYTES = 0
    from charllm.train.engine_torch import TorchEngine

    cell = CellSpec.from_dict(cell_dict(parallel, opt))
    cell.check_engine("cpu")
    eng = TorchEngine(cell, None, torch.device("cpu"))  # type: ignore[arg-type]
    p = cell.parallel
    # cp ranks share one sequence; dp ranks take their own rows
    eng.data = Shards(2, p.dp, eng.dp_rank, eng.accum)  # type: ignore[assignment]
    losses = []
    for step in range(STEPS):
        loss = eng.step(step)
        mean, _, _ = eng.reduce_step_stats(loss, 0.0, float("nan"))
        losses.append(mean)
    return losses, sum(o for o, _ in eng.offload_steps)


def main() -> None:
    world = int(sys.argv[1])
    dist.init_process_group("gloo")
    assert dist.get_world_size() == world
    out: dict[str, dict[str, Any]] = {}
    runs = {"ref": ({}, {})} if world == 1 else VARIANTS
    for name, (par, opt) in runs.items():
        losses, offloaded = run_variant(par, opt)
        out[name] = {"losses": losses, "offloaded": offloaded}
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

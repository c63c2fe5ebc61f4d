"""The Megatron-Kwai / PCIe-study knobs of the torch engine (issue 13), on CPU in fp32.

- recompute ``selective`` / ``kwai`` / ``full`` give the gradients of ``none`` (1e-5), and the
  activation offload (saved-tensor hooks) round-trips bit for bit, in every mode;
- ZeRO 1/2/3 and ZeRO-3 + CPU offload on 2 gloo ranks, tp 2 with kwai + offload, pp 2 with
  offload (1F1B full, GPipe kwai, interleaved 1F1B with 2 virtual stages), and context
  parallelism (cp 2, ring attention; also with kwai + offload) reach 1 rank's losses at step 5
  on the same global batch within 1e-5 (CP too: the ring's log-sum-exp merge reorders float
  sums only; measured differences <= 1e-6);
- the job writes the offload counters into result.json and honours ``interconnect: pcie``;
- campaigns: the knobs at their defaults keep every cell id, bad values name file and field,
  and the capability table refuses what an engine lacks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from charllm.campaign import load_campaign
from charllm.errors import ConfigError
from charllm.modelcat import ModelShape
from charllm.train.model import Transformer, loss_fn
from tests.campaign_files import GOOD, write
from tests.train import knob_worker
from tests.train.conftest import REPO, child_env, free_port, launch, make_cell

TINY: dict[str, dict[str, Any]] = {
    "llama3": knob_worker.TINY_LLAMA,
    "gpt3": {**knob_worker.TINY_LLAMA, "name": "tiny-gpt", "family": "gpt3", "n_kv_heads": 0},
}


def _grads(family: str, mode: str, alpha: float) -> tuple[float, dict[str, torch.Tensor], tuple[int, int]]:
    from charllm.train import offload

    shape = ModelShape(**{**TINY[family], "n_layers": 3})
    model = Transformer(shape, 32, recompute=mode)
    model.init_weights(1)
    if alpha:
        model.offloader = offload.Offloader(alpha, torch.device("cpu"))
        model.offloader.register_buffers(model)
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(3))
    loss = loss_fn(model(x), torch.roll(x, -1, 1))
    loss.backward()
    counters = model.offloader.take_counters() if alpha else (0, 0)
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, counters


@pytest.mark.parametrize("family", ["llama3", "gpt3"])
def test_recompute_modes_match_none_and_offload_round_trips(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from charllm.train import offload

    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny model's tensors are all small
    l0, g0, _ = _grads(family, "none", 0.0)
    for mode in ("none", "selective", "kwai", "full"):
        lm, gm, _ = _grads(family, mode, 0.0)
        worst = max((gm[n] - g0[n]).abs().max().item() for n in g0)
        print(f"{family} {mode}: loss diff {lm - l0:+.2e}, max |grad diff| vs none {worst:.2e}")
        assert abs(lm - l0) < 1e-6 and worst < 1e-5
        for alpha in (0.5, 1.0):
            la, ga, (out, back) = _grads(family, mode, alpha)
            print(f"  offload alpha {alpha}: {out} bytes out, {back} back")
            assert out > 0 and back == out
            assert la == lm and all(torch.equal(ga[n], gm[n]) for n in gm), (mode, alpha)


def _one_rank_reference(tmp_path: Path) -> tuple[list[float], int]:
    """The worker's reference (plain dp 1) in this process, over a one-rank gloo group."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        return knob_worker.run_variant({}, {})
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_zero_stages_and_context_parallel_match_one_rank(tmp_path: Path) -> None:
    import subprocess

    out = tmp_path / "two.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), str(REPO / "tests" / "train" / "knob_worker.py"), "2", str(out),
    ]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    ref, _ = _one_rank_reference(tmp_path)
    two: dict[str, dict[str, Any]] = json.loads(out.read_text())
    print(f"1 rank: {ref}")
    assert set(two) == set(knob_worker.VARIANTS)
    for name, run in two.items():
        losses, offloaded = run["losses"], run["offloaded"]
        diff = abs(losses[-1] - ref[-1])
        print(f"{name}: step-5 loss {losses[-1]:.7f} (1 rank {ref[-1]:.7f}, diff {diff:.1e}), offloaded {offloaded} B")
        assert diff < 1e-5, name
        assert (offloaded > 0) == ("offload" in name and "cpu_offload" not in name), name
    assert ref[-1] < ref[0]  # it trains


def test_job_records_offload_counters_and_pcie_environment(tmp_path: Path) -> None:
    cell = make_cell(
        model={**TINY["llama3"], "n_layers": 2},
        seq_len=128,
        steps=3,
        warmup={"min_steps": 0, "max_steps": 0},
    )
    cell["opt"].update(
        {"recompute": True, "recompute_granularity": "kwai", "offload_alpha": 0.5, "interconnect": "pcie"}
    )
    p = launch(cell, tmp_path, timeout_s=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    m, prov = res["metrics"], res["provenance"]
    print({k: v for k, v in m.items() if k.startswith("offload")}, prov["engine"]["recompute"])
    assert res["outcome"] == "ok"
    assert m["offload_bytes_per_step"] > 0 and m["offload_fetch_bytes_per_step"] == m["offload_bytes_per_step"]
    assert m["offload_host_pinned_bytes"] >= m["offload_bytes_per_step"] / 4  # 4 micro batches per step
    assert prov["engine"]["recompute"] == "kwai (norms + MLP activation)"
    assert prov["engine"]["offload_alpha"] == 0.5
    assert prov["env"]["NCCL_P2P_DISABLE"] == "1" and prov["env"]["NCCL_NVLS_ENABLE"] == "0"
    assert prov["topology"] is None  # a CPU run has no GPU topology to record


def _ids(include: Path, text: str, name: str) -> dict[str, str]:
    return {c.name: c.cell_id for c in load_campaign(write(include, text, name)).cells}


def test_campaign_knobs_keep_ids_at_defaults_and_are_checked(include_tmp: Path) -> None:
    base = _ids(include_tmp, GOOD, "a.yaml")
    defaults = GOOD.replace(
        "sweep:\n",
        "sweep:\n  recompute_layers: [0]\n  offload_alpha: [0]\n  zero: [0]\n  cpu_offload: [false]\n"
        "  interconnect: [native]\n",
    )
    assert _ids(include_tmp, defaults, "b.yaml") == base
    knobs = GOOD.replace(
        "sweep:\n",
        "sweep:\n  recompute: [kwai]\n  offload_alpha: [0.25]\n  zero: [2]\n  cpu_offload: [true]\n"
        "  interconnect: [pcie]\n",
    )
    lc = load_campaign(write(include_tmp, knobs, "c.yaml"))
    cell = lc.cells[0]
    assert cell.opt["recompute_granularity"] == "kwai" and cell.opt["offload_alpha"] == 0.25
    assert cell.opt["zero"] == 2 and cell.opt["cpu_offload"] is True and cell.opt["interconnect"] == "pcie"
    assert cell.name.endswith("-rkwai-a0.25-z2-cpuoff-pcie") and not set(base.values()) & {cell.cell_id}
    job = cell.job_config(0)
    from charllm.train.cell import CellSpec

    spec = CellSpec.from_dict(job)
    assert (spec.opt.zero, spec.opt.offload_alpha, spec.opt.interconnect) == (2, 0.25, "pcie")

    bad: list[tuple[str, str, str]] = [
        ("  offload_alpha: [1.5]\n", "sweep.offload_alpha[0]", "less than or equal to 1"),
        ("  zero: [4]\n", "sweep.zero[0]", ""),
        ("  interconnect: [nvlink]\n", "sweep.interconnect[0]", ""),
        ("  recompute_layers: [1]\n", "sweep[0].recompute_layers", "without recompute"),
        ("  fsdp: [true]\n  zero: [1]\n", "sweep[0].zero", "use one"),
        ("  zero: [1]\n  cpu_offload: [true]\n", "sweep[0].cpu_offload", "needs zero 2 or 3"),
    ]
    for i, (axes, where, words) in enumerate(bad):
        path = write(include_tmp, GOOD.replace("sweep:\n", "sweep:\n" + axes), f"bad{i}.yaml")
        with pytest.raises(ConfigError, match=words) as exc:
            load_campaign(path)
        print(exc.value)
        assert exc.value.field == where, (exc.value.field, where)


@pytest.mark.parametrize(
    ("engine", "axes", "field", "words"),
    [
        ("megatron", "  recompute: [kwai]\n", "recompute", "torch engine only"),
        ("megatron", "  offload_alpha: [0.5]\n", "offload_alpha", "torch engine only"),
        ("megatron", "  dp: [2]\n  zero: [3]\n", "zero", "fsdp: true"),
        ("torch", "  model: [tiny-moe]\n  recompute: [kwai]\n", "model", "dense MLPs only"),
        ("torch", "  dp: [1]\n  cp: [2]\n  seq_len: [66]\n", "seq_len", "4 chunks"),
    ],
)
def test_engines_refuse_what_they_lack(include_tmp: Path, engine: str, axes: str, field: str, words: str) -> None:
    text = GOOD.replace("model: tiny\n", f"model: tiny\nengine: {engine}\n").replace("  dp: [1, 2]\n", "")
    path = write(include_tmp, text.replace("sweep:\n", "sweep:\n" + axes), "r.yaml")
    with pytest.raises(ConfigError, match=words) as exc:
        load_campaign(path)
    print(exc.value)
    assert exc.value.field.endswith(f".{field}")


def test_kwai_and_pcie_campaigns_validate() -> None:
    from charllm.campaign import load_campaign as load

    names = ("kwai-remat-1gpu", "kwai-remat-2gpu", "kwai-fig9-h100", "pcie-strategies", "pcie-pp-microbatch")
    for name in names:
        lc = load(REPO / "include" / "campaigns" / f"{name}.yaml")
        print(f"{name}: {len(lc.cells)} cells on {lc.cluster.name}")
        assert lc.cells
        assert (REPO / "dags" / f"campaign_{name.replace('-', '_')}.py").exists()

"""The capability table: what each engine runs, and the validator and the job agreeing on every cell."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from dataclasses import replace
from functools import cache
from typing import Any

import pytest

from charllm import capabilities, modelcat
from charllm.campaign import Campaign, ClusterProfile, resolve
from charllm.capabilities import MEGATRON, TORCH, CellView, device_of, job_refusals, recompute_mode, refusals
from charllm.errors import ConfigError
from charllm.train.cell import CellSpec
from charllm.train.errors import CellConfigError, EngineUnavailableError


def _view(**over: Any) -> CellView:
    base: dict[str, Any] = {"engine": "megatron", "device": "cuda", "model": modelcat.get("gpt3-1.3b")}
    base.update(seq_len=2048, global_batch=32, micro_batch=1)
    base.update(over)
    return CellView(**base)


def _fields(v: CellView) -> list[tuple[str, str]]:
    return [(r.field, r.kind) for r in refusals(v)]


def test_imports_neither_torch_nor_pydantic() -> None:
    code = "import sys, charllm.capabilities; print(sorted(m for m in ('torch', 'pydantic') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_vocab_padding_matches_the_model() -> None:
    from charllm.train import model

    assert capabilities.VOCAB_PAD == model.VOCAB_PAD
    assert capabilities.padded_vocab(50257) == model.padded_vocab(50257)


def test_megatron_target_capabilities() -> None:
    for feat in ("tp", "sequence_parallel", "pp", "pp_virtual", "dp", "ep", "fsdp", "overlap", "distributed_optimizer"):
        assert MEGATRON.supports(feat), feat
    for feat in ("recompute:none", "recompute:full", "recompute:selective", "family:gpt3", "family:mixtral"):
        assert MEGATRON.supports(feat), feat
    assert not MEGATRON.supports("cp") and not MEGATRON.supports("compile")
    # a paper-sized layout of each kind runs on GPUs
    moe = modelcat.get("mixtral-8x22b")
    assert refusals(_view(model=moe, tp=2, pp=2, dp=8, ep=8, seq_len=4096, global_batch=128)) == []
    assert refusals(_view(tp=2, pp=2, pp_virtual=3, dp=2, recompute="selective", overlap=True)) == []
    assert refusals(_view(tp=8, dp=4, fsdp=True, recompute="full")) == []


def test_torch_capabilities() -> None:
    assert TORCH.supports("compile") and TORCH.supports("fsdp") and TORCH.supports("recompute:full")
    assert TORCH.supports("recompute:selective") and TORCH.supports("recompute:kwai")
    assert TORCH.supports("pp_virtual")  # ScheduleInterleaved1F1B, 1F1B only
    vs = _view(engine="torch", pp=2, pp_virtual=2, global_batch=4)
    assert refusals(vs) == [] and _fields(replace(vs, pp_schedule="gpipe")) == [("pp_schedule", "engine")]
    v = _view(engine="torch", tp=2, pp=2, dp=2, fsdp=True, compile=True, recompute="full", overlap=True)
    assert refusals(v) == []
    assert refusals(replace(v, recompute="selective")) == []
    # kwai runs on the tp shards; offload is not traced by torch.compile; kwai is for dense MLPs
    assert refusals(replace(v, recompute="kwai")) == []
    assert _fields(replace(v, recompute="kwai", offload_alpha=0.5)) == [("compile", "engine")]
    assert refusals(replace(v, recompute="kwai", compile=False, offload_alpha=0.5)) == []
    moe = _view(engine="torch", model=modelcat.get("tiny-moe"), seq_len=64, global_batch=8, recompute="kwai")
    assert _fields(moe) == [("model", "engine")]
    # ring attention: with dp/fsdp, not with tp or pp; the sequence splits into 2 cp chunks
    assert _fields(replace(v, cp=2, world_size=None)) == [("cp", "engine"), ("cp", "engine")]
    assert refusals(replace(v, cp=2, tp=1, pp=1, world_size=None, seq_len=64)) == []
    assert _fields(replace(v, cp=2, tp=1, pp=1, world_size=None, seq_len=66)) == [("seq_len", "engine")]
    moe = modelcat.get("tiny-moe")
    assert refusals(_view(engine="torch", model=moe, dp=2, seq_len=64, global_batch=8)) == []  # replicated experts
    assert ("ep", "engine") in _fields(_view(engine="torch", model=moe, dp=2, ep=2, seq_len=64, global_batch=8))
    # torch.distributed.pipelining's 1F1B needs at least pp micro batches; GPipe does not
    few = _view(engine="torch", pp=4, global_batch=2)
    assert _fields(few) == [("micro_batch", "engine")]
    assert refusals(replace(few, pp_schedule="gpipe")) == []


@pytest.mark.parametrize(
    ("over", "field", "words"),
    [
        ({"model": modelcat.get("llama3-70b"), "tp": 16, "pp": 4, "seq_len": 8192}, "tp", "8 KV heads"),
        ({"tp": 3}, "tp", "16 attention heads"),
        ({"pp": 5}, "pp", "does not divide gpt3-1.3b's 24 layers"),
        ({"pp": 2, "pp_virtual": 5}, "pp_virtual", "2\\*5 = 10 does not divide"),
        ({"pp_virtual": 2}, "pp_virtual", "need pipeline parallelism"),
        ({"pp": 4, "pp_virtual": 2, "global_batch": 6}, "pp_virtual", "multiple of pp 4"),
        ({"dp": 3}, "global_batch", "micro_batch\\*dp = 1\\*3"),
        ({"cp": 3}, "cp", "does not divide sequence length 2048"),
        ({"seq_len": 4096}, "seq_len", "maximum sequence length 2048"),
        ({"ep": 2, "dp": 2}, "ep", "dense model"),
        ({"model": modelcat.get("mixtral-8x7b"), "ep": 8, "dp": 4, "seq_len": 4096}, "ep", "dp\\*cp = 4"),
        ({"world_size": 3}, "gpus", "world size mismatch"),
        ({"dp": 8, "gpus_per_node": 8, "cluster_gpus": 4}, "gpus", "the cluster has 4"),
        ({"dp": 4, "gpus_per_node": 3}, "gpus", "whole number of 3-GPU nodes"),
        ({"cp": 2}, "cp", "context parallelism"),
        ({"compile": True}, "compile", "torch.compile"),
        ({"tp": 2, "seq_len": 1001, "global_batch": 32}, "seq_len", "sequence parallelism"),
        (
            {"model": modelcat.get("mixtral-8x7b"), "ep": 2, "dp": 2, "fsdp": True, "seq_len": 4096},
            "ep",
            "cannot combine",
        ),
        ({"pp": 2, "pp_schedule": "gpipe"}, "pp_schedule", "no 'gpipe' pipeline schedule"),
        ({"engine": "jax"}, "engine", "unknown engine"),
    ],
)
def test_refusals_name_field_and_reason(over: dict[str, Any], field: str, words: str) -> None:
    found = refusals(_view(**over))
    assert found, over
    assert any(r.field == field and re.search(words, r.reason) for r in found), found


def test_cpu_limits_are_data(monkeypatch: pytest.MonkeyPatch) -> None:
    # megatron-core runs on CPU through the engine's shim: no CPU-only refusal is left; a limit
    # added to the data entry is refused on that device only
    llama = _view(model=modelcat.get("tiny-llama"), seq_len=64, global_batch=8)
    assert capabilities.MEGATRON_CPU_LIMITS == {}
    assert refusals(llama) == [] and refusals(replace(llama, device="cpu")) == []
    assert refusals(_view(device="cpu", recompute="selective", tp=2, pp=2, fsdp=True, dp=2)) == []
    limited = replace(MEGATRON, device_limits={"cpu": {"family:llama3": "a reason"}})
    monkeypatch.setattr(capabilities, "ENGINES", {**capabilities.ENGINES, "megatron": limited})
    cpu = refusals(replace(llama, device="cpu"))
    assert [(r.field, r.kind) for r in cpu] == [("model", "engine")] and "a reason" in cpu[0].reason
    assert refusals(llama) == []


def test_recompute_modes() -> None:
    assert [recompute_mode(v) for v in (False, True, "none", "full", "selective")] == [
        "none",
        "full",
        "none",
        "full",
        "selective",
    ]
    with pytest.raises(ValueError, match="recompute must be"):
        recompute_mode("partial")
    assert device_of("cpu") == "cpu" and device_of("h200") == "cuda"


def test_job_refusals_reads_the_job_cell() -> None:
    from tests.train.conftest import make_cell

    spec = CellSpec.from_dict(make_cell(engine="megatron", opt={"recompute": True, "compile": True}))
    (why,) = job_refusals(spec, "cuda")
    assert why.startswith("compile: engine 'megatron' does not support torch.compile")
    assert job_refusals(spec, "cpu") == [why]
    with pytest.raises(EngineUnavailableError, match="cannot run on cpu: compile: "):
        spec.check_engine("cpu")
    CellSpec.from_dict(make_cell(engine="megatron", opt={"recompute": True})).check_engine("cpu")


# -- the validator and the job agree ----------------------------------------------------------------

MODELS: list[tuple[str, int | None]] = [(n, None) for n in modelcat.names()] + [
    ("gpt3-1.3b", 4),
    ("llama3-8b", 2),
    ("mixtral-8x7b", 4),
    ("llama3-70b", 8),
    ("gpt3-175b", 6),
]
N_DRAWS = 4000


@cache
def _cluster(gpu_type: str, gpus_per_node: int, nodes: int) -> ClusterProfile:
    name = f"c-{gpu_type}-{gpus_per_node}x{nodes}"
    return ClusterProfile.model_validate(
        {"name": name, "gpu_type": gpu_type, "gpus_per_node": gpus_per_node, "nodes": nodes}
    )


@cache
def _campaign(engine: str, compile: bool, cluster: tuple[str, int, int]) -> Campaign:
    prof = _cluster(*cluster).model_dump()
    return Campaign.model_validate(
        {"name": "agree", "cluster": prof, "model": "tiny", "engine": engine, "compile": compile}
    )


def _draw(rng: random.Random) -> tuple[Campaign, ClusterProfile, dict[str, Any]]:
    c = rng.choice
    name, proxy = c(MODELS)
    max_seq = modelcat.get(name).max_seq_len
    point: dict[str, Any] = {
        "model": {"name": name, "proxy_layers": proxy} if proxy else name,
        "tp": c([1, 1, 1, 2, 2, 4, 8, 3, 16]),
        "pp": c([1, 1, 1, 2, 2, 4, 3, 8]),
        "cp": 2 if rng.random() < 0.05 else 1,
        "fsdp": rng.random() < 0.2,
        "micro_batch": c([1, 1, 2, 4, 8]),
        "global_batch": c([8, 16, 32, 64, 128, 12]),
        "seq_len": c([64, 64, 128, 256, 1000, max_seq, max_seq, 2 * max_seq]),
        "recompute": c([False, True, "none", "full", "selective"]),
        "overlap": rng.random() < 0.3,
    }
    # rarely what the model or layout cannot take, often what it can
    point["pp_virtual"] = c([1, 1, 2, 3]) if point["pp"] > 1 else c([1] * 15 + [2])
    moe = modelcat.get(name).num_experts
    point["ep"] = c([1, 2, 4, 8]) if moe else c([1] * 15 + [2])
    if rng.random() < 0.3:
        point["opt_code"] = c(["00000", "10000", "01000", "11000"])
    ranks = point["tp"] * point["pp"] * point["cp"]
    u = rng.random()
    if u < 0.6:  # dp auto over a GPU count the layout divides
        point["dp"], point["gpus"] = "auto", ranks * c([1, 1, 2, 4, 8])
    elif u < 0.7:  # any GPU count: some do not divide (no cell at all)
        point["dp"], point["gpus"] = "auto", c([1, 2, 4, 8, 16, 32, 64, 6])
    else:
        point["dp"] = c([1, 1, 2, 4, 8, 3])
    world = point.get("gpus") or ranks * point["dp"]
    gpus_per_node = c([1, 2, 4, 8, 8])
    nodes = -(-world // gpus_per_node) * c([1, 1, 2]) if rng.random() < 0.85 else c([1, 2, 4])
    shape = (c(["cpu", "h100", "h200"]), gpus_per_node, nodes)
    return _campaign(c(["torch", "megatron"]), rng.random() < 0.1, shape), _cluster(*shape), point


def _job_verdict(cell_json: dict[str, Any], device: str) -> str | None:
    try:
        CellSpec.from_dict(cell_json).check_engine(device)
    except (CellConfigError, EngineUnavailableError) as err:
        return str(err)
    return None


def test_validator_and_job_agree_on_random_cells() -> None:
    rng = random.Random(20250611)
    seen = {"structural": 0, "both_ok": 0, "both_refused": 0, "too_big": 0}
    for i in range(N_DRAWS):
        camp, cluster, point = _draw(rng)
        where = f"sweep[{i}]"
        try:
            cell = resolve(camp, cluster, point, "agree.yaml", where, check=False)
        except ConfigError:
            seen["structural"] += 1  # no cell: dp auto not dividing gpus
            continue
        try:
            resolve(camp, cluster, point, "agree.yaml", where)
            validator = None
        except ConfigError as err:
            assert err.source == "agree.yaml" and err.field.startswith(where + ".") and cell.name in err.message
            validator = err.message
        job = _job_verdict(cell.job_config(0), device_of(cluster.gpu_type))
        ctx = f"{point} on {cluster.name}, engine {camp.engine}: validator {validator!r}, job {job!r}"
        if cell.world_size > cluster.total_gpus:
            seen["too_big"] += 1  # the job cannot know the cluster's size: only the validator refuses
            assert validator is not None, ctx
            continue
        assert (validator is None) == (job is None), ctx
        if job is not None:  # and for the same first reason
            assert validator is not None and validator.split("cannot run: ", 1)[1].split(" (and ")[0] in job, ctx
        seen["both_ok" if job is None else "both_refused"] += 1
    # the draw covers both verdicts well
    assert min(seen.values()) > N_DRAWS // 40 and seen["both_ok"] > N_DRAWS // 8, seen

"""Generated search scenarios: analytic per-layer profiles and two-type GPU pools.

For searching before anything is profiled, and for the search's checks and benchmark
(``tests/test_search.py``, ``benchmarks/search_scenarios.py``): the scenarios of the
Metis variant's table (10 blocks on 16+16 GPUs, 20 on 32+32, 20 on 64+64), here on H100 and
H200 nodes of 8.

:func:`roofline_profile` writes a :class:`~charllm.predict.profile.LayerProfile` with
``source: roofline`` from the model's shape alone:

- time: training FLOPs (forward ``2 * params + 4 * seq * hidden`` per token and block, backward
  twice that; the head's ``2 * vocab * hidden``) at the GPU's dense bf16 peak times an
  efficiency that falls as the per-rank GEMMs shrink (``e * n / (n + 1/4)``, ``n`` the micro
  batch's tokens times the rank's share of the hidden size over ``4096**2``);
- memory per rank: mixed-precision AdamW, 18 bytes a parameter (bf16 weights + fp32 master 6,
  fp32 gradients 4, two fp32 moments 8), shared by tp; saved activations ``34 * seq * hidden``
  bytes a sequence and block, shared by tp (Korthikanti et al. 2022, sequence parallel, flash
  attention), the head's bf16 logits and fp32 softmax (``6 * seq * vocab``) shared by tp.

These are assumptions, not measurements; measured profiles (``profile: layers``) replace them.
"""

from __future__ import annotations

from charllm import modelcat
from charllm.modelcat import ModelShape
from charllm.predict.profile import LayerCost, LayerProfile, ProfileSet
from charllm.predict.search import Pool, Problem

#: dense bf16 peak (FLOP/s): H100 and H200 SXM 989 T (the same chip), A100 312 T
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "cpu": 1e12}
#: large-GEMM efficiency: the H200's faster HBM3e keeps its units busier than the H100's
EFFICIENCY = {"h100": 0.45, "h200": 0.50, "a100": 0.50, "cpu": 0.5}
BYTES_PER_PARAM = {"param": 6, "grad": 4, "optimizer": 8}


def block_params(m: ModelShape) -> int:
    h, f = m.hidden, m.ffn_hidden
    kv = m.kv_heads * m.head_dim
    mlp = (3 if m.family in ("llama3", "mixtral") else 2) * h * f
    if m.num_experts:
        mlp = mlp * m.num_experts + h * m.num_experts
    return 2 * h * h + 2 * h * kv + mlp + 2 * h


def _eff(gpu: str, mb: int, seq: int, hidden: int, tp: int) -> float:
    n = mb * seq * (hidden / tp) / 4096 / 4096
    return EFFICIENCY[gpu] * n / (n + 0.25)


def _layer(name: str, kind: str, params: int, flops_fwd: float, act: float, rate: float) -> LayerCost:
    return LayerCost(
        name=name,
        kind=kind,
        fwd_s=flops_fwd / rate,
        bwd_s=2 * flops_fwd / rate,
        saved_activation_bytes=int(act),
        params=params,
        param_bytes=params * BYTES_PER_PARAM["param"],
        grad_bytes=params * BYTES_PER_PARAM["grad"],
        optimizer_bytes=params * BYTES_PER_PARAM["optimizer"],
    )


def roofline_profile(model: ModelShape, gpu_type: str, tp: int, micro_batch: int, seq_len: int) -> LayerProfile:
    """An analytic profile of ``model`` (its depth as given) on one GPU type, tp and micro batch."""
    h, v, s, mb = model.hidden, model.vocab_size, seq_len, micro_batch
    rate = PEAK_FLOPS[gpu_type] * _eff(gpu_type, mb, s, h, tp) * tp  # the rank's share: flops / tp
    tokens = mb * s
    pb = block_params(model) // tp
    block = _layer("block", "block", pb, tokens * (2 * block_params(model) + 4 * s * h), 34 * tokens * h / tp, rate)
    emb_params = v * h // tp
    emb = LayerCost("embedding", "embedding", block.fwd_s * 0.02, block.bwd_s * 0.02, 2 * tokens * h, emb_params,
                    emb_params * 6, emb_params * 4, emb_params * 8)  # fmt: skip
    head = _layer("head", "head", v * h // tp + h, tokens * 2 * v * h, 6 * tokens * v / tp + 2 * tokens * h, rate)
    blocks = [LayerCost(**{**block.__dict__, "name": f"block.{i}"}) for i in range(model.n_layers)]
    layers = (emb, *blocks, head)
    params = sum(x.params for x in layers)
    opt_s = params * 16 / 3.0e12  # AdamW reads and writes ~16 bytes a parameter at ~3 TB/s HBM
    return LayerProfile(
        gpu_type=gpu_type,
        tp=tp,
        micro_batch=mb,
        seq_len=s,
        precision="bf16",
        recompute="none",
        compile=False,
        engine="megatron",
        model=model,
        layers=layers,
        optimizer_step_s=opt_s,
        batch_time_s=sum(x.time_s for x in layers),
        source="roofline",
        provenance={"method": "charllm.predict.search_scenarios.roofline_profile"},
    )


def roofline_set(
    model: ModelShape, gpu_types: tuple[str, ...], seq_len: int, max_micro_batch: int, max_tp: int = 8
) -> ProfileSet:
    """Roofline profiles for every GPU type, power-of-two tp <= max_tp and micro batch <= max_micro_batch."""
    out = ProfileSet()
    for g in gpu_types:
        tp = 1
        while tp <= max_tp:
            mb = 1
            while mb <= max_micro_batch:
                out.add(roofline_profile(model, g, tp, mb, seq_len))
                mb *= 2
            tp *= 2
    return out


#: (name, blocks, GPUs of each type): the Metis variant's table, rows 1-3
SCENARIOS = (("10L-16+16", 10, 16), ("20L-32+32", 20, 32), ("20L-64+64", 20, 64))
SCENARIO_MODEL = "llama3-70b"
SCENARIO_SEQ = 8192  # Llama 3 as in the paper campaigns (charllm-h200-opt.yaml)
SCENARIO_BATCH = 128


def scenario(
    blocks: int, gpus_each: int, max_stages: int = 8, max_group_sizes: int = 2, per_stage: bool = False
) -> Problem:
    """``blocks`` of Llama-3 70B at seq 8192, global batch 128, on ``gpus_each`` H100 + as many H200 (nodes of 8)."""
    model = modelcat.get(SCENARIO_MODEL, blocks)
    pools = (
        Pool.of("h100", "h100", gpus_each, 8),
        Pool.of("h200", "h200", gpus_each, 8),
    )
    profiles = roofline_set(model, ("h100", "h200"), SCENARIO_SEQ, SCENARIO_BATCH)
    return Problem(
        pools=pools,
        profiles=profiles,
        n_blocks=blocks,
        global_batch=SCENARIO_BATCH,
        seq_len=SCENARIO_SEQ,
        hidden=model.hidden,
        max_stages=max_stages,
        max_group_sizes=max_group_sizes,
        per_stage=per_stage,
    )

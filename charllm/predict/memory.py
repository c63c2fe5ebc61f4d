"""Analytic memory model: peak bytes allocated per rank of a cell, and whether it fits.

Pure arithmetic on a :class:`MemoryQuery` (plain values; :func:`query_of_cell` builds one from
a campaign :class:`charllm.campaign.Cell`). What a rank holds at its peak (the start of the
last micro batch's backward, the worst pipeline stage):

- **weights, gradients, optimizer state** per parameter of the rank (bytes):

  ======================================  ========  =====  ==============
  engine / layout                         weights   grads  optimizer
  ======================================  ========  =====  ==============
  torch, one GPU bf16 (FSDP2 1 rank)      4 + 2     4      8  (AdamW m, v)
  torch, DDP / TP / PP (autocast)         4 + 2*    4      8
  torch/megatron, FSDP / zero 3 over dp   4/dp + ε  4/dp   8/dp   (ε: 2 blocks gathered in bf16)
  torch, zero 2 (FSDP2, no reshard)       4/dp + 2  4/dp   8/dp
  torch, zero 1                           4 + 2*    4      8/dp
  megatron (distributed optimizer)        2 + 4/dp  4      8/dp
  ======================================  ========  =====  ==============

  (* autocast's bf16 weight copies live from forward to backward.) Gradients count only when
  a step accumulates more than one micro batch (with one, they appear as activations go).
  ``cpu_offload`` moves weights, gradients and optimizer state to the host (bf16 copies stay).
- **activations**: ``c * s * h / tp`` bytes per block per sequence, ``c`` by engine, compile
  and family (:data:`ACT_BYTES_PER_SH`, from measured layer profiles: eager bf16 GPT-3 1.3B
  43.0, Llama-3 8B 50.6 on an H200); full recompute keeps each block's input (2 s h) plus one
  block's activations while it is replayed; selective keeps :data:`SELECTIVE_KEEP` of them;
  ``offload_alpha`` takes that fraction off; ``recompute_layers`` recomputes only that many
  blocks of a stage. Pipeline stages hold ``min(pp - stage, accum)`` micro batches in flight
  (1F1B; interleaved adds ``(pp - 1) / pp_virtual``... of one), GPipe all ``accum``.
- **head** (last stage): bf16 logits, their float32 copy, log-softmax and its gradient:
  :data:`HEAD_BYTES_PER_LOGIT` per (sequence position x padded vocabulary / tp).
- **framework reserve**: what the card holds beside the allocator's bytes (CUDA context,
  NCCL buffers, fragmentation): :func:`capacity_bytes` subtracts it from the card's memory.

A layer profile (:class:`charllm.predict.profile.LayerProfile`) of the same model family
replaces the activation coefficients by its measured saved-activation bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from charllm.capabilities import CellView
from charllm.modelcat import ModelShape
from charllm.predict.profile import LayerProfile

if TYPE_CHECKING:
    from charllm.campaign import Cell

VOCAB_PAD = 128
GIB = 1 << 30
#: total memory the allocator reports per card (``torch.cuda.get_device_properties().total_memory``)
CARD_BYTES: dict[str, int] = {
    "h100": 85_018_877_624,  # 79.18 GiB (recorded OOM message)
    "h200": 150_110_011_392,  # 139.80 GiB (recorded OOM message of the H200 sweep)
    "a100": 85_899_345_920,
    "cpu": 1 << 50,
}
#: beside the allocator: CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers (bytes per rank)
RESERVE_BYTES = 1_500_000_000
#: allocator fragmentation and rounding on top of the allocated peak
FRAGMENTATION = 0.02

#: activation bytes per block per sequence position per hidden unit (s*h), measured
ACT_BYTES_PER_SH: dict[tuple[str, str, bool], float] = {
    # (engine, family, compiled) -> c; eager torch from the H200 layer profiles (docs/gpu/predict-h200-*)
    ("torch", "gpt3", False): 43.0,
    ("torch", "llama3", False): 50.6,
    ("torch", "mixtral", False): 48.3 * 1.6,  # router, top-k dispatch copies (not measured)
    # compiled: inductor keeps fewer intermediates; fitted to the recorded compiled cells
    ("torch", "gpt3", True): 34.0,
    ("torch", "llama3", True): 38.0,
    ("torch", "mixtral", True): 38.0 * 1.6,
    # megatron local spec with SDPA, fused bias-GELU/dropout: fitted to the recorded megatron cells
    ("megatron", "gpt3", False): 34.0,
    ("megatron", "llama3", False): 38.0,
    ("megatron", "mixtral", False): 38.0 * 1.6,
}
#: head: bf16 logits (2) + float32 copy (4) + log-softmax out (4): measured 10.0 (GPT-3 and Llama-3 heads)
HEAD_BYTES_PER_LOGIT = 10.0
#: ZeRO-3: blocks held gathered at once (the one computing, the one prefetched)
ZERO3_GATHERED_BLOCKS = 2
#: selective recompute keeps this share of a block's activations (SDPA internals replayed)
SELECTIVE_KEEP = 0.85
KWAI_KEEP = 0.55


@dataclass(frozen=True)
class MemoryQuery:
    """What the memory model needs to know about a cell (one rank's view)."""

    model: ModelShape
    engine: str = "torch"
    gpu_type: str = "h200"
    micro_batch: int = 1
    global_batch: int = 1
    seq_len: int = 2048
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    pp_virtual: int = 1
    fsdp: bool = False
    zero: int = 0
    cpu_offload: bool = False
    recompute: str = "none"  # none | full | selective | kwai
    recompute_layers: int = 0
    offload_alpha: float = 0.0
    compile: bool = False
    pp_schedule: str = "1f1b"
    precision: str = "bf16"
    world_size: int = 1
    overlap: bool = False
    reshard_after_forward: bool = True  # FSDP: ZeRO-3 (True) or weights kept gathered per step
    # torch: fp32 weights under bf16 autocast, cast in every micro batch (None: as the engine does
    # now, ``timing.fp32_weights``; runs recorded before ``opt.bf16_params`` say so themselves)
    fp32_weights: bool | None = None

    @property
    def grad_accum(self) -> int:
        return max(1, self.global_batch // (self.micro_batch * self.dp))


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes of the worst rank, by part, and the verdict against the card."""

    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    head_bytes: float
    peak_bytes: float  # the predicted max_memory_allocated of the worst rank
    capacity_bytes: float
    parts: dict[str, Any] = field(default_factory=dict)

    @property
    def oom(self) -> bool:
        return self.peak_bytes * (1 + FRAGMENTATION) > self.capacity_bytes

    @property
    def headroom(self) -> float:
        """Capacity over predicted need (< 1: out of memory)."""
        return self.capacity_bytes / max(1.0, self.peak_bytes * (1 + FRAGMENTATION))


def capacity_bytes(gpu_type: str) -> float:
    """What the allocator may hand out on one card of ``gpu_type``."""
    return float(CARD_BYTES.get(gpu_type, CARD_BYTES["h100"]) - RESERVE_BYTES)


def padded_vocab(v: int) -> int:
    return -(-v // VOCAB_PAD) * VOCAB_PAD


def block_params(shape: ModelShape) -> int:
    """Parameters of one transformer block (biases and norms included)."""
    h, f = shape.hidden, shape.ffn_hidden
    kv = shape.kv_heads * shape.head_dim
    gated = shape.family in ("llama3", "mixtral")
    attn = 2 * h * h + 2 * h * kv + (0 if gated else 2 * h + 2 * kv)
    mlp = (3 if gated else 2) * h * f + (0 if gated else f + h)
    if shape.num_experts:
        mlp = mlp * shape.num_experts + h * shape.num_experts
    norms = (1 if gated else 2) * 2 * h
    return attn + mlp + norms


def stage_params(q: MemoryQuery, stage: int) -> float:
    """Parameters one rank of pipeline stage ``stage`` holds (tp-sharded blocks, replicated norms)."""
    shape = q.model
    base, rem = divmod(shape.n_layers, q.pp)
    layers = base + (1 if stage < rem else 0)
    blk = block_params(shape)
    if shape.num_experts and q.ep > 1:
        h, f = shape.hidden, shape.ffn_hidden
        experts = 3 * h * f * shape.num_experts
        blk = blk - experts + experts // q.ep
    n = layers * blk / q.tp
    vp = padded_vocab(shape.vocab_size)
    if stage == 0:
        n += vp * shape.hidden / q.tp if q.engine == "megatron" else vp * shape.hidden
        if shape.family == "gpt3":
            n += shape.max_seq_len * shape.hidden
    if stage == q.pp - 1:
        n += vp * shape.hidden / q.tp + shape.hidden
    return n


def _state_bytes_per_param(q: MemoryQuery) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes per parameter of the rank."""
    dp = max(1, q.dp)
    if q.engine == "megatron" and not q.fsdp:
        return 2 + 4 / dp, 4.0, 8 / dp
    zero = 3 if q.fsdp and q.zero == 0 else q.zero
    if zero == 3 and q.reshard_after_forward and dp > 1:
        # ZeRO-3: only the blocks being computed (and the one prefetched) are gathered in bf16
        w, g, o = 4 / dp + 2 * min(1.0, ZERO3_GATHERED_BLOCKS / max(1, q.model.n_layers)), 4 / dp, 8 / dp
    elif zero in (2, 3) and dp > 1:
        w, g, o = 4 / dp + 2, 4 / dp, 8 / dp
    elif zero == 1:
        w, g, o = 6.0, 4.0, 8 / dp
    else:
        w, g, o = 6.0, 4.0, 8.0
    if q.cpu_offload:
        w, g, o = 2.0, 0.0, 0.0
    if q.precision == "fp32":
        w -= 2
    return w, g, o


def act_coefficient(q: MemoryQuery, profile: LayerProfile | None = None) -> float:
    """Bytes per block per (sequence position x hidden unit) without recompute."""
    if profile is not None and profile.blocks and profile.recompute == "none":
        b = profile.mean_block()
        return b.saved_activation_bytes * profile.tp / (profile.micro_batch * profile.seq_len * profile.model.hidden)
    fam = q.model.family if q.model.family in ("gpt3", "llama3", "mixtral") else "gpt3"
    eng = q.engine if q.engine in ("torch", "megatron") else "megatron"
    key = (eng, fam, q.compile and eng == "torch")
    c = ACT_BYTES_PER_SH[key]
    if q.precision == "fp32":
        c *= 2
    return c


def head_coefficient(profile: LayerProfile | None = None) -> float:
    if profile is not None and profile.layers[-1].kind == "head" and profile.layers[-1].saved_activation_bytes:
        head = profile.layers[-1]
        logits = profile.micro_batch * profile.seq_len * padded_vocab(profile.model.vocab_size) / profile.tp
        return head.saved_activation_bytes / logits
    return HEAD_BYTES_PER_LOGIT


def estimate(q: MemoryQuery, profile: LayerProfile | None = None, first_step: bool = False) -> MemoryEstimate:
    """The predicted peak of the worst rank (every pipeline stage is tried).

    ``first_step``: the peak of the first optimizer step alone (AdamW's state is allocated by
    that step, after the peak), as a one-step probe such as an OOM sweep sees it.
    """
    shape = q.model
    tokens = q.micro_batch * q.seq_len / max(1, q.cp)
    c = act_coefficient(q, profile)
    full_block = c * tokens * shape.hidden / q.tp
    keep = {"none": 1.0, "selective": SELECTIVE_KEEP, "kwai": KWAI_KEEP}.get(q.recompute, 1.0)
    alpha = min(max(q.offload_alpha, 0.0), 1.0)
    w_pp, g_pp, o_pp = _state_bytes_per_param(q)
    accum = q.grad_accum
    best: MemoryEstimate | None = None
    base, rem = divmod(shape.n_layers, q.pp)
    for stage in range(q.pp):
        layers = base + (1 if stage < rem else 0)
        n = stage_params(q, stage)
        weights, grads, opt = n * w_pp, (n * g_pp if accum > 1 else 0.0), (0.0 if first_step else n * o_pp)
        if q.pp == 1:
            inflight = 1.0
        elif q.pp_schedule == "gpipe":
            inflight = float(accum)
        else:
            inflight = float(min(q.pp - stage, accum))
            if q.pp_virtual > 1:
                inflight = min(float(accum), inflight + (q.pp - 1) / q.pp_virtual)
        if q.recompute == "full":
            n_rc = layers if q.recompute_layers in (0, None) else min(layers, q.recompute_layers)
            kept = n_rc * 2.0 * tokens * shape.hidden + (layers - n_rc) * full_block
            acts = kept * (1 - alpha) * inflight + full_block
        else:
            acts = layers * full_block * keep * (1 - alpha) * inflight
        head = 0.0
        if stage == q.pp - 1:
            head = head_coefficient(profile) * tokens * padded_vocab(shape.vocab_size) / q.tp
        peak = weights + grads + opt + acts + head
        est = MemoryEstimate(
            weights_bytes=weights,
            grads_bytes=grads,
            optimizer_bytes=opt,
            activations_bytes=acts,
            head_bytes=head,
            peak_bytes=peak,
            capacity_bytes=capacity_bytes(q.gpu_type),
            parts={"stage": stage, "params": n, "act_bytes_per_sh": c, "inflight": inflight},
        )
        if best is None or est.peak_bytes > best.peak_bytes:
            best = est
    if best is None:  # pp >= 1 always yields a stage
        raise ValueError("no pipeline stage")
    return best


def query_of_view(view: CellView, gpu_type: str) -> MemoryQuery:
    """A cell's plain values (:class:`~charllm.capabilities.CellView`) as the model sees it."""
    shared = MemoryQuery.__dataclass_fields__.keys() & CellView.__dataclass_fields__.keys()
    values: dict[str, Any] = {k: getattr(view, k) for k in shared}
    values["world_size"] = view.world_size or view.ranks
    return MemoryQuery(gpu_type=gpu_type, **values)


def query_of_cell(cell: Cell) -> MemoryQuery:
    """A campaign cell as the model sees it: its :meth:`~charllm.campaign.Cell.view`."""
    return query_of_view(cell.view(), cell.gpu_type)


def query_of_job_cell(raw: dict[str, Any]) -> MemoryQuery:
    """A recorded job cell (``cell.json`` / ``provenance.cell``) as the model sees it."""
    m = raw["model"]
    shape = ModelShape(**{k: m[k] for k in m if k in ModelShape.__dataclass_fields__})
    par = raw.get("parallel", {})
    opt = raw.get("opt", {})
    rc = "none"
    if opt.get("recompute"):
        rc = str(opt.get("recompute_granularity", "full"))
    return MemoryQuery(
        model=shape,
        engine=str(raw.get("engine", "torch")),
        gpu_type=str(raw.get("gpu_type", "h100")),
        micro_batch=int(raw["micro_batch"]),
        global_batch=int(raw["global_batch"]),
        seq_len=int(raw["seq_len"]),
        tp=int(par.get("tp", 1)),
        pp=int(par.get("pp", 1)),
        dp=int(par.get("dp", 1)),
        cp=int(par.get("cp", 1)),
        ep=int(par.get("ep", 1)),
        pp_virtual=int(par.get("pp_virtual", 1)),
        fsdp=bool(par.get("fsdp", False)),
        zero=int(opt.get("zero", 0) or 0),
        recompute=rc,
        compile=bool(opt.get("compile", False)),
        precision=str(raw.get("precision", "bf16")),
        world_size=int(raw.get("world_size", 1)),
        overlap=bool(opt.get("overlap", False)),
        reshard_after_forward=bool(opt.get("fsdp_reshard_after_forward", True)),
    )


def gib(x: float) -> float:
    return x / GIB if math.isfinite(x) else x

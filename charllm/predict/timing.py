"""Time, energy and cost model of a cell: step time, MFU, energy per step, GPU-hours.

Per micro batch and pipeline stage the compute time comes from a layer profile of the same
(GPU type, tp, micro batch) when one is given (:class:`charllm.predict.profile.ProfileSet`:
the embedding, the mean block times the stage's layers, the head; recompute added as
:data:`RECOMPUTE_FWD_SHARE` of the blocks' forward when the profile was taken without it),
else from a calibrated roofline: the device time ``hardware FLOPs / (peak x efficiency)``
and the host's launch time ``layers x host_s_per_layer`` combine as
``(t_gpu^4 + t_host^4)^(1/4)`` (eager PyTorch at one sequence per micro batch is bound by
kernel launches, not by the GPU). Torch runs that keep fp32 weights under bf16 autocast
(:func:`fp32_weights`) add, per micro batch, the HBM time of casting the weights and
accumulating the fp32 gradients (:data:`AUTOCAST_BYTES_PER_PARAM` per parameter of the rank):
a cost per micro batch, not per token, so many small micro batches pay it most. Efficiencies,
host times and that byte count (:data:`EFFICIENCY`, :data:`HOST_S_PER_LAYER`) were fitted to
the recorded cells (:mod:`charllm.predict.recorded`).

Communication uses the cluster's link bandwidths (``ClusterProfile.intra_node_gbyte_per_s``,
``inter_node_gbit_per_s``; defaults :data:`DEFAULT_INTRA_GBYTE_S`, :data:`DEFAULT_INTER_GBIT_S`):
TP all-reduces of the activations (4 per layer and micro batch), the DP gradient all-reduce
(or FSDP's all-gather + reduce-scatter; hidden by :data:`OVERLAP_HIDDEN` with overlap or
FSDP), pipeline sends, MoE all-to-alls. The pipeline step is ``(accum + (pp - 1) / v)``
micro-batch slots of the slowest stage (the bubble), plus the optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from charllm.predict.memory import MemoryQuery, stage_params
from charllm.predict.profile import LayerProfile, ProfileSet
from charllm.train.flops import hardware_flops_per_token, model_flops_per_token, peak_flops

#: achieved fraction of dense peak in GPU-bound micro batches, (engine, compiled, gpu_type)
EFFICIENCY: dict[tuple[str, bool, str], float] = {
    ("torch", False, "h200"): 0.52,  # eager, H200 sweeps mb 4/8 (docs/gpu/predict-h200-run*.json; was 0.50)
    ("torch", False, "h100"): 0.47,  # eager, small campaign on an H100 mb 4/8 (results.tgz; was 0.48)
    ("torch", True, "h200"): 0.595,  # compiled 1.3B reference (docs/gpu/README.md)
    ("torch", True, "h100"): 0.585,  # tests/data/gpu/h100-gpt3-1.3b less its autocast casts (was 0.545)
    ("megatron", False, "h200"): 0.565,  # the completed megatron engine
    ("megatron", False, "h100"): 0.52,
}
A100_FACTOR = 0.9  # no A100 recorded: the H100 figure scaled
RECOMPUTE_EFF_GAIN = 1.15  # a replayed forward runs at a higher rate than the backward
MOE_EFF = 0.65  # MoE dispatch (megatron Mixtral 8x7B proxy, recorded)
#: host seconds per layer and micro batch (kernel launches), (engine, compiled, recompute);
#: eager none/full: the H200 sweeps' launch-bound mb 1/2 cells (full was 6.5e-3 before the
#: autocast term). none: 2.94e-3 (was 2.85e-3): the launch-bound GPT-3 1.3B mb 1 rc0 cell ran
#: 0.5565 s (run2), 0.6535 s (run1), 0.7208 s (run3) and 0.7047 s (docs/gpu/window-long, 86 steps,
#: CI +-3.7 %) on different leases of the same H200 type: the host's launch rate varies ~+-13 %
#: between leases; 2.94e-3 centres the four within 15 % and keeps the profile path's launch floor
#: within 10 % of run2's mb 1 (benchmarks/predict_check.py)
HOST_S_PER_LAYER: dict[tuple[str, bool, str], float] = {
    ("torch", False, "none"): 2.94e-3,
    ("torch", False, "full"): 5.9e-3,
    ("torch", False, "selective"): 4.0e-3,
    ("torch", False, "kwai"): 5.0e-3,
    ("torch", True, "none"): 0.4e-3,
    ("torch", True, "full"): 0.8e-3,
    ("torch", True, "selective"): 0.5e-3,
    ("torch", True, "kwai"): 0.6e-3,
}
MEGATRON_HOST_S_PER_LAYER = 1.0e-3
#: the host's speed relative to the H200 machines' (the recorded H100 machine launched faster:
#: small campaign mb 1 with recompute, launch-bound)
HOST_FACTOR: dict[str, float] = {"h200": 1.0, "h100": 0.7, "a100": 1.0, "cpu": 1.0}
#: a measured profile is floored at this share of the fitted launch time: the fastest of six leases
#: that ran the launch-bound 1.3B mb 1 cell (0.510 s, docs/gpu/predict-h200-run4.json, against the
#: 0.59 s the fitted constant gives) launched 0.83x as long per layer; a floor must be a lower bound
HOST_FLOOR_SHARE = 0.83
RECOMPUTE_FWD_SHARE = 0.75  # recompute costs this share of the blocks' profiled forward (H200 mb 4/8)
#: optimizer step seconds per parameter of the rank (fused AdamW, HBM bound), per GPU type
OPT_S_PER_PARAM: dict[str, float] = {"h200": 9.0e-12, "h100": 12.0e-12, "a100": 16.0e-12, "cpu": 2e-9}
STEP_OVERHEAD_S = 0.01
#: HBM bytes/s per GPU type (H100 SXM 3.35 TB/s, H200 4.8 TB/s, A100 80 GB 2.0 TB/s)
HBM_BYTES_S: dict[str, float] = {"h100": 3.35e12, "h200": 4.8e12, "a100": 2.0e12, "cpu": 0.2e12}
#: torch with fp32 weights under bf16 autocast moves this many HBM bytes per parameter of the rank
#: in every micro batch: the forward's weight casts to bf16, the bf16 weight gradient copied to
#: fp32 and added into ``.grad`` (~24 bytes at full bandwidth). Fitted to the recorded cells (3.6 ms
#: a micro batch of the 412 M-parameter gpt3-1.3b-L4 on the H100); the small campaign's kernel
#: tables (results.tgz, kernels_rank0.csv) show the same: its "other" kernels grow 4.4 ms per
#: extra micro batch, the cast/copy/add kernels take 5.7 ms of its ~22 ms micro batch at mb 2)
AUTOCAST_BYTES_PER_PARAM = 29.0
OVERLAP_HIDDEN = 0.8
DEFAULT_INTRA_GBYTE_S = 360.0  # NVLink 4 all-reduce bus bandwidth per GPU, GB/s
DEFAULT_INTER_GBIT_S = 100.0  # the PPT clusters' InfiniBand, Gb/s per node
#: board power: idle + (cap - idle) x the device's busy share of the step (W)
POWER_IDLE_W = 150.0
POWER_CAP_W = 690.0  # the 700 W parts sit at ~690 W when compute-bound (recorded)
#: the job around the steps (cost model): launch, imports, model build; compile adds COMPILE_S
STARTUP_S = 60.0
COMPILE_S = 90.0
OOM_JOB_S = 90.0  # a cell that runs out of memory fails within its first step


@dataclass(frozen=True)
class Links:
    intra_gbyte_s: float = DEFAULT_INTRA_GBYTE_S
    inter_gbit_s: float = DEFAULT_INTER_GBIT_S
    gpus_per_node: int = 8


@dataclass(frozen=True)
class StepEstimate:
    step_s: float
    compute_s: float  # slowest stage, all micro batches, no comm
    comm_s: float  # exposed communication
    bubble_s: float
    optimizer_s: float
    mfu: float
    power_w: float  # per GPU
    energy_per_step_j: float  # all GPUs
    source: str  # profile | roofline
    parts: dict[str, Any]


def efficiency(q: MemoryQuery) -> float:
    eng = q.engine if q.engine in ("torch", "megatron") else "megatron"
    gpu = q.gpu_type if q.gpu_type in ("h100", "h200") else "h100"
    comp = q.compile and eng == "torch"
    e = EFFICIENCY.get((eng, comp, gpu), 0.5)
    if q.gpu_type == "a100":
        e *= A100_FACTOR
    if q.model.num_experts:
        e *= MOE_EFF
    if q.precision == "fp32":
        e = 0.6
    # wider matmuls run closer to peak (fitted: GPT-3 125M to Llama-3 8B widths); below 2048 the
    # rate falls faster (exponent 0.3): the narrow GEMM tiles, head-dim-64 attention and the
    # elementwise kernels (bytes ~ hidden, FLOPs ~ hidden^2) weigh more. Fitted to the long-window
    # GPT-3 125M mb 8 cell (docs/gpu/window-long/runs-a.tgz: 0.234 s, MFU 0.27; was -22 % at 0.1)
    # and 350M (runs-b.tgz), and tests/data/gpu/h100-gpt3-125m.
    w = q.model.hidden / 2048
    return e * min(1.1, max(0.7, w**0.1 if w >= 1 else w**0.3))


def host_s_per_layer(q: MemoryQuery) -> float:
    f = HOST_FACTOR.get(q.gpu_type, 1.0)
    if q.engine != "torch":
        return MEGATRON_HOST_S_PER_LAYER * f
    return HOST_S_PER_LAYER.get(("torch", q.compile, q.recompute), 3e-3) * f


def _stage_layers(n: int, pp: int) -> list[int]:
    base, rem = divmod(n, pp)
    return [base + (1 if s < rem else 0) for s in range(pp)]


def fp32_weights(q: MemoryQuery) -> bool:
    """Whether the torch engine keeps fp32 weights under bf16 autocast (cast in every micro batch).

    The query's own ``fp32_weights`` where it is known (a recorded run); else as the engine does
    now: one GPU keeps bf16 compute copies (``opt.bf16_params``, FSDP2 on a one-rank mesh), FSDP
    and ZeRO-2/3 cast at the gather; DDP, tp and pp runs cast under autocast.
    """
    if q.fp32_weights is not None:
        return q.fp32_weights
    sharded = q.fsdp or q.zero in (2, 3)
    return q.engine == "torch" and q.precision == "bf16" and not sharded and q.world_size > 1


def _mb_compute_roofline(q: MemoryQuery, layers: int, first: bool, last: bool) -> tuple[float, float]:
    """(seconds, device-busy seconds) of one micro batch on one stage, fwd + bwd."""
    shape = q.model
    tokens = q.micro_batch * q.seq_len / max(1, q.cp)
    per_token = hardware_flops_per_token(shape, q.seq_len, q.recompute if q.recompute != "kwai" else "selective")
    out_flops = 6.0 * shape.vocab_size * shape.hidden
    block_flops = (per_token - out_flops) / shape.n_layers
    flops = tokens * (layers * block_flops + (out_flops if last else 0.0)) / q.tp
    peak = peak_flops(q.gpu_type if q.gpu_type != "cpu" else "h100", q.precision) or 989e12
    eff = efficiency(q) * (RECOMPUTE_EFF_GAIN if q.recompute == "full" else 1.0)
    t_gpu = flops / (peak * eff)
    if fp32_weights(q):
        stage = 0 if first else (q.pp - 1 if last else min(1, q.pp - 1))
        t_gpu += stage_params(q, stage) * AUTOCAST_BYTES_PER_PARAM / HBM_BYTES_S.get(q.gpu_type, 3.35e12)
    t_host = (layers + (1 if last else 0)) * host_s_per_layer(q)
    return (t_gpu**4 + t_host**4) ** 0.25, t_gpu


def _mb_compute_profile(q: MemoryQuery, prof: LayerProfile, layers: int, first: bool, last: bool) -> float:
    mean = prof.mean_block()
    t = layers * mean.time_s
    if q.recompute == "full" and prof.recompute == "none":
        t += layers * mean.fwd_s * RECOMPUTE_FWD_SHARE
    if first:
        t += prof.layers[0].time_s
    if last:
        t += prof.layers[-1].time_s
    return t


def _ring_s(nbytes: float, n: int, bw_bytes_s: float) -> float:
    """A ring all-reduce of ``nbytes`` over ``n`` ranks."""
    if n <= 1:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / bw_bytes_s


def _bw(links: Links, span: int) -> float:
    """Per-GPU bandwidth (bytes/s) of a group spanning ``span`` consecutive ranks."""
    if span <= links.gpus_per_node:
        return links.intra_gbyte_s * 1e9
    return links.inter_gbit_s / 8 * 1e9 / max(1, links.gpus_per_node)  # the node's NIC, shared by its GPUs


def usable(p: LayerProfile, q: MemoryQuery) -> bool:
    """A profile stands for the cell: same width, family, sequence, engine, compile; recompute same or derivable."""
    same = (p.model.hidden, p.model.family, p.seq_len, p.engine, p.compile) == (
        q.model.hidden,
        q.model.family,
        q.seq_len,
        q.engine,
        q.compile,
    )
    return same and (p.recompute == q.recompute or (p.recompute == "none" and q.recompute == "full"))


def predict_step(q: MemoryQuery, profiles: ProfileSet | None = None, links: Links | None = None) -> StepEstimate:
    """Predicted step of one cell (seconds, MFU, power, energy of all GPUs)."""
    links = links or Links()
    shape = q.model
    accum = q.grad_accum
    prof = None
    if profiles is not None:
        p = profiles.get(q.gpu_type, q.tp, q.micro_batch)
        if p is not None and usable(p, q):
            prof = p
    stages = _stage_layers(shape.n_layers, q.pp)
    t_stage, busy_stage = [], []
    for s, n in enumerate(stages):
        first, last = s == 0, s == q.pp - 1
        if prof is not None:
            busy = _mb_compute_profile(q, prof, n, first, last)
            # a profile taken on a faster host does not beat the fastest kernel-launch rate recorded
            t = max(busy, (n + (1 if last else 0)) * host_s_per_layer(q) * HOST_FLOOR_SHARE)
        else:
            t, busy = _mb_compute_roofline(q, n, first, last)
        # TP: 4 all-reduces of the micro batch's activations per layer (2 forward, 2 backward)
        act_bytes = q.micro_batch * q.seq_len / max(1, q.cp) * shape.hidden * 2
        tp_comm = 4 * n * _ring_s(act_bytes, q.tp, _bw(links, q.tp))
        if shape.num_experts and q.ep > 1:
            tp_comm += 4 * n * act_bytes * shape.top_k * (q.ep - 1) / q.ep / _bw(links, q.tp * q.ep)
        if q.cp > 1:
            tp_comm += 4 * n * _ring_s(act_bytes * 2 * shape.kv_heads / shape.n_heads, q.cp, _bw(links, q.tp * q.cp))
        t_stage.append(t + tp_comm)
        busy_stage.append(busy)
    slot = max(t_stage)
    if q.pp > 1:
        v = max(1, q.pp_virtual)
        slots = accum + (q.pp - 1) / v
        p2p = 2 * accum * q.micro_batch * q.seq_len * shape.hidden * 2 / q.tp / _bw(links, q.tp * q.pp)
    else:
        slots, p2p = float(accum), 0.0
    compute = accum * slot
    bubble = (slots - accum) * slot
    n_local = max(stage_params(q, s) for s in range(q.pp))
    dp = q.dp * q.cp
    span = q.tp * q.cp * q.dp * (q.pp if q.pp > 1 else 1)
    if q.fsdp or q.zero in (2, 3):
        # ZeRO-3 (fsdp, zero 3, reshard after forward) gathers the bf16 weights in every micro batch's
        # forward and backward; ZeRO-2-like keeps them gathered: one gather per step. One fp32
        # reduce-scatter of the gradients per step (no sync between accumulated micro batches).
        zero3 = q.reshard_after_forward and q.zero != 2
        gathers = 2 * accum if zero3 else 1
        dp_bytes = n_local * (2 * gathers + 4)
        dp_comm = dp_bytes * (dp - 1) / dp / _bw(links, span) if dp > 1 else 0.0
        hidden = OVERLAP_HIDDEN  # prefetched: hidden behind compute as far as compute lasts
    else:
        dp_comm = _ring_s(n_local * 4, dp, _bw(links, span))
        overlap = (q.engine == "torch" and dp > 1 and q.tp == 1 and q.pp == 1) or (q.engine != "torch" and q.overlap)
        hidden = OVERLAP_HIDDEN if overlap else 0.0
    exposed_dp = max(dp_comm - hidden * compute, (1 - hidden) * dp_comm)
    opt_s = (
        n_local
        / max(1, dp if (q.zero >= 1 or q.fsdp or q.engine == "megatron") else 1)
        * OPT_S_PER_PARAM.get(q.gpu_type, 12e-12)
    )
    # the step around its micro batches: measured by a profile that has it, else the fitted constant
    overhead = prof.step_overhead_s if prof is not None and prof.step_overhead_s > 0 else STEP_OVERHEAD_S
    step = compute + bubble + p2p + exposed_dp + opt_s + overhead
    tokens_step = q.global_batch * q.seq_len
    peak = peak_flops(q.gpu_type, q.precision) or 0.0
    mfu = model_flops_per_token(shape, q.seq_len) * tokens_step / step / (q.world_size * peak) if peak else math.nan
    busy_share = min(1.0, accum * max(busy_stage) / step)
    power = POWER_IDLE_W + (POWER_CAP_W - POWER_IDLE_W) * busy_share
    return StepEstimate(
        step_s=step,
        compute_s=compute,
        comm_s=exposed_dp + p2p + accum * (slot - max(busy_stage) if prof is None else 0.0),
        bubble_s=bubble,
        optimizer_s=opt_s,
        mfu=mfu,
        power_w=power,
        energy_per_step_j=power * step * q.world_size,
        source="profile" if prof is not None else "roofline",
        parts={"slot_s": slot, "slots": slots, "n_local": n_local, "dp_comm_s": dp_comm},
    )


def job_seconds(
    step_s: float,
    warmup_steps: int,
    steps: int,
    profile_steps: int = 0,
    compile: bool = False,
    startup_s: float = STARTUP_S,
) -> float:
    """Predicted wall time of one job (one repeat of a cell): start-up, warm-up, measured and profiled steps."""
    return startup_s + (COMPILE_S if compile else 0.0) + step_s * (warmup_steps + steps + profile_steps)


#: the warm-up ends on steady step time and GPU temperature; the recorded 1 s-step cells were still
#: warming after 45 steps (50 s), so the thermal part is taken to need about this long
WARMUP_SETTLE_S = 90.0


def warmup_steps(step_s: float, min_steps: int, max_steps: int) -> int:
    """Expected warm-up steps: enough for the GPU to settle thermally, within the campaign's bounds."""
    if step_s <= 0:
        return max_steps
    return int(min(max_steps, max(min_steps, math.ceil(WARMUP_SETTLE_S / step_s))))


def gpu_hours(job_s: float, world_size: int, repeats: int = 1) -> float:
    """GPU-hours of ``repeats`` jobs of ``world_size`` GPUs each."""
    return job_s * world_size * repeats / 3600.0

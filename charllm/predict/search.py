"""``charllm search``: a heterogeneous training-plan search over mixed GPU pools.

The idea (not the code) follows Metis (USENIX ATC'24) and its memory-pruned variant: profile each
layer once per (GPU type, tp, micro batch), then price every plan with a cost model instead of
running it. Everything here is our own design and code; Metis's code is not used.

A **plan** is a pipeline of stages. Each stage runs on one *device group* of one GPU type (a
group never mixes types), with its own data- and tensor-parallel degrees, and holds a contiguous
run of the model's blocks; the embedding rides on the first stage and the head on the last. The
search enumerates, in this nesting:

1. **device-group order**: which pools (GPU types) the pipeline visits, in which order; every
   non-empty ordered subset of the pools, so single-type (homogeneous) plans are candidates too;
2. **device-group shapes**: each visited pool's GPUs cut into power-of-two groups, largest
   first (a group is a part of one node or whole nodes), of at most ``max_group_sizes``
   different sizes per pool (default 2, e.g. 8+4+4), at most ``max_stages`` stages in all;
3. **micro-batch count** ``M``: a divisor of the global batch; a stage with data-parallel
   degree ``dp`` runs micro batches of ``global_batch / (M * dp)`` sequences;
4. **per-stage DP/TP**: ``tp`` a power of two within a node (``dp = group / tp``); by default
   stages of one *class* (same pool, same group size) share their strategy, which keeps the
   space polynomial in the number of stages (stages of one class differ in their layer count
   only); ``per_stage=True`` gives every stage its own (exponential in the stages);
5. **layer partition**: not enumerated but solved: blocks go one by one to the stage whose
   time grows least, never past what its memory holds (this minimises the slowest stage
   exactly, since every stage's time grows with its block count).

**Cost** (seconds per iteration, :func:`iteration_time`): a 1F1B pipeline,
``sum(stage) + sum(p2p) + (M - 1) * max(stage, p2p)``, where a stage's time per micro batch is its
blocks' forward + backward from the profile plus tensor-parallel all-reduces (ring, over the
node's NVLink; only for roofline profiles: measured tp>1 layers already contain them) and a
p2p hop sends the boundary activations forward and their gradients back over NVLink (same
node) or the network; then the slowest stage's gradient all-reduce (ring, NVLink within a node,
the node's network share across nodes) plus its optimizer step.

**Memory** (:func:`stage_capacity`): a stage holds its blocks' weights, optimizer state and
(when ``M > 1``) gradients, and the saved activations of ``min(M, stages - position)`` micro
batches in flight (1F1B); what fits follows the memory model's rule (:func:`usable_bytes`).

**Memory-first pruning** (``prune=True``): strategies are fixed class by class; as soon as a
class's strategy is chosen its stages' block capacity is known, and if they, plus the best any
remaining class could hold, cannot take all blocks, the whole subtree of plans is cut: a stage
that cannot hold its blocks rules out every plan that would give it as many or more. The same
bound, with every class at its best, cuts a (shape, micro-batch count) before any strategy is
tried. A stage that cannot hold a single block at micro batch ``mb`` with ``f`` micro batches in
flight is remembered, and every later stage of that GPU type, tp and position with ``mb' >= mb``
and ``f' >= f`` is known to fail without being priced (where the profiles' memory terms grow
with the micro batch; :func:`_monotone` checks that). Pruning only ever removes plans that cannot
fit, so the pruned and the unpruned search return the same plans with the same costs; ``steps``
counts evaluations (each complete plan priced or refused, and each cut subtree, once).

Running heterogeneous plans is out of scope: charllm's engines run one GPU type per job.
:func:`charllm.predict.search_cli.homogeneous_plans` picks the single-type, uniform plans that a
campaign can run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from charllm.errors import ConfigError
from charllm.predict import memory as memmodel
from charllm.predict.profile import LayerCost, LayerProfile, ProfileSet

GIB = 1 << 30

#: the card's memory per GPU type, and what fits in it: the memory model's rule
#: (:mod:`charllm.predict.memory`, the same as ``plan --predict``): the card less the framework's
#: reserve, with the allocator's fragmentation on top of the peak
GPU_MEMORY_BYTES: dict[str, int] = dict(memmodel.CARD_BYTES)


def usable_bytes(gpu_type: str, reserve_bytes: int | None = None) -> int:
    """Bytes of tensors a GPU holds: the memory model's capacity over its fragmentation factor,
    or with ``reserve_bytes``, the card less that reserve (and the same fragmentation)."""
    cap = memmodel.capacity_bytes(gpu_type) if reserve_bytes is None else GPU_MEMORY_BYTES[gpu_type] - reserve_bytes
    return int(cap / (1 + memmodel.FRAGMENTATION))


#: per-direction NVLink bandwidth a ring all-reduce reaches within a node (bytes/s): NVLink 4
#: (H100, H200) is 450 GB/s per direction, NCCL's bus bandwidth about 360 GB/s of it (the time
#: model's default too); NVLink 3 (A100) 300 and about 230
NVLINK_BYTES_S: dict[str, float] = {"h100": 360e9, "h200": 360e9, "a100": 230e9, "cpu": 10e9}
#: the seed's clusters have 100 Gb/s InfiniBand per node (include/clusters/h100-8x8.yaml)
DEFAULT_NETWORK_BYTES_S = 100e9 / 8

MAX_POOLS = 4
#: device-group orders and shapes one search may enumerate (the seed's two clusters: 511)
MAX_SHAPES = 5_000
MAX_STAGES = 64
MAX_GLOBAL_BATCH = 1 << 16


@dataclass(frozen=True)
class Pool:
    """The GPUs of one type that a plan may use: a cluster profile, or part of one."""

    name: str
    gpu_type: str
    gpus: int
    gpus_per_node: int
    memory_bytes: int  # usable per GPU (capacity less the framework reserve)
    nvlink_bytes_s: float
    network_bytes_s: float  # per node

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ConfigError(self.name, "gpus", f"a pool needs at least one GPU, got {self.gpus}")
        if self.gpus_per_node < 1:
            raise ConfigError(self.name, "gpus_per_node", f"must be at least 1, got {self.gpus_per_node}")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ConfigError(
                self.name, "gpus", f"{self.gpus} GPUs is not whole nodes of {self.gpus_per_node} (nor part of one node)"
            )
        if self.memory_bytes <= 0:
            raise ConfigError(self.name, "memory_bytes", f"must be positive, got {self.memory_bytes}")
        if not (self.nvlink_bytes_s > 0 and self.network_bytes_s > 0):
            raise ConfigError(self.name, "bandwidth", "link bandwidths must be positive")

    @classmethod
    def of(
        cls,
        name: str,
        gpu_type: str,
        gpus: int,
        gpus_per_node: int,
        *,
        reserve_bytes: int | None = None,
        network_bytes_s: float = DEFAULT_NETWORK_BYTES_S,
        nvlink_bytes_s: float | None = None,
    ) -> Pool:
        if gpu_type not in GPU_MEMORY_BYTES:
            raise ConfigError(name, "gpu_type", f"unknown GPU type {gpu_type!r}; known: {', '.join(GPU_MEMORY_BYTES)}")
        return cls(
            name=name,
            gpu_type=gpu_type,
            gpus=gpus,
            gpus_per_node=gpus_per_node,
            memory_bytes=usable_bytes(gpu_type, reserve_bytes),
            nvlink_bytes_s=NVLINK_BYTES_S[gpu_type] if nvlink_bytes_s is None else nvlink_bytes_s,
            network_bytes_s=network_bytes_s,
        )


@dataclass(frozen=True)
class Unit:
    """What one stage's parts cost at one (pool, tp, micro batch): per micro batch, per rank."""

    block_s: float  # one block, forward + backward (+ TP all-reduces when the profile lacks them)
    block_state: int  # weights + gradients + optimizer state of one block
    block_act: int  # saved activations of one block, one micro batch
    block_grad: int
    block_opt_s: float
    emb_s: float
    emb_state: int
    emb_act: int
    emb_grad: int
    emb_opt_s: float
    head_s: float
    head_state: int
    head_act: int
    head_grad: int
    head_opt_s: float


@dataclass(frozen=True)
class StagePlan:
    pool: str
    gpu_type: str
    gpus: int
    dp: int
    tp: int
    micro_batch: int
    first_block: int
    blocks: int
    time_s: float  # per micro batch
    memory_bytes: int  # peak per GPU (model)


@dataclass(frozen=True)
class Plan:
    cost_s: float
    micro_batches: int
    stages: tuple[StagePlan, ...]
    bubble_s: float  # pipeline fill and drain
    p2p_s: float  # one micro batch's stage-to-stage hops
    sync_s: float  # after the last micro batch: the slowest gradient all-reduce + optimizer step

    @property
    def gpus(self) -> int:
        return sum(s.gpus for s in self.stages)

    @property
    def pools(self) -> tuple[str, ...]:
        out: list[str] = []
        for s in self.stages:
            if not out or out[-1] != s.pool:
                out.append(s.pool)
        return tuple(out)

    def describe(self) -> str:
        groups = " | ".join(f"{s.pool}:{s.gpus}" for s in self.stages)
        strat = " ".join(f"(dp{s.dp},tp{s.tp},mb{s.micro_batch})" for s in self.stages)
        parts = ",".join(str(s.blocks) for s in self.stages)
        return f"{self.cost_s:9.4f} s  M={self.micro_batches:<3}  groups [{groups}]  {strat}  blocks [{parts}]"


@dataclass(frozen=True)
class Problem:
    pools: tuple[Pool, ...]
    profiles: ProfileSet
    n_blocks: int
    global_batch: int
    seq_len: int
    hidden: int
    act_elt_bytes: int = 2  # bf16 activations between stages and in TP all-reduces
    max_stages: int = 16
    max_tp: int = 8
    max_group_sizes: int = 2  # different group sizes within one pool
    per_stage: bool = False  # every stage its own strategy (else one per class: same pool and group size)
    units: dict[tuple[int, int, int], Unit | None] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.pools:
            raise ConfigError("search", "clusters", "no GPU pools to search over")
        if len(self.pools) > MAX_POOLS:
            raise ConfigError("search", "clusters", f"at most {MAX_POOLS} pools, got {len(self.pools)}")
        if len({p.name for p in self.pools}) != len(self.pools):
            raise ConfigError("search", "clusters", "a pool is named twice")
        if not 1 <= self.n_blocks <= 4096:
            raise ConfigError("search", "n_blocks", f"must be in 1..4096, got {self.n_blocks}")
        if not 1 <= self.global_batch <= MAX_GLOBAL_BATCH:
            raise ConfigError("search", "global_batch", f"must be in 1..{MAX_GLOBAL_BATCH}, got {self.global_batch}")
        if not 1 <= self.max_group_sizes <= 8:
            raise ConfigError("search", "max_group_sizes", f"must be in 1..8, got {self.max_group_sizes}")
        if not 1 <= self.max_stages <= MAX_STAGES:
            raise ConfigError("search", "max_stages", f"must be in 1..{MAX_STAGES}, got {self.max_stages}")

    def unit(self, pool_i: int, tp: int, mb: int) -> Unit | None:
        key = (pool_i, tp, mb)
        if key not in self.units:
            pool = self.pools[pool_i]
            prof = self.profiles.get(pool.gpu_type, tp, mb)
            self.units[key] = None if prof is None else make_unit(prof, pool, self.hidden, self.act_elt_bytes)
        return self.units[key]


def _sum_cost(layers: Sequence[LayerCost]) -> tuple[float, int, int, int]:
    return (
        math.fsum(x.time_s for x in layers),
        sum(x.state_bytes for x in layers),
        sum(x.saved_activation_bytes for x in layers),
        sum(x.grad_bytes for x in layers),
    )


def ring_allreduce_s(nbytes: float, ranks: int, bytes_s: float) -> float:
    """A ring all-reduce of ``nbytes`` per rank: each rank moves ``2 (n-1)/n`` of it."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return 2.0 * (ranks - 1) / ranks * nbytes / bytes_s


def tp_comm_included(prof: LayerProfile) -> bool:
    """Measured layers at tp > 1 contain their all-reduces (the events bracket the NCCL kernels)."""
    return prof.source == "measured" and prof.tp > 1


def make_unit(prof: LayerProfile, pool: Pool, hidden: int, elt: int) -> Unit:
    """Per-part costs of ``prof`` on ``pool``: the blocks' mean, the embedding, the head."""
    blk = prof.mean_block()
    emb = [x for x in prof.layers if x.kind == "embedding"]
    head = [x for x in prof.layers if x.kind == "head"]
    e_s, e_state, e_act, e_grad = _sum_cost(emb)
    h_s, h_state, h_act, h_grad = _sum_cost(head)
    block_s = blk.time_s
    if not tp_comm_included(prof):
        # Megatron's block: two all-reduces forward (attention, MLP), two backward, of the block's output
        block_s += 4 * ring_allreduce_s(prof.micro_batch * prof.seq_len * hidden * elt, prof.tp, pool.nvlink_bytes_s)
    params = sum(x.params for x in prof.layers) or 1
    opt_per_param = prof.optimizer_step_s / params
    return Unit(
        block_s=block_s,
        block_state=blk.state_bytes,
        block_act=blk.saved_activation_bytes,
        block_grad=blk.grad_bytes,
        block_opt_s=blk.params * opt_per_param,
        emb_s=e_s,
        emb_state=e_state,
        emb_act=e_act,
        emb_grad=e_grad,
        emb_opt_s=sum(x.params for x in emb) * opt_per_param,
        head_s=h_s,
        head_state=h_state,
        head_act=h_act,
        head_grad=h_grad,
        head_opt_s=sum(x.params for x in head) * opt_per_param,
    )


# -- device groups -----------------------------------------------------------------------------


def group_sizes(pool: Pool) -> list[int]:
    """Power-of-two group sizes a pool can be cut into: within one node, or whole nodes."""
    out = []
    g = 1
    while g <= pool.gpus:
        fits_nodes = (g <= pool.gpus_per_node and pool.gpus_per_node % g == 0) or g % pool.gpus_per_node == 0
        if fits_nodes and (pool.gpus % g == 0 or g < pool.gpus):
            out.append(g)
        g *= 2
    return out


def pool_shapes(pool: Pool, max_parts: int, max_sizes: int = 2) -> list[tuple[int, ...]]:
    """Every way to cut all of ``pool``'s GPUs into at most ``max_parts`` groups of at most
    ``max_sizes`` different sizes, largest first."""
    sizes = sorted(group_sizes(pool), reverse=True)
    out: list[tuple[int, ...]] = []

    def rec(left: int, start: int, acc: list[int]) -> None:
        if left == 0:
            out.append(tuple(acc))
            if len(out) > MAX_SHAPES:
                raise _too_many(pool.name)
            return
        if len(acc) == max_parts:
            return
        for j in range(start, len(sizes)):
            g = sizes[j]
            if g <= left and left <= g * (max_parts - len(acc)) and len(set(acc) | {g}) <= max_sizes:
                acc.append(g)
                rec(left - g, j, acc)
                acc.pop()

    rec(pool.gpus, 0, [])
    return out


@dataclass(frozen=True)
class Shape:
    """Stages as (pool index, group size), in pipeline order, and the links between them."""

    stages: tuple[tuple[int, int], ...]
    p2p_bytes_s: tuple[float, ...]  # link bandwidth between stage i and i+1
    dp_bytes_s: tuple[float, ...]  # bandwidth a stage's gradient all-reduce runs at

    @property
    def classes(self) -> list[tuple[int, int]]:
        seen: list[tuple[int, int]] = []
        for st in self.stages:
            if st not in seen:
                seen.append(st)
        return seen


def _placement(pools: Sequence[Pool], stages: Sequence[tuple[int, int]]) -> Shape:
    nodes: list[tuple[int, int, int]] = []  # (pool, first node, last node) of each stage
    offset: dict[int, int] = {}
    dp_bw = []
    for pi, g in stages:
        pool = pools[pi]
        o = offset.get(pi, 0)
        offset[pi] = o + g
        first, last = o // pool.gpus_per_node, (o + g - 1) // pool.gpus_per_node
        nodes.append((pi, first, last))
        if first == last:
            dp_bw.append(pool.nvlink_bytes_s)
        else:  # every GPU of the group in a node shares the node's network link
            dp_bw.append(pool.network_bytes_s / min(g, pool.gpus_per_node))
    p2p = []
    for (pa, fa, la), (pb, fb, lb) in itertools.pairwise(nodes):
        if pa == pb and fa == la == fb == lb:
            p2p.append(pools[pa].nvlink_bytes_s)
        elif pa == pb:
            p2p.append(pools[pa].network_bytes_s * min(la - fa + 1, lb - fb + 1))
        else:
            bw = min(pools[pa].network_bytes_s, pools[pb].network_bytes_s)
            p2p.append(bw * min(la - fa + 1, lb - fb + 1))
    return Shape(tuple(stages), tuple(p2p), tuple(dp_bw))


def shapes(pools: Sequence[Pool], max_stages: int, max_sizes: int = 2) -> list[Shape]:
    """Every device-group order and shape with at most ``max_stages`` stages."""
    per_pool = [pool_shapes(p, max_stages, max_sizes) for p in pools]
    out: list[Shape] = []
    for r in range(1, len(pools) + 1):
        for order in itertools.permutations(range(len(pools)), r):
            for cuts in itertools.product(*(per_pool[i] for i in order)):
                if sum(len(c) for c in cuts) > max_stages:
                    continue
                stages = [(pi, g) for pi, c in zip(order, cuts, strict=True) for g in c]
                out.append(_placement(pools, stages))
                if len(out) > MAX_SHAPES:
                    raise _too_many("+".join(p.name for p in pools))
    return out


def _too_many(where: str) -> ConfigError:
    return ConfigError(
        where,
        "max_stages",
        f"more than {MAX_SHAPES} device-group shapes to search: lower --max-stages or --max-group-sizes",
    )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# -- memory and cost -------------------------------------------------------------------------


def _stage_bytes(u: Unit, in_flight: int, first: bool, last: bool, accum: bool) -> tuple[int, int]:
    """(fixed bytes, bytes per block) of a stage. Gradients count only when a step accumulates
    several micro batches: with one, they appear as the backward frees the activations (the
    memory model's rule, :mod:`charllm.predict.memory`)."""
    g = 0 if accum else 1
    fixed = 0
    if first:
        fixed += u.emb_state - g * u.emb_grad + in_flight * u.emb_act
    if last:
        fixed += u.head_state - g * u.head_grad + in_flight * u.head_act
    return fixed, u.block_state - g * u.block_grad + in_flight * u.block_act


def stage_capacity(
    u: Unit, memory_bytes: int, in_flight: int, first: bool, last: bool, n_blocks: int, accum: bool = True
) -> int:
    """How many blocks a stage can hold (0: not even one), at most ``n_blocks``; ``accum``: M > 1."""
    fixed, per = _stage_bytes(u, in_flight, first, last, accum)
    room = memory_bytes - fixed
    if room < per:
        return 0
    if per <= 0:
        return n_blocks
    return min(n_blocks, room // per)


def stage_memory(u: Unit, blocks: int, in_flight: int, first: bool, last: bool, accum: bool = True) -> int:
    fixed, per = _stage_bytes(u, in_flight, first, last, accum)
    return fixed + blocks * per


def _fixed_s(u: Unit, first: bool, last: bool) -> float:
    return (u.emb_s if first else 0.0) + (u.head_s if last else 0.0)


def partition(fixed_s: Sequence[float], per_block_s: Sequence[float], caps: Sequence[int], n_blocks: int) -> list[int]:
    """Blocks per stage minimising the slowest stage ``fixed + k * per``, with ``1 <= k <= cap``.

    Greedy water-filling: each stage starts with one block; every further block goes to the stage
    whose time would grow to the smallest value (ties: the earlier stage). Every stage's time
    increases with k, so this order gives the least possible maximum. To save the first steps, it
    starts where the greedy order passes the continuous optimum ``T`` (``k = (T - fixed) / per``,
    rounded down), which the greedy reaches anyway. Needs ``len(caps) <= n_blocks <= sum(caps)``.
    """
    n_st = len(caps)
    if n_st == 1:
        return [n_blocks]
    ks = [1] * n_st
    if min(per_block_s) > 0:
        inv = math.fsum(1.0 / p for p in per_block_s)
        t = (n_blocks + math.fsum(f / p for f, p in zip(fixed_s, per_block_s, strict=True))) / inv
        est = [max(1, min(c, int((t - f) / p))) for f, p, c in zip(fixed_s, per_block_s, caps, strict=True)]
        if sum(est) <= n_blocks:
            ks = est
    for _ in range(n_blocks - sum(ks)):
        best = -1
        best_v = math.inf
        for i in range(n_st):
            if ks[i] < caps[i]:
                v = fixed_s[i] + (ks[i] + 1) * per_block_s[i]
                if v < best_v:
                    best, best_v = i, v
        ks[best] += 1
    return ks


@dataclass(frozen=True)
class PipelineCost:
    total_s: float
    bubble_s: float  # fill and drain: what the pipeline adds over M x the slowest part
    p2p_s: float  # one micro batch's hops, summed over the pipeline
    sync_s: float  # the slowest stage's gradient all-reduce + optimizer step


def iteration_time(
    stage_s: Sequence[float], p2p_s: Sequence[float], sync_s: Sequence[float], micro_batches: int
) -> PipelineCost:
    """One iteration of a 1F1B pipeline.

    ``stage_s``: each stage's forward + backward of one micro batch; ``p2p_s``: each hop's
    activation forward + gradient back, one micro batch; ``sync_s``: each stage's gradient
    all-reduce + optimizer step after the last micro batch. Hops are pipelined like stages:
    ``sum(all) + (M - 1) * slowest`` (fill and drain once, the slowest part for the other
    micro batches), then the slowest stage's sync.
    """
    slowest = max(list(stage_s) + list(p2p_s))
    fill = math.fsum(stage_s) + math.fsum(p2p_s)
    pipe = fill + (micro_batches - 1) * slowest
    sync = max(sync_s) if sync_s else 0.0
    return PipelineCost(total_s=pipe + sync, bubble_s=fill - slowest, p2p_s=math.fsum(p2p_s), sync_s=sync)


# -- the search ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Opt:
    """One strategy of one class in one (shape, M): what it gives each of the class's stages."""

    idx: int  # position among the class's strategies (the same in the pruned and unpruned search)
    tp: int
    dp: int
    mb: int
    # per member stage: (stage index, block capacity, fixed s, s per block, fixed sync s, sync s per block)
    stages: tuple[tuple[int, int, float, float, float, float], ...]
    holds: int  # blocks the class's stages hold together; 0 when one of them cannot hold one
    failed_fresh: bool  # a zero capacity came from evaluating memory, not from the memo


class _Space:
    """One (shape, micro-batch count): each class's strategies, with capacities, times and syncs."""

    def __init__(self, prob: Problem, shape: Shape, m: int, memo: _Memo | None) -> None:
        self.shape = shape
        self.m = m
        n_st = len(shape.stages)
        samples = prob.global_batch // m  # sequences per micro batch over all replicas of a stage
        hop = 2.0 * samples * prob.seq_len * prob.hidden * prob.act_elt_bytes  # activations on, gradients back
        self.p2p = [hop / bw for bw in shape.p2p_bytes_s]
        self.p2p_sum = math.fsum(self.p2p)
        self.p2p_max = max(self.p2p, default=0.0)
        self.options: list[list[_Opt]] = []
        if prob.per_stage:
            groups = [[i] for i in range(n_st)]
        else:
            groups = [[i for i, st in enumerate(shape.stages) if st == c] for c in shape.classes]
        for members in groups:
            pi, g = shape.stages[members[0]]
            pool = prob.pools[pi]
            opts: list[_Opt] = []
            tp = 1
            while tp <= min(g, pool.gpus_per_node, prob.max_tp):
                dp = g // tp
                if prob.global_batch % (m * dp) == 0 and (u := prob.unit(pi, tp, prob.global_batch // (m * dp))):
                    mb = prob.global_batch // (m * dp)
                    rows = []
                    fresh = False
                    for i in members:
                        f = min(m, n_st - i)
                        first, last = i == 0, i == n_st - 1
                        if memo is not None and memo.fails(pi, tp, first, last, m > 1, mb, f):
                            cap = 0
                        else:
                            cap = stage_capacity(u, pool.memory_bytes, f, first, last, prob.n_blocks, m > 1)
                            if cap == 0:
                                fresh = True
                                if memo is not None:
                                    memo.add(pi, tp, first, last, m > 1, mb, f)
                        coef = 2.0 * (dp - 1) / dp / shape.dp_bytes_s[i] if dp > 1 else 0.0
                        gfix = (u.emb_grad if first else 0) + (u.head_grad if last else 0)
                        ofix = (u.emb_opt_s if first else 0.0) + (u.head_opt_s if last else 0.0)
                        rows.append(
                            (
                                i,
                                cap,
                                _fixed_s(u, first, last),
                                u.block_s,
                                coef * gfix + ofix,
                                coef * u.block_grad + u.block_opt_s,
                            )
                        )
                    holds = 0 if min(r[1] for r in rows) < 1 else sum(r[1] for r in rows)
                    opts.append(_Opt(len(opts), tp, dp, mb, tuple(rows), holds, fresh))
                tp *= 2
            self.options.append(opts)

    def price(self, prob: Problem, combo: Sequence[_Opt]) -> float | None:
        """Seconds per iteration of one complete plan, or None when it does not fit."""
        n_st = len(self.shape.stages)
        caps = [0] * n_st
        tfix = [0.0] * n_st
        tper = [0.0] * n_st
        sfix = [0.0] * n_st
        sper = [0.0] * n_st
        for o in combo:
            for i, cap, tf, tpb, sf, spb in o.stages:
                caps[i] = cap
                tfix[i] = tf
                tper[i] = tpb
                sfix[i] = sf
                sper[i] = spb
        if min(caps) < 1 or sum(caps) < prob.n_blocks:
            return None
        ks = partition(tfix, tper, caps, prob.n_blocks)
        stage_s = [tfix[i] + ks[i] * tper[i] for i in range(n_st)]
        slowest = max(max(stage_s), self.p2p_max)
        sync = max(sfix[i] + ks[i] * sper[i] for i in range(n_st))
        return math.fsum(stage_s) + self.p2p_sum + (self.m - 1) * slowest + sync


class _Memo:
    """Stages known not to hold a single block: (pool, tp, first, last, accumulating) -> [(micro batch, in flight)]."""

    def __init__(self, mono: set[tuple[int, int]]) -> None:
        self.mono = mono
        self.failed: dict[tuple[int, int, bool, bool, bool], list[tuple[int, int]]] = {}
        self.hits = 0

    def fails(self, pi: int, tp: int, first: bool, last: bool, accum: bool, mb: int, f: int) -> bool:
        if (pi, tp) not in self.mono:
            return False
        for mb0, f0 in self.failed.get((pi, tp, first, last, accum), ()):
            if mb >= mb0 and f >= f0:
                self.hits += 1
                return True
        return False

    def add(self, pi: int, tp: int, first: bool, last: bool, accum: bool, mb: int, f: int) -> None:
        if (pi, tp) in self.mono:
            self.failed.setdefault((pi, tp, first, last, accum), []).append((mb, f))


#: a plan's identity in a search: (shape index, micro batches, each class's strategy index)
PlanKey = tuple[int, int, tuple[int, ...]]


@dataclass
class SearchResult:
    problem: Problem
    ranked: list[tuple[float, PlanKey]]  # every plan that fits, best first
    steps: int
    candidates: int  # plans the space holds (what the unpruned search evaluates)
    shapes: int
    pruned: bool
    cuts: int = 0
    memo_hits: int = 0
    _shapes: list[Shape] = field(default_factory=list, repr=False)

    def plans(self, n: int | None = None) -> list[Plan]:
        """The ``n`` best plans (all with None), with their stages spelled out."""
        return [plan_of(self.problem, self._shapes[k[0]], k[1], k[2]) for _, k in self.ranked[:n]]

    def plan(self, key: PlanKey) -> Plan:
        return plan_of(self.problem, self._shapes[key[0]], key[1], key[2])

    @property
    def best(self) -> Plan | None:
        top = self.plans(1)
        return top[0] if top else None


def search(prob: Problem, prune: bool = True) -> SearchResult:
    """Every plan of ``prob``'s space that fits, best first, and the evaluation steps it took."""
    all_shapes = shapes(prob.pools, min(prob.max_stages, prob.n_blocks), prob.max_group_sizes)
    ms = divisors(prob.global_batch)
    memo = _Memo(_monotone(prob)) if prune else None
    n = prob.n_blocks
    steps = cuts = candidates = 0
    found: list[tuple[float, PlanKey]] = []
    for si, shape in enumerate(all_shapes):
        for m in ms:
            space = _Space(prob, shape, m, memo)
            if any(not o for o in space.options):
                continue  # no strategy is profiled or divides the batch: not part of the space
            candidates += math.prod(len(o) for o in space.options)
            if not prune:
                for combo in itertools.product(*space.options):
                    steps += 1
                    cost = space.price(prob, combo)
                    if cost is not None:
                        found.append((cost, (si, m, tuple(o.idx for o in combo))))
                continue
            # memory first: a strategy whose stage cannot hold a block is dropped for every combination
            kept = []
            for opts in space.options:
                ok = [o for o in opts if o.holds > 0]
                fresh = sum(1 for o in opts if o.holds == 0 and o.failed_fresh)
                steps += fresh
                cuts += fresh
                kept.append(ok)
            if any(not o for o in kept):
                continue
            best_hold = [max(o.holds for o in opts) for opts in kept]
            if sum(best_hold) < n:  # even the roomiest strategies cannot hold every block
                steps += 1
                cuts += 1
                continue
            rest = [sum(best_hold[ci + 1 :]) for ci in range(len(kept))]
            last = len(kept)
            stack: list[tuple[int, int, tuple[_Opt, ...]]] = [(0, 0, ())]
            while stack:
                ci, held, chosen = stack.pop()
                if ci == last:
                    steps += 1
                    cost = space.price(prob, chosen)
                    if cost is not None:
                        found.append((cost, (si, m, tuple(o.idx for o in chosen))))
                    continue
                for o in kept[ci]:
                    if held + o.holds + rest[ci] < n:
                        steps += 1  # with this strategy the stages cannot hold all blocks: cut below
                        cuts += 1
                        continue
                    stack.append((ci + 1, held + o.holds, (*chosen, o)))
    found.sort()
    return SearchResult(
        problem=prob,
        ranked=found,
        steps=steps,
        candidates=candidates,
        shapes=len(all_shapes),
        pruned=prune,
        cuts=cuts,
        memo_hits=memo.hits if memo else 0,
        _shapes=all_shapes,
    )


def _memory_terms(u: Unit) -> tuple[int, ...]:
    """Every byte count a stage's memory adds, with and without gradients."""
    return (
        u.block_act, u.emb_act, u.head_act, u.block_state, u.emb_state, u.head_state,
        u.block_state - u.block_grad, u.emb_state - u.emb_grad, u.head_state - u.head_grad,
    )  # fmt: skip


def _monotone(prob: Problem) -> set[tuple[int, int]]:
    """(pool, tp) whose profiled memory never shrinks as the micro batch grows (the memo's premise)."""
    out = set()
    keys = prob.profiles.keys()
    for pi, pool in enumerate(prob.pools):
        for tp in sorted({k[1] for k in keys if k[0] == pool.gpu_type}):
            units = [prob.unit(pi, tp, mb) for mb in sorted(k[2] for k in keys if k[:2] == (pool.gpu_type, tp))]
            terms = [_memory_terms(u) for u in units if u is not None]
            if all(x <= y for a, b in itertools.pairwise(terms) for x, y in zip(a, b, strict=True)):
                out.add((pi, tp))
    return out


def plan_of(prob: Problem, shape: Shape, m: int, choice: Sequence[int]) -> Plan:
    """The plan (shape, M, each class's strategy), priced again with every detail."""
    space = _Space(prob, shape, m, None)
    combo = [space.options[ci][oi] for ci, oi in enumerate(choice)]
    cost = space.price(prob, combo)
    if cost is None:
        raise ValueError("plan does not fit")
    n_st = len(shape.stages)
    by_stage: dict[int, tuple[_Opt, tuple[int, int, float, float, float, float]]] = {}
    for o in combo:
        for row in o.stages:
            by_stage[row[0]] = (o, row)
    caps = [by_stage[i][1][1] for i in range(n_st)]
    tfix = [by_stage[i][1][2] for i in range(n_st)]
    tper = [by_stage[i][1][3] for i in range(n_st)]
    ks = partition(tfix, tper, caps, prob.n_blocks)
    stage_s = [tfix[i] + ks[i] * tper[i] for i in range(n_st)]
    sync = [by_stage[i][1][4] + ks[i] * by_stage[i][1][5] for i in range(n_st)]
    pc = iteration_time(stage_s, space.p2p, sync, m)
    out = []
    first_block = 0
    for i, (pi, g) in enumerate(shape.stages):
        o = by_stage[i][0]
        pool = prob.pools[pi]
        u = prob.unit(pi, o.tp, o.mb)
        assert u is not None
        f = min(m, n_st - i)
        out.append(
            StagePlan(
                pool=pool.name,
                gpu_type=pool.gpu_type,
                gpus=g,
                dp=o.dp,
                tp=o.tp,
                micro_batch=o.mb,
                first_block=first_block,
                blocks=ks[i],
                time_s=stage_s[i],
                memory_bytes=stage_memory(u, ks[i], f, i == 0, i == n_st - 1, m > 1),
            )
        )
        first_block += ks[i]
    return Plan(
        cost_s=pc.total_s, micro_batches=m, stages=tuple(out), bubble_s=pc.bubble_s, p2p_s=pc.p2p_s, sync_s=pc.sync_s
    )

"""What each training engine can run, and the layout rules every cell must meet.

One table and one function, :func:`refusals`, shared by everything that judges a cell: the
campaign validator (:func:`charllm.campaign.resolve`), ``charllm validate``, ``plan`` and
``render`` on the orchestrator, and the training job before it builds an engine
(:meth:`charllm.train.cell.CellSpec.check`, :func:`job_refusals`). So a campaign that
validates is a campaign the job accepts: the two cannot disagree about a layout.

Pure data and arithmetic: imports neither torch nor pydantic (the job imports it on GPU
nodes that carry only torch, pandas, pyarrow and nvidia-ml-py).

A cell is judged through a :class:`CellView` (plain values). :func:`refusals` returns every
reason it cannot run as a :class:`Refusal` ``(field, reason, kind)``:

- ``layout``: no engine can run it (heads not divisible by tp, layers by pp, ...);
- ``cluster``: the cluster cannot hold it (more GPUs than it has, a part of a node);
- ``engine``: its engine, on its device, lacks a mode or knob it asks for.

The engine tables are :data:`ENGINES`. To change what an engine runs, edit its
:class:`EngineCaps` entry; device-specific limits (megatron-core on CPU) are the
``device_limits`` mapping, e.g. :data:`MEGATRON_CPU_LIMITS`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

from charllm.modelcat import ModelShape

if TYPE_CHECKING:  # the job's parsed cell; imported for types only (no cycle at runtime)
    from charllm.train.cell import CellSpec

RECOMPUTE_MODES = ("none", "full", "selective", "kwai")
#: cell-level knobs of the Megatron-Kwai and PCIe studies (defaults leave a cell unchanged)
ZERO_STAGES = (0, 1, 2, 3)
INTERCONNECTS = ("native", "pcie")
#: what ``interconnect: pcie`` sets in the job's environment (before NCCL initialises): no
#: peer-to-peer over NVLink, no NVLink SHARP, no CUDA-IPC-style shared buffers, so traffic between
#: GPUs of a node goes through host memory as on a PCIe-only machine
PCIE_ENV: Mapping[str, str] = MappingProxyType({"NCCL_P2P_DISABLE": "1", "NCCL_NVLS_ENABLE": "0"})
PP_SCHEDULES = ("gpipe", "1f1b")
# charllm.train.model.VOCAB_PAD: embedding and output rows are padded to a multiple of it
VOCAB_PAD = 128

#: Every mode and knob a cell can ask for, with the words a refusal uses for it. Families
#: appear as ``family:<name>``, recompute modes as ``recompute:<mode>``.
FEATURES: Mapping[str, str] = MappingProxyType(
    {
        "tp": "tensor parallelism (tp > 1)",
        "sequence_parallel": "sequence parallelism",
        "pp": "pipeline parallelism (pp > 1)",
        "pp_virtual": "interleaved virtual pipeline stages (pp_virtual > 1)",
        "cp": "context parallelism (cp > 1)",
        "ep": "expert parallelism (ep > 1)",
        "dp": "data parallelism (dp > 1)",
        "fsdp": "fully sharded data parallelism (fsdp)",
        "recompute:full": "full activation recompute (recompute: full)",
        "recompute:selective": "selective activation recompute (recompute: selective)",
        "recompute:kwai": "Kwai's norm + MLP-activation recompute (recompute: kwai)",
        "recompute_layers": "recompute of the first N layers per stage only (recompute_layers > 0)",
        "offload": "activation offload to pinned host memory (offload_alpha > 0)",
        "zero:1": "ZeRO-1: DDP with a sharded optimizer state (zero: 1)",
        "zero:2": "ZeRO-2: sharded optimizer state and gradients (zero: 2)",
        "zero:3": "ZeRO-3: sharded parameters, gradients and optimizer state (zero: 3)",
        "cpu_offload": "parameters, gradients and optimizer step offloaded to the CPU (cpu_offload)",
        "interconnect:pcie": "GPU traffic kept off NVLink peer-to-peer (interconnect: pcie)",
        "overlap": "compute/communication overlap (overlap)",
        "distributed_optimizer": "the distributed optimizer",
        "compile": "torch.compile (compile)",
        "pp_partition": "a custom pipeline partition (pp_partition: custom:...)",
        "profile:layers": "per-layer profiling (profile: layers)",
        "profile:instructions": "per-instruction pipeline timelines (profile: instructions)",
        "frequency_plan": "per-instruction SM clocks from a Perseus frequency plan (frequency_plan)",
        "indexed_data": "a prepared indexed dataset (dataset kind: indexed)",
    }
)

# the cell field a feature is asked for by (the refusal's field)
_FIELD = {"recompute": "recompute", "family": "model", "offload": "offload_alpha", "profile": "profile"}
_FIELD.update({"zero": "zero", "interconnect": "interconnect", "indexed_data": "dataset"})


def _field_of(feature: str) -> str:
    return _FIELD.get(feature.split(":", 1)[0], feature)


def _describe(feature: str) -> str:
    if feature.startswith("family:"):
        return f"model family {feature.removeprefix('family:')!r}"
    return FEATURES[feature]


def _frozen(d: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class EngineCaps:
    """What one engine runs. A feature not listed is refused (with ``lacks``' reason if given).

    ``parallel``: parallel modes among tp, sequence_parallel, pp, pp_virtual, cp, ep, dp, fsdp.
    ``families``: model families (``ModelShape.family``). ``recompute``: recompute modes.
    ``knobs``: overlap, distributed_optimizer, compile. ``devices``: cpu, cuda.
    ``device_limits``: per device, features refused there and why (``family:<name>`` for a
    model family). ``combos``: pairs of features the engine cannot combine, and why.
    ``vocab_parallel``: the embedding and output layer are split over tp (the padded
    vocabulary must divide by tp). ``min_microbatches_1f1b``: the 1F1B schedule needs at least
    pp micro batches per step (torch.distributed.pipelining). ``notes``: how supported
    features run, for people reading the table.
    """

    name: str
    parallel: frozenset[str]
    families: frozenset[str]
    recompute: frozenset[str]
    knobs: frozenset[str]
    devices: frozenset[str]
    lacks: Mapping[str, str] = field(default_factory=_frozen)
    device_limits: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: MappingProxyType({}))
    combos: tuple[tuple[frozenset[str], str], ...] = ()
    vocab_parallel: bool = False
    min_microbatches_1f1b: bool = False
    # context parallelism splits the sequence into cp * this many chunks (2: load-balanced causal)
    cp_chunks_per_rank: int = 1
    pp_schedules: frozenset[str] = frozenset(PP_SCHEDULES)
    # model families whose MoE shapes (num_experts > 0) the engine builds; None: every family
    moe_families: frozenset[str] | None = None
    notes: Mapping[str, str] = field(default_factory=_frozen)

    def supports(self, feature: str) -> bool:
        """Whether the engine runs ``feature`` on some device."""
        if feature.startswith("family:"):
            return feature.removeprefix("family:") in self.families
        if feature.startswith("recompute:"):
            return feature.removeprefix("recompute:") in self.recompute
        return feature in self.parallel or feature in self.knobs


#: What megatron-core cannot do on CPU (gloo, fp32). Empty since the engine's CPU shim
#: (:mod:`charllm.train.megatron_cpu`) maps megatron-core's CUDA placements, streams and RNG
#: calls to the CPU: RoPE families, recompute, MoE/EP and FSDP all run over gloo in the tests.
#: A mode that needs a GPU again goes here, with its reason.
MEGATRON_CPU_LIMITS: Mapping[str, str] = _frozen({})

TORCH = EngineCaps(
    name="torch",
    parallel=frozenset({"tp", "pp", "pp_virtual", "cp", "dp", "fsdp"}),
    families=frozenset({"gpt3", "llama3", "mixtral"}),
    recompute=frozenset({"none", "full", "selective", "kwai"}),
    knobs=frozenset(
        {
            "overlap",
            "compile",
            "recompute_layers",
            "offload",
            "zero:1",
            "zero:2",
            "zero:3",
            "cpu_offload",
            "interconnect:pcie",
            "indexed_data",
            "pp_partition",
            "profile:layers",
            "profile:instructions",
            "frequency_plan",
        }
    ),
    devices=frozenset({"cpu", "cuda"}),
    lacks=_frozen(
        {
            "ep": "the torch engine replicates experts across dp ranks: use ep = 1, or engine: megatron",
        }
    ),
    combos=(
        (
            frozenset({"zero:1", "tp"}),
            "ZeRO-1 (DDP + ZeroRedundancyOptimizer) runs over plain data parallelism; use zero 2/3 with tp",
        ),
        (
            frozenset({"zero:1", "pp"}),
            "ZeRO-1 (DDP + ZeroRedundancyOptimizer) runs over plain data parallelism; use zero 2/3 with pp",
        ),
        (
            frozenset({"recompute:kwai", "family:mixtral"}),
            "kwai's fused MLP-activation recompute covers dense MLPs only",
        ),
        (frozenset({"offload", "compile"}), "saved-tensor offload hooks are not traced by torch.compile"),
        (frozenset({"cpu_offload", "pp"}), "FSDP2's CPU offload is not combined with pipelining here"),
        (frozenset({"cpu_offload", "tp"}), "FSDP2's CPU offload is not combined with tensor parallelism here"),
        (frozenset({"cp", "tp"}), "the torch engine's ring attention runs with dp/fsdp/zero only (no tp)"),
        (frozenset({"pp_virtual", "pp_partition"}), "virtual stages split the layers evenly (no custom partition)"),
        (frozenset({"cp", "pp"}), "the torch engine's ring attention runs with dp/fsdp/zero only (no pp)"),
        (
            frozenset({"profile:layers", "pp"}),
            "the layer profiler takes micro batches in order; a pipeline schedule interleaves them (use pp = 1)",
        ),
    ),
    min_microbatches_1f1b=True,
    cp_chunks_per_rank=2,
    notes=_frozen(
        {
            "tp": "parallelize_module per block (Megatron's colwise/rowwise split), no sequence parallelism",
            "cp": "ring attention over the cp group (load-balanced causal split: rank r holds chunks r and "
            "2cp-1-r), blocks merged by log-sum-exp; gradients averaged over dp x cp",
            "pp": "torch.distributed.pipelining, GPipe or 1F1B (opt.pp_schedule); ScheduleInterleaved1F1B with "
            "pp_virtual > 1 (rank r holds stages r, r + pp, ...)",
            "dp": "DistributedDataParallel with overlap; otherwise an all-reduce after backward",
            "fsdp": "FSDP2 fully_shard per block over dp (2-D with tp)",
            "overlap": "DDP's bucketed all-reduce overlaps backward (plain DDP: dp > 1, tp = pp = 1, no fsdp); "
            "a no-op elsewhere",
            "mixtral": "MoE experts replicated on every dp rank (ep = 1)",
            "recompute": "full: torch.utils.checkpoint per block; selective: the SDPA call; kwai: norms and the "
            "MLP activation (fused with the following linears on the tp shards, matmul outputs kept); "
            "recompute_layers: the first N blocks of each stage",
            "offload": "saved-tensor hooks copy offload_alpha of each micro batch's block activations to pooled "
            "pinned host buffers on a side stream, prefetched one block ahead of backward (block inputs "
            "under full recompute)",
            "zero": "1: DDP + ZeroRedundancyOptimizer; 2: FSDP2 without reshard after forward; 3: FSDP2; "
            "cpu_offload: FSDP2 CPUOffloadPolicy",
            "interconnect": "pcie: NCCL_P2P_DISABLE=1, NCCL_NVLS_ENABLE=0 in the job before NCCL starts",
        }
    ),
)

MEGATRON = EngineCaps(
    name="megatron",
    parallel=frozenset({"tp", "sequence_parallel", "pp", "pp_virtual", "dp", "ep", "fsdp"}),
    families=frozenset({"gpt3", "llama3", "mixtral"}),
    recompute=frozenset({"none", "full", "selective"}),
    knobs=frozenset(
        {"overlap", "distributed_optimizer", "recompute_layers", "zero:1", "interconnect:pcie", "indexed_data"}
    ),
    devices=frozenset({"cpu", "cuda"}),
    lacks=_frozen(
        {
            "cp": "context parallelism is not wired to megatron-core's attention in this engine",
            "compile": "torch.compile of Megatron's layers is not wired; use engine: torch",
            "pp_partition": "megatron-core splits layers evenly (only the first/last stage may differ); "
            "custom partitions run in engine: torch",
            "recompute:kwai": "Kwai's norm + MLP-activation recompute is implemented in the torch engine only",
            "offload": "activation offload (offload_alpha) is implemented in the torch engine only",
            "zero:2": "megatron shards gradients and parameters through fsdp: true (or use engine: torch)",
            "zero:3": "megatron shards gradients and parameters through fsdp: true (or use engine: torch)",
            "cpu_offload": "optimizer/parameter CPU offload is not wired in this engine; use engine: torch",
            "profile:layers": "the layer profiler (charllm.train.layer_profile) hooks the torch engine's blocks; "
            "use engine: torch",
            "profile:instructions": "the instruction recorder (charllm.energy.recorder) hooks "
            "torch.distributed.pipelining's stage; use engine: torch",
            "frequency_plan": "frequency plans are applied through the instruction recorder's hooks on "
            "torch.distributed.pipelining's stage; use engine: torch",
        }
    ),
    device_limits=MappingProxyType({"cpu": MEGATRON_CPU_LIMITS}),
    combos=(
        (
            frozenset({"fsdp", "ep"}),
            "FSDP shards over the whole data-parallel group, which would average each rank's own experts "
            "(use ep = 1 with fsdp)",
        ),
        (
            frozenset({"recompute:selective", "recompute_layers"}),
            "megatron-core's selective recompute applies to every layer (recompute_layers needs recompute: full)",
        ),
    ),
    vocab_parallel=True,
    pp_schedules=frozenset({"1f1b"}),
    moe_families=frozenset({"mixtral"}),
    notes=_frozen(
        {
            "tp": "megatron-core column/row-parallel layers, sequence parallel when tp > 1",
            "pp": "megatron-core schedules: 1F1B, interleaved with pp_virtual > 1",
            "dp": "Megatron DDP and the distributed optimizer",
            "ep": "MoE layers (all-to-all token dispatcher) with expert parallelism carved out of dp",
            "fsdp": "torch FSDP2 fully_shard over Megatron's data-parallel group (per TransformerLayer), "
            "megatron-core's FP32 optimizer over the shards",
            "recompute": "full: uniform, 1 layer per group (recompute_layers N: method block, the first N layers "
            "per stage); selective: the core attention (recompute_modules core_attn)",
            "zero": "1: the distributed optimizer (what this engine runs for dp without fsdp anyway)",
            "interconnect": "pcie: NCCL_P2P_DISABLE=1, NCCL_NVLS_ENABLE=0 in the job before NCCL starts",
            "overlap": "overlap_grad_reduce + overlap_param_gather in Megatron's DDP; tp_comm_overlap where "
            "Transformer Engine imports",
        }
    ),
)

NEMO = EngineCaps(
    name="nemo",
    parallel=frozenset({"tp", "sequence_parallel", "pp", "pp_virtual", "dp", "ep"}),
    families=frozenset({"gpt3", "llama3", "mixtral"}),
    recompute=frozenset({"none", "full", "selective"}),
    knobs=frozenset({"overlap", "distributed_optimizer"}),
    devices=frozenset({"cuda"}),
    lacks=_frozen(
        {
            "cp": "context parallelism is not mapped for engine nemo (it needs Transformer Engine's attention)",
            "fsdp": "engine nemo maps Megatron DDP with the distributed optimizer only (NeMo's FSDP is another "
            "strategy); use engine: megatron",
            "compile": "torch.compile is not wired in engine nemo; use engine: torch",
            "indexed_data": "engine nemo reads synthetic tokens only (charllm's indexed format is not NeMo's "
            ".bin/.idx); use dataset kind synthetic",
        }
    ),
    vocab_parallel=True,
    pp_schedules=frozenset({"1f1b"}),
    moe_families=frozenset({"mixtral"}),
    notes=_frozen(
        {
            "engine": "NeMo 2.7.3 nemo.collections.llm GPTModel + MegatronStrategy + MegatronMixedPrecision "
            "(charllm.nemo_config); synthetic data (MockDataModule); GPUs only; no kernel breakdown",
            "tp": "MegatronStrategy tensor_model_parallel_size, sequence_parallel when tp > 1",
            "pp": "MegatronStrategy pipeline_model_parallel_size (1F1B; interleaved with pp_virtual > 1)",
            "dp": "megatron-core DDP (DistributedDataParallelConfig) and the distributed optimizer",
            "overlap": "overlap_grad_reduce + overlap_param_gather; tp_comm_overlap where Transformer Engine imports",
            "recompute": "GPTConfig recompute_granularity full (uniform, 1 layer) or selective (core_attn)",
        }
    ),
)

ENGINES: Mapping[str, EngineCaps] = MappingProxyType({"torch": TORCH, "megatron": MEGATRON, "nemo": NEMO})


class Refusal(NamedTuple):
    """One reason a cell cannot run: the cell field at fault, why, and the kind of rule."""

    field: str
    reason: str
    kind: str  # layout | cluster | engine

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


@dataclass(frozen=True)
class CellView:
    """A cell as plain values: what :func:`refusals` needs, from a campaign cell or a job's cell.

    ``device``: ``cpu`` or ``cuda`` (:func:`device_of`). ``world_size``: the ranks the job
    gets. ``gpus_per_node`` and ``cluster_gpus``: the cluster's shape, when known (the job
    knows the node size from its cell, not the cluster's total).
    """

    engine: str
    device: str
    model: ModelShape
    tp: int = 1
    pp: int = 1
    pp_virtual: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    fsdp: bool = False
    recompute: str = "none"  # none | full | selective | kwai
    recompute_layers: int = 0  # 0: every layer of a stage
    offload_alpha: float = 0.0
    zero: int = 0
    cpu_offload: bool = False
    interconnect: str = "native"
    overlap: bool = False
    compile: bool = False
    pp_partition: str = ""  # "" (uniform) or "custom:0,8,14,20,26" (stage start layers, then n_layers)
    pp_schedule: str = "1f1b"
    profile_mode: str = "none"  # none | layers | instructions
    frequency_plan: bool = False  # a per-instruction clock plan (gpu_control.request.frequency_plan)
    dataset: str = "synthetic"  # the dataset kind: synthetic | indexed
    precision: str = "bf16"
    micro_batch: int = 1
    global_batch: int = 1
    seq_len: int = 1
    world_size: int | None = None  # None: tp*pp*dp*cp
    gpus_per_node: int | None = None
    cluster_gpus: int | None = None

    @property
    def ranks(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def microbatches(self) -> int:
        """Micro batches per optimizer step on each data-parallel rank."""
        return self.global_batch // (self.micro_batch * self.dp)

    def uses(self) -> list[str]:
        """The features of :data:`FEATURES` this cell asks for (families as ``family:<name>``)."""
        out = [f"family:{self.model.family}"]
        for name in ("tp", "pp", "pp_virtual", "cp", "ep", "dp"):
            if getattr(self, name) > 1:
                out.append(name)
        if self.fsdp:
            out.append("fsdp")
        if self.recompute != "none":
            out.append(f"recompute:{self.recompute}")
        if self.recompute_layers > 0:
            out.append("recompute_layers")
        if self.offload_alpha > 0:
            out.append("offload")
        if self.zero in (1, 2, 3):
            out.append(f"zero:{self.zero}")
        if self.cpu_offload:
            out.append("cpu_offload")
        if self.interconnect == "pcie":
            out.append("interconnect:pcie")
        if self.overlap:
            out.append("overlap")
        if self.compile:
            out.append("compile")
        if self.pp_partition:
            out.append("pp_partition")
        if self.profile_mode == "layers":
            out.append("profile:layers")
        if self.profile_mode == "instructions":
            out.append("profile:instructions")
        if self.frequency_plan:
            out.append("frequency_plan")
        if self.dataset == "indexed":
            out.append("indexed_data")
        return out


PP_PARTITION_MAX = 4096


def stage_starts(partition: str, n_layers: int, pp: int) -> list[int]:
    """The first layer of each pipeline stage for ``partition``.

    ``""``/``"uniform"``: :func:`uniform_starts`. ``"custom:0,8,14,20,26"`` (Merak's syntax, the
    Perseus artifact's): stage ``i`` begins at layer ``a_i``; the last number is the model's layer
    count. The embedding is in the first stage, the output layer in the last. ValueError naming
    what is wrong otherwise.
    """
    if partition in ("", "uniform"):
        return uniform_starts(n_layers, pp)
    if not partition.startswith("custom:"):
        raise ValueError(f"pp_partition {partition!r}: expected 'uniform' or 'custom:0,a1,...,n_layers'")
    body = partition.removeprefix("custom:")
    parts = body.split(",")
    if len(parts) > PP_PARTITION_MAX or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"pp_partition {partition!r}: stage start layers must be whole numbers separated by commas")
    nums = [int(p) for p in parts]
    if len(nums) != pp + 1:
        raise ValueError(
            f"pp_partition {partition!r} names {len(nums) - 1} stages (start layers, then the layer count) "
            f"but pp is {pp}"
        )
    if nums[0] != 0:
        raise ValueError(f"pp_partition {partition!r}: the first stage must begin at layer 0")
    if nums[-1] != n_layers:
        raise ValueError(f"pp_partition {partition!r} ends at {nums[-1]}, but the model has {n_layers} layers")
    if any(b <= a for a, b in itertools.pairwise(nums)):
        raise ValueError(f"pp_partition {partition!r}: start layers must increase (every stage holds >= 1 layer)")
    return nums[:-1]


def uniform_starts(n_layers: int, pp: int) -> list[int]:
    """Contiguous stages, earlier stages taking the remainder (:func:`charllm.train.model.split_layers`)."""
    base, rem = divmod(n_layers, pp)
    out, start = [], 0
    for s in range(pp):
        out.append(start)
        start += base + (1 if s < rem else 0)
    return out


def device_of(gpu_type: str) -> str:
    """The device kind a cell's ranks drive: ``cpu`` for ``gpu_type: cpu``, else ``cuda``."""
    return "cpu" if gpu_type == "cpu" else "cuda"


def recompute_mode(value: object) -> str:
    """``true``/``false``/``"none"``/``"full"``/``"selective"``/``"kwai"`` as one of :data:`RECOMPUTE_MODES`."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    if isinstance(value, str) and value in RECOMPUTE_MODES:
        return value
    raise ValueError(f"recompute must be true, false or one of {', '.join(RECOMPUTE_MODES)}; got {value!r}")


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PAD) * VOCAB_PAD


# -- the rules --------------------------------------------------------------------------------


def _counts(v: CellView) -> list[Refusal]:
    out = []
    for name in ("tp", "pp", "pp_virtual", "dp", "cp", "ep", "micro_batch", "global_batch", "seq_len"):
        if getattr(v, name) < 1:
            out.append(Refusal(name, f"{name} must be >= 1, got {getattr(v, name)}", "layout"))
    m = v.model
    for name in ("n_layers", "hidden", "n_heads", "ffn_hidden", "vocab_size", "max_seq_len"):
        if getattr(m, name) < 1:
            out.append(Refusal("model", f"model.{name} must be >= 1, got {getattr(m, name)}", "layout"))
    if m.n_kv_heads < 0 or m.num_experts < 0 or m.top_k < 0:
        out.append(Refusal("model", "model.n_kv_heads, num_experts and top_k must be >= 0", "layout"))
    if v.world_size is not None and v.world_size < 1:
        out.append(Refusal("gpus", f"world size must be >= 1, got {v.world_size}", "layout"))
    if v.recompute not in RECOMPUTE_MODES:
        modes = ", ".join(RECOMPUTE_MODES)
        out.append(Refusal("recompute", f"recompute must be one of {modes}; got {v.recompute!r}", "layout"))
    if v.recompute_layers < 0:
        out.append(Refusal("recompute_layers", f"recompute_layers must be >= 0, got {v.recompute_layers}", "layout"))
    if not 0.0 <= v.offload_alpha <= 1.0:
        out.append(Refusal("offload_alpha", f"offload_alpha must be in 0..1, got {v.offload_alpha}", "layout"))
    if v.zero not in ZERO_STAGES:
        out.append(Refusal("zero", f"zero must be one of 0, 1, 2, 3; got {v.zero}", "layout"))
    if v.interconnect not in INTERCONNECTS:
        out.append(Refusal("interconnect", f"interconnect must be native or pcie; got {v.interconnect!r}", "layout"))
    return out


def _layout(v: CellView) -> list[Refusal]:
    m, out = v.model, []

    def no(fld: str, reason: str) -> None:
        out.append(Refusal(fld, reason, "layout"))

    if v.world_size is not None and v.world_size != v.ranks:
        no(
            "gpus",
            f"world size mismatch: world_size {v.world_size} but tp*pp*dp*cp = {v.tp}*{v.pp}*{v.dp}*{v.cp} = {v.ranks}",
        )
    # the model itself
    if m.hidden % m.n_heads:
        no("model", f"{m.name}: hidden {m.hidden} is not a multiple of n_heads {m.n_heads}")
    if m.n_heads % m.kv_heads:
        no("model", f"{m.name}: n_heads {m.n_heads} is not a multiple of n_kv_heads {m.kv_heads}")
    if m.num_experts and not 0 < m.top_k <= m.num_experts:
        no("model", f"{m.name}: top_k {m.top_k} must be in 1..num_experts {m.num_experts}")
    # tensor parallelism splits heads, KV heads and the MLP
    if m.n_heads % v.tp:
        no("tp", f"tensor parallel size {v.tp} does not divide {m.name}'s {m.n_heads} attention heads")
    if m.kv_heads % v.tp:
        no("tp", f"tensor parallel size {v.tp} does not divide {m.name}'s {m.kv_heads} KV heads")
    if m.ffn_hidden % v.tp:
        no("tp", f"tensor parallel size {v.tp} does not divide {m.name}'s MLP width (ffn_hidden) {m.ffn_hidden}")
    # pipeline stages hold equal numbers of layers, or the layers a custom partition gives them
    stages = v.pp * v.pp_virtual
    if v.pp_virtual > 1 and v.pp == 1:
        no("pp_virtual", f"virtual pipeline stages (pp_virtual {v.pp_virtual}) need pipeline parallelism (pp > 1)")
    if v.profile_mode == "instructions" and (v.pp == 1 or v.pp_virtual > 1):
        no(
            "profile",
            "profile: instructions times the forwards and backwards of a pipeline stage: it needs pp > 1 "
            "with one stage per rank (pp_virtual 1)",
        )
    if v.frequency_plan and (v.pp == 1 or v.pp_virtual > 1):
        no(
            "frequency_plan",
            "a frequency plan sets the clock of each pipeline instruction: it needs pp > 1 with one stage per "
            "rank (pp_virtual 1)",
        )
    if v.pp_partition:
        try:
            stage_starts(v.pp_partition, m.n_layers, v.pp)
        except ValueError as err:
            no("pp_partition", str(err))
        if v.pp_virtual > 1:
            no("pp_partition", "a custom pipeline partition with virtual stages (pp_virtual > 1) is not supported")
    elif m.n_layers % stages:
        if v.pp_virtual == 1:
            no("pp", f"pipeline parallel size {v.pp} does not divide {m.name}'s {m.n_layers} layers")
        else:
            no(
                "pp_virtual",
                f"pp*pp_virtual = {v.pp}*{v.pp_virtual} = {stages} does not divide {m.name}'s {m.n_layers} layers",
            )
    # recompute, offload and ZeRO knobs
    per_stage = m.n_layers // stages if stages and not m.n_layers % stages else m.n_layers
    if v.recompute_layers > 0 and v.recompute == "none":
        no("recompute_layers", f"recompute_layers {v.recompute_layers} without recompute (set recompute)")
    elif v.recompute_layers > per_stage:
        no(
            "recompute_layers",
            f"recompute_layers {v.recompute_layers} exceeds the {per_stage} layers of a pipeline stage of {m.name}",
        )
    if v.zero and v.fsdp:
        no("zero", f"zero {v.zero} with fsdp: both shard the model over dp; use one (fsdp is zero 3)")
    if v.cpu_offload and not (v.zero in (2, 3) or v.fsdp):
        no("cpu_offload", "cpu_offload offloads a sharded model: it needs zero 2 or 3 (or fsdp)")
    # batches
    if v.global_batch % (v.micro_batch * v.dp):
        no(
            "global_batch",
            f"global batch {v.global_batch} is not divisible by micro_batch*dp = {v.micro_batch}*{v.dp}",
        )
    elif v.pp_virtual > 1 and v.pp > 1 and v.microbatches % v.pp:
        no(
            "pp_virtual",
            f"the interleaved schedule needs the micro batches per step ({v.microbatches} = global_batch / "
            f"(micro_batch*dp)) to be a multiple of pp {v.pp}",
        )
    # sequence
    if v.seq_len % v.cp:
        no("cp", f"context parallel size {v.cp} does not divide sequence length {v.seq_len}")
    if v.seq_len > m.max_seq_len:
        no("seq_len", f"{v.seq_len} exceeds {m.name}'s maximum sequence length {m.max_seq_len}")
    # experts
    if v.ep > 1:
        if not m.num_experts:
            no("ep", f"expert parallel size {v.ep} on dense model {m.name} (ep needs a MoE model)")
        elif m.num_experts % v.ep:
            no("ep", f"expert parallel size {v.ep} does not divide {m.name}'s {m.num_experts} experts")
        if (v.dp * v.cp) % v.ep:
            no("ep", f"expert parallel size {v.ep} does not divide dp*cp = {v.dp * v.cp}")
    return out


def _cluster(v: CellView) -> list[Refusal]:
    out, world = [], v.ranks if v.world_size is None else v.world_size
    if v.cluster_gpus is not None and world > v.cluster_gpus:
        out.append(Refusal("gpus", f"cell needs {world} GPUs, the cluster has {v.cluster_gpus}", "cluster"))
    gpn = v.gpus_per_node
    if gpn is not None and world > gpn and world % gpn:
        out.append(Refusal("gpus", f"world size {world} is not a whole number of {gpn}-GPU nodes", "cluster"))
    return out


def _engine(v: CellView) -> list[Refusal]:
    caps = ENGINES.get(v.engine)
    if caps is None:
        return [Refusal("engine", f"unknown engine {v.engine!r}; engines are {', '.join(ENGINES)}", "engine")]
    out = []

    def no(fld: str, reason: str) -> None:
        out.append(Refusal(fld, reason, "engine"))

    if v.device not in caps.devices:
        no("gpu_type", f"engine {caps.name!r} does not run on {v.device}")
    used = v.uses()
    limits = caps.device_limits.get(v.device, {})
    for feat in used:
        if not caps.supports(feat):
            why = caps.lacks.get(feat)
            no(
                _field_of(feat),
                f"engine {caps.name!r} does not support {_describe(feat)}" + (f": {why}" if why else ""),
            )
        elif feat in limits:
            no(_field_of(feat), f"engine {caps.name!r} cannot run {_describe(feat)} on {v.device}: {limits[feat]}")
    for combo, why in caps.combos:
        if combo <= set(used):
            names = " with ".join(_describe(f) for f in sorted(combo))
            no(_field_of(sorted(combo)[0]), f"engine {caps.name!r} cannot combine {names}: {why}")
    if v.pp_schedule not in PP_SCHEDULES:
        no("pp_schedule", f"pipeline schedule must be one of {', '.join(PP_SCHEDULES)}; got {v.pp_schedule!r}")
    elif v.pp > 1 and v.pp_schedule not in caps.pp_schedules:
        no(
            "pp_schedule",
            f"engine {caps.name!r} has no {v.pp_schedule!r} pipeline schedule (it runs "
            f"{', '.join(sorted(caps.pp_schedules))})",
        )
    if v.model.num_experts and caps.moe_families is not None and v.model.family not in caps.moe_families:
        no(
            "model",
            f"engine {caps.name!r} builds MoE models (num_experts > 0) of the "
            f"{', '.join(sorted(caps.moe_families))} family only (gated SiLU experts, no biases); "
            f"{v.model.name} is a {v.model.family!r} MoE",
        )
    if v.tp > 1 and "sequence_parallel" in caps.parallel and v.seq_len % v.tp:
        no(
            "seq_len",
            f"engine {caps.name!r} runs tp with sequence parallelism: sequence length {v.seq_len} "
            f"must be divisible by tp {v.tp}",
        )
    if v.pp_virtual > 1 and "pp_virtual" in caps.parallel and v.pp_schedule == "gpipe":
        no("pp_schedule", f"engine {caps.name!r} runs virtual pipeline stages with interleaved 1F1B only (not gpipe)")
    if v.cp > 1 and "cp" in caps.parallel and v.seq_len % (v.cp * caps.cp_chunks_per_rank):
        no(
            "seq_len",
            f"engine {caps.name!r} splits the sequence into {v.cp * caps.cp_chunks_per_rank} chunks (2 per "
            f"context-parallel rank, load-balanced causal): sequence length {v.seq_len} does not divide",
        )
    if v.tp > 1 and caps.vocab_parallel and padded_vocab(v.model.vocab_size) % v.tp:
        no(
            "tp",
            f"engine {caps.name!r} splits the vocabulary ({v.model.vocab_size}, padded to "
            f"{padded_vocab(v.model.vocab_size)}) over tp: tensor parallel size {v.tp} does not divide it",
        )
    if (
        caps.min_microbatches_1f1b
        and v.pp > 1
        and v.pp_schedule == "1f1b"
        and v.global_batch % (v.micro_batch * v.dp) == 0
        and v.microbatches < v.pp
    ):
        no(
            "micro_batch",
            f"engine {caps.name!r}'s 1F1B schedule needs at least pp = {v.pp} micro batches per step, got "
            f"{v.microbatches} (global_batch / (micro_batch*dp))",
        )
    return out


def refusals(view: CellView) -> list[Refusal]:
    """Every reason the cell cannot run (empty: it runs). Layout first, then cluster, then engine."""
    bad = _counts(view)
    if bad:
        return bad  # the divisibility rules below need positive counts
    return _layout(view) + _cluster(view) + _engine(view)


def runnable(view: CellView) -> bool:
    return not refusals(view)


# -- the job's side ---------------------------------------------------------------------------


def spec_view(cell: CellSpec, device_type: str | None = None) -> CellView:
    """The view of a job's parsed cell; ``device_type`` (``torch.device.type``) defaults to its gpu_type's."""
    p, o = cell.parallel, cell.opt
    gpn = cell.extra.get("gpus_per_node")
    return CellView(
        engine=cell.engine,
        device=device_type or device_of(cell.gpu_type),
        model=cell.model,
        tp=p.tp,
        pp=p.pp,
        pp_virtual=p.pp_virtual,
        dp=p.dp,
        cp=p.cp,
        ep=p.ep,
        fsdp=p.fsdp,
        recompute=o.recompute_granularity if o.recompute else "none",
        recompute_layers=o.recompute_layers,
        offload_alpha=o.offload_alpha,
        zero=o.zero,
        cpu_offload=o.cpu_offload,
        interconnect=o.interconnect,
        overlap=o.overlap,
        compile=o.compile,
        pp_partition=p.pp_partition,
        pp_schedule=o.pp_schedule,
        profile_mode=o.profile_mode,
        frequency_plan=bool(((cell.extra.get("gpu_control") or {}).get("request") or {}).get("frequency_plan")),
        dataset=cell.dataset.kind,
        precision=cell.precision,
        micro_batch=cell.micro_batch,
        global_batch=cell.global_batch,
        seq_len=cell.seq_len,
        world_size=cell.world_size,
        gpus_per_node=gpn if isinstance(gpn, int) and not isinstance(gpn, bool) and gpn >= 1 else None,
    )


def job_refusals(cell: CellSpec, device_type: str) -> list[str]:
    """Why the job cannot run ``cell`` on a ``device_type`` device (``"cpu"``/``"cuda"``); empty if it can.

    Each entry reads ``field: reason``. The engines call it as their last guard.
    """
    return [str(r) for r in refusals(spec_view(cell, device_type))]


# -- what a runnable cell will run with ----------------------------------------------------------


def engine_settings(view: CellView, transformer_engine: bool = False) -> dict[str, str]:
    """The settings the cell's engine will run it with, in words (for ``plan`` and the docs).

    The same decisions the engines make when they build the cell (``describe()`` in each
    engine's provenance records what was actually used; a test compares the two).
    ``transformer_engine``: whether Transformer Engine imports on the nodes (megatron's layer
    spec and TP communication overlap depend on it).
    """
    v = view
    if v.engine == "megatron":
        return _megatron_settings(v, transformer_engine)
    if v.engine == "torch":
        return _torch_settings(v)
    if v.engine == "nemo":
        out = _megatron_settings(v, transformer_engine)
        out["engine"] = "NeMo 2.7.3 (nemo.collections.llm GPTModel, MegatronStrategy), megatron-core 0.16.1"
        out["data"] = "synthetic (NeMo MockDataModule)"
        return out
    raise ValueError(f"unknown engine {v.engine!r}")


def _megatron_settings(v: CellView, te: bool) -> dict[str, str]:
    bf16 = v.precision == "bf16"
    out = {
        "layer spec": "Transformer Engine" if te and v.device == "cuda" else "megatron-core local, SDPA core attention",
        "tp": f"{v.tp}, sequence parallel" if v.tp > 1 else "1",
    }
    if v.pp > 1:
        out["pp"] = (
            f"{v.pp}, interleaved 1F1B with {v.pp_virtual} virtual stages (overlapped P2P)"
            if v.pp_virtual > 1
            else f"{v.pp}, 1F1B (megatron-core schedule)"
        )
    else:
        out["pp"] = "1"
    out["micro batches/step"] = str(v.microbatches)
    if v.fsdp:
        out["dp"] = f"{v.dp}, torch FSDP2 over megatron's dp group (reduce-scatter per micro batch)"
        out["optimizer"] = "megatron FP32Optimizer on the FSDP2 shards, AdamW, clip 1.0"
        out["weights"] = "fp32, bf16 compute (FSDP2 mixed precision)" if bf16 else "fp32"
    else:
        sync = (
            "no reduction"
            if v.dp == 1
            else "reduce-scatter " + ("overlapped with backward" if v.overlap else "after backward")
        )
        out["dp"] = f"{v.dp}, Megatron DDP ({sync})"
        out["optimizer"] = "megatron distributed optimizer (fp32 main params), AdamW, clip 1.0"
        if v.overlap and v.dp > 1:
            out["optimizer"] += ", param all-gather overlapped with forward"
        out["weights"] = "bf16, fp32 main params and grads" if bf16 else "fp32"
    if v.ep > 1 or v.model.num_experts:
        out["moe"] = (
            f"{v.model.num_experts} experts, top-{v.model.top_k}, ep {v.ep}, all-to-all dispatcher, aux loss 0.01"
        )
    out["recompute"] = {
        "none": "none",
        "full": "full (uniform, 1 layer per group)",
        "selective": "selective (core attention)",
        "kwai": "kwai (refused)",
    }[v.recompute]
    if v.recompute == "full" and v.recompute_layers:
        out["recompute"] = f"full (block, first {v.recompute_layers} layers per stage)"
    if v.interconnect == "pcie":
        out["interconnect"] = "pcie (NCCL P2P and NVLS off)"
    overlap = []
    if v.overlap and not v.fsdp and v.dp > 1:
        overlap.append("grad reduce + param gather")
    if v.overlap and v.tp > 1:
        overlap.append("TP comm (userbuffers)" if te and v.device == "cuda" else "TP comm: needs Transformer Engine")
    out["overlap (cc)"] = ", ".join(overlap) if overlap else ("requested, nothing to overlap" if v.overlap else "off")
    return out


def torch_recompute_words(mode: str, layers: int = 0) -> str:
    """How the torch engine recomputes (``describe()["recompute"]`` says the same)."""
    words = {
        "none": "none",
        "full": "full (every block)",
        "selective": "selective (SDPA core)",
        "kwai": "kwai (norms + MLP activation)",
    }[mode]
    if mode != "none" and layers:
        words = words.replace("every block", "block") + f", first {layers} blocks per stage"
    return words


def _torch_settings(v: CellView) -> dict[str, str]:
    out = {"tp": str(v.tp), "pp": f"{v.pp}, {v.pp_schedule}" if v.pp > 1 else "1"}
    if v.pp_virtual > 1:
        out["pp"] = f"{v.pp}, interleaved 1F1B with {v.pp_virtual} virtual stages"
    if v.cp > 1:
        out["cp"] = f"{v.cp}, ring attention (load-balanced causal split)"
    plain_ddp = v.dp > 1 and v.tp == 1 and v.pp == 1 and not v.fsdp
    if v.fsdp:
        out["dp"] = f"{v.dp}, FSDP2 fully_shard per block"
    elif plain_ddp and v.overlap:
        out["dp"] = f"{v.dp}, DistributedDataParallel (bucketed all-reduce overlapped with backward)"
    else:
        out["dp"] = f"{v.dp}, all-reduce after backward" if v.dp > 1 else "1"
    if v.zero == 1:
        out["dp"] = f"{v.dp}, DistributedDataParallel + ZeroRedundancyOptimizer (ZeRO-1)"
    elif v.zero in (2, 3):
        out["dp"] = f"{v.dp}, FSDP2 fully_shard per block (ZeRO-{v.zero}" + (
            ", reshard after forward)" if v.zero == 3 else ", parameters kept gathered)"
        )
    if v.cpu_offload:
        out["dp"] += ", CPUOffloadPolicy"
    out["recompute"] = torch_recompute_words(v.recompute, v.recompute_layers)
    if v.offload_alpha > 0:
        out["offload"] = f"alpha {v.offload_alpha:g} of block activations to pinned host memory"
    if v.interconnect == "pcie":
        out["interconnect"] = "pcie (NCCL P2P and NVLS off)"
    out["compile"] = "torch.compile per block" if v.compile else "off"
    out["overlap (cc)"] = ("DDP bucket overlap" if plain_ddp else "requested, a no-op here") if v.overlap else "off"
    return out

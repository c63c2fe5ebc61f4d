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

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

from charllm.modelcat import ModelShape

if TYPE_CHECKING:  # the job's parsed cell; imported for types only (no cycle at runtime)
    from charllm.train.cell import CellSpec

DEVICES = ("cpu", "cuda")
RECOMPUTE_MODES = ("none", "full", "selective")
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
        "overlap": "compute/communication overlap (overlap)",
        "distributed_optimizer": "the distributed optimizer",
        "compile": "torch.compile (compile)",
    }
)

# the cell field a feature is asked for by (the refusal's field)
_FIELD = {"recompute": "recompute", "family": "model"}


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
    parallel=frozenset({"tp", "pp", "dp", "fsdp"}),
    families=frozenset({"gpt3", "llama3", "mixtral"}),
    recompute=frozenset({"none", "full"}),
    knobs=frozenset({"overlap", "compile"}),
    devices=frozenset({"cpu", "cuda"}),
    lacks=_frozen(
        {
            "cp": "context parallelism is not implemented in the torch engine",
            "ep": "the torch engine replicates experts across dp ranks: use ep = 1, or engine: megatron",
            "pp_virtual": "the torch engine's pipeline schedules (GPipe, 1F1B) have no virtual stages; "
            "use engine: megatron",
            "recompute:selective": "the torch engine recomputes whole blocks only (recompute: full); "
            "use engine: megatron",
        }
    ),
    min_microbatches_1f1b=True,
    notes=_frozen(
        {
            "tp": "parallelize_module per block (Megatron's colwise/rowwise split), no sequence parallelism",
            "pp": "torch.distributed.pipelining, GPipe or 1F1B (opt.pp_schedule)",
            "dp": "DistributedDataParallel with overlap; otherwise an all-reduce after backward",
            "fsdp": "FSDP2 fully_shard per block over dp (2-D with tp)",
            "overlap": "DDP's bucketed all-reduce overlaps backward (plain DDP: dp > 1, tp = pp = 1, no fsdp); "
            "a no-op elsewhere",
            "mixtral": "MoE experts replicated on every dp rank (ep = 1)",
        }
    ),
)

MEGATRON = EngineCaps(
    name="megatron",
    parallel=frozenset({"tp", "sequence_parallel", "pp", "pp_virtual", "dp", "ep", "fsdp"}),
    families=frozenset({"gpt3", "llama3", "mixtral"}),
    recompute=frozenset({"none", "full", "selective"}),
    knobs=frozenset({"overlap", "distributed_optimizer"}),
    devices=frozenset({"cpu", "cuda"}),
    lacks=_frozen(
        {
            "cp": "context parallelism is not wired to megatron-core's attention in this engine",
            "compile": "torch.compile of Megatron's layers is not wired; use engine: torch",
        }
    ),
    device_limits=MappingProxyType({"cpu": MEGATRON_CPU_LIMITS}),
    combos=(
        (
            frozenset({"fsdp", "ep"}),
            "FSDP shards over the whole data-parallel group, which would average each rank's own experts "
            "(use ep = 1 with fsdp)",
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
            "recompute": "full: uniform, 1 layer per group; selective: the core attention (recompute_modules core_attn)",
            "overlap": "overlap_grad_reduce + overlap_param_gather in Megatron's DDP; tp_comm_overlap where "
            "Transformer Engine imports",
        }
    ),
)

ENGINES: Mapping[str, EngineCaps] = MappingProxyType({"torch": TORCH, "megatron": MEGATRON})


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
    recompute: str = "none"  # none | full | selective
    overlap: bool = False
    compile: bool = False
    pp_schedule: str = "1f1b"
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
        if self.overlap:
            out.append("overlap")
        if self.compile:
            out.append("compile")
        return out


def device_of(gpu_type: str) -> str:
    """The device kind a cell's ranks drive: ``cpu`` for ``gpu_type: cpu``, else ``cuda``."""
    return "cpu" if gpu_type == "cpu" else "cuda"


def recompute_mode(value: object) -> str:
    """``true``/``false``/``"none"``/``"full"``/``"selective"`` as one of :data:`RECOMPUTE_MODES`."""
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
    # pipeline stages hold equal numbers of layers
    stages = v.pp * v.pp_virtual
    if v.pp_virtual > 1 and v.pp == 1:
        no("pp_virtual", f"virtual pipeline stages (pp_virtual {v.pp_virtual}) need pipeline parallelism (pp > 1)")
    if m.n_layers % stages:
        if v.pp_virtual == 1:
            no("pp", f"pipeline parallel size {v.pp} does not divide {m.name}'s {m.n_layers} layers")
        else:
            no(
                "pp_virtual",
                f"pp*pp_virtual = {v.pp}*{v.pp_virtual} = {stages} does not divide {m.name}'s {m.n_layers} layers",
            )
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
        overlap=o.overlap,
        compile=o.compile,
        pp_schedule=o.pp_schedule,
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
    }[v.recompute]
    overlap = []
    if v.overlap and not v.fsdp and v.dp > 1:
        overlap.append("grad reduce + param gather")
    if v.overlap and v.tp > 1:
        overlap.append("TP comm (userbuffers)" if te and v.device == "cuda" else "TP comm: needs Transformer Engine")
    out["overlap (cc)"] = ", ".join(overlap) if overlap else ("requested, nothing to overlap" if v.overlap else "off")
    return out


def _torch_settings(v: CellView) -> dict[str, str]:
    out = {"tp": str(v.tp), "pp": f"{v.pp}, {v.pp_schedule}" if v.pp > 1 else "1"}
    plain_ddp = v.dp > 1 and v.tp == 1 and v.pp == 1 and not v.fsdp
    if v.fsdp:
        out["dp"] = f"{v.dp}, FSDP2 fully_shard per block"
    elif plain_ddp and v.overlap:
        out["dp"] = f"{v.dp}, DistributedDataParallel (bucketed all-reduce overlapped with backward)"
    else:
        out["dp"] = f"{v.dp}, all-reduce after backward" if v.dp > 1 else "1"
    out["recompute"] = "full (every block)" if v.recompute == "full" else "none"
    out["compile"] = "torch.compile per block" if v.compile else "off"
    out["overlap (cc)"] = ("DDP bucket overlap" if plain_ddp else "requested, a no-op here") if v.overlap else "off"
    return out

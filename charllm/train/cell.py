"""A resolved sweep cell as the training job reads it from ``CELL.json``.

Plain dataclasses (no pydantic): the job must import on GPU nodes that carry only torch,
pandas, pyarrow and nvidia-ml-py. :func:`CellSpec.from_dict` checks every key and value
and raises :class:`CellConfigError` naming the offending key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from charllm import capabilities
from charllm.modelcat import ModelShape
from charllm.telemetry.zeus_window import ZEUS_MODES
from charllm.train.errors import CellConfigError, EngineUnavailableError

ENGINES = ("torch", "megatron", "nemo")
PRECISIONS = ("bf16", "fp32")
GPU_TYPES = ("cpu", "h100", "h200", "a100")  # a100: the campaign models allow it
DATASET_KINDS = ("synthetic", "indexed")
ATTN_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


@dataclass(frozen=True)
class ParallelSpec:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    fsdp: bool = False
    # virtual pipeline stages per pipeline rank (interleaved 1F1B); 1 = plain 1F1B
    pp_virtual: int = 1
    # stage start layers: "" (uniform) or "custom:0,8,14,20,26" (charllm.capabilities.stage_starts)
    pp_partition: str = ""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp


@dataclass(frozen=True)
class OptSpec:
    """Optimisations of the cell (PPT's code ``abcde``: a = overlap, b = recompute) and knobs."""

    recompute: bool = False
    # with recompute: "full" (whole layers), "selective" (the attention core only) or "kwai"
    # (norms + the MLP activation, Megatron-Kwai's balanced mode)
    recompute_granularity: str = "full"
    recompute_layers: int = 0  # with recompute: the first N layers of each stage; 0 = all
    offload_alpha: float = 0.0  # fraction of saved block activations offloaded to pinned host memory
    zero: int = 0  # 0 | 1 (DDP + sharded optimizer state) | 2 | 3 (FSDP2)
    cpu_offload: bool = False  # with zero 2/3 or fsdp: FSDP2 CPUOffloadPolicy
    interconnect: str = "native"  # native | pcie (NCCL kept off P2P and NVLS)
    overlap: bool = False
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode for the blocks, e.g. max-autotune-no-cudagraphs
    compile_loss: bool = True  # with compile: also compile the float32 cross entropy
    # scaled_dot_product_attention backend on GPU: auto (torch's choice) | flash | cudnn |
    # efficient | math. A named one is the only one enabled: a shape it cannot run fails loudly.
    attn_backend: str = "auto"
    # bf16 runs on one GPU (no tp/pp/dp): "auto"/"on" hold bf16 compute copies of the weights
    # through FSDP2 on a one-rank mesh (fp32 master weights and gradient accumulation, one cast
    # per optimizer step instead of autocast's per micro batch); "off" keeps plain autocast.
    # On an H200 at its 700 W cap: MFU 0.598-0.601 against 0.593 (docs/gpu/README.md).
    bf16_params: str = "auto"
    profile: bool = False
    profile_steps: int = 3
    # none | layers | instructions (charllm.energy.recorder: every forward/backward of every micro batch)
    profile_mode: str = "none"
    # fixed: measure the cell's steps; adaptive: stop once the median step time is known to 1 %
    # and 10 s of energy are integrated (charllm.train.window), at most the cell's steps
    window: str = "fixed"
    # DistributedDataParallel bucket_cap_mb (overlapped DDP only). 200, not torch's 25: on 2 x H200
    # (GPT-3 1.3B) weak scaling was 0.983 with 200 MB buckets and 0.951 with 25 (docs/gpu/README.md)
    ddp_bucket_mb: int = 200
    # FSDP2: reshard parameters after forward (ZeRO-3). False keeps them gathered through the
    # step's micro batches: one all-gather and one reduce-scatter per step (ZeRO-2-like).
    fsdp_reshard_after_forward: bool = True
    lr: float = 3e-4
    weight_decay: float = 0.1
    pp_schedule: str = "1f1b"  # gpipe | 1f1b


@dataclass(frozen=True)
class WarmupSpec:
    """When the warm-up ends: step time and GPU temperature both steady, or ``max_steps``."""

    min_steps: int = 2
    max_steps: int = 20
    step_time_cv: float = 0.05
    temp_slope_c_per_s: float = 0.05
    cv_window_steps: int = 5
    temp_window_s: float = 10.0


@dataclass(frozen=True)
class DatasetSpec:
    kind: str = "synthetic"
    path: str | None = None
    tokenizer: str = "bytes"
    key: str | None = None  # indexed: the prepared dataset is <path>/<key> (or $CHARLLM_DATASET_DIR)


@dataclass(frozen=True)
class CellSpec:
    campaign: str
    cell_id: str
    name: str
    repeat: int
    seed: int
    model: ModelShape
    parallel: ParallelSpec
    micro_batch: int
    global_batch: int
    seq_len: int
    opt: OptSpec
    steps: int
    warmup: WarmupSpec
    engine: str
    precision: str
    dataset: DatasetSpec
    telemetry_hz: float
    gpu_type: str
    world_size: int
    extra: dict[str, Any] = field(default_factory=dict)
    telemetry_zeus: str = "auto"  # a ZeusMonitor window over the measured steps: auto | on | off

    @property
    def grad_accum(self) -> int:
        """Micro batches per optimizer step on each data-parallel rank."""
        return self.global_batch // (self.micro_batch * self.parallel.dp)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["telemetry"] = {"hz": d.pop("telemetry_hz"), "zeus": d.pop("telemetry_zeus")}
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> CellSpec:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError as err:
            raise CellConfigError(f"cell file {path} does not exist") from err
        except json.JSONDecodeError as err:
            raise CellConfigError(f"cell file {path} is not valid JSON: {err}") from err
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CellSpec:
        """Validate ``raw`` (the resolved cell) and build the spec."""
        if not isinstance(raw, Mapping):
            raise CellConfigError(f"cell must be a JSON object, got {type(raw).__name__}")
        required = (
            "cell_id", "seed", "model", "parallel", "micro_batch", "global_batch",
            "seq_len", "steps", "precision", "gpu_type",
        )  # fmt: skip
        missing = [k for k in required if k not in raw]
        if missing:
            raise CellConfigError(f"cell is missing required keys: {', '.join(missing)}")

        model = _model(raw["model"])
        parallel = _sub(ParallelSpec, raw["parallel"], "parallel")
        opt = _sub(OptSpec, raw.get("opt", {}), "opt")
        warmup = _sub(WarmupSpec, raw.get("warmup", {}), "warmup")
        dataset = _sub(DatasetSpec, raw.get("dataset", {}), "dataset")
        telemetry = raw.get("telemetry", {}) or {}
        if not isinstance(telemetry, Mapping):
            raise CellConfigError("telemetry must be an object like {'hz': 20}")
        known = {f.name for f in fields(cls)} | {"telemetry"}
        spec = cls(
            campaign=_typed(raw, "campaign", str, ""),
            cell_id=_typed(raw, "cell_id", str),
            name=_typed(raw, "name", str, ""),
            repeat=_typed(raw, "repeat", int, 0),
            seed=_typed(raw, "seed", int),
            model=model,
            parallel=parallel,
            micro_batch=_typed(raw, "micro_batch", int),
            global_batch=_typed(raw, "global_batch", int),
            seq_len=_typed(raw, "seq_len", int),
            opt=opt,
            steps=_typed(raw, "steps", int),
            warmup=warmup,
            engine=_typed(raw, "engine", str, "torch"),
            precision=_typed(raw, "precision", str),
            dataset=dataset,
            telemetry_hz=float(_typed(telemetry, "hz", (int, float), 20.0)),
            telemetry_zeus=_typed(telemetry, "zeus", str, "auto"),
            gpu_type=_typed(raw, "gpu_type", str),
            world_size=_typed(raw, "world_size", int, parallel.world_size),
            extra={k: v for k, v in raw.items() if k not in known},
        )
        spec.check()
        return spec

    def view(self, device_type: str | None = None) -> capabilities.CellView:
        """The cell as :mod:`charllm.capabilities` judges it (device: ``torch.device.type``, else from gpu_type)."""
        return capabilities.spec_view(self, device_type)

    def check_engine(self, device_type: str) -> None:
        """Raise :class:`EngineUnavailableError` if the cell's engine cannot run it on ``device_type``.

        The same table as the campaign validator (:mod:`charllm.capabilities`); the job calls
        it before it builds any engine.
        """
        refused = capabilities.refusals(self.view(device_type))
        layout = [str(r) for r in refused if r.kind != "engine"]
        if layout:
            raise CellConfigError("; ".join(layout))
        engine = [str(r) for r in refused if r.kind == "engine"]
        if engine:
            raise EngineUnavailableError(
                f"cell {self.name or self.cell_id} cannot run on {device_type}: " + "; ".join(engine)
            )

    def check(self) -> None:
        """Raise :class:`CellConfigError` for values no engine can run (:mod:`charllm.capabilities` layout rules)."""
        _one_of("engine", self.engine, ENGINES)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("gpu_type", self.gpu_type, GPU_TYPES)
        _one_of("dataset.kind", self.dataset.kind, DATASET_KINDS)
        _one_of("opt.pp_schedule", self.opt.pp_schedule, ("gpipe", "1f1b"))
        _one_of("opt.attn_backend", self.opt.attn_backend, ATTN_BACKENDS)
        _one_of("telemetry.zeus", self.telemetry_zeus, ZEUS_MODES)
        _one_of("opt.bf16_params", self.opt.bf16_params, ("auto", "on", "off"))
        _one_of(
            "opt.compile_mode",
            self.opt.compile_mode,
            ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        )
        _one_of("opt.recompute_granularity", self.opt.recompute_granularity, ("full", "selective", "kwai"))
        _one_of("opt.interconnect", self.opt.interconnect, capabilities.INTERCONNECTS)
        _one_of("opt.profile_mode", self.opt.profile_mode, ("none", "layers", "instructions"))
        _one_of("opt.window", self.opt.window, ("fixed", "adaptive"))
        if self.steps < 1:
            raise CellConfigError(f"steps must be >= 1, got {self.steps}")
        layout = [r for r in capabilities.refusals(self.view()) if r.kind != "engine"]
        if layout:
            raise CellConfigError("; ".join(str(r) for r in layout))
        w = self.warmup
        if w.min_steps < 0 or w.max_steps < w.min_steps:
            raise CellConfigError(f"warmup needs 0 <= min_steps <= max_steps, got {w.min_steps}, {w.max_steps}")
        if w.cv_window_steps < 2:
            raise CellConfigError("warmup.cv_window_steps must be >= 2")
        if not self.telemetry_hz > 0:
            raise CellConfigError(f"telemetry.hz must be > 0, got {self.telemetry_hz}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CellConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _typed(raw: Mapping[str, Any], key: str, typ: Any, default: Any = ...) -> Any:
    if key not in raw or (raw[key] is None and default is not ...):
        if default is ...:
            raise CellConfigError(f"missing key {key!r}")
        return default
    value = raw[key]
    # bool is an int in Python; a count given as true/false is a mistake.
    if isinstance(value, bool) and typ is not bool:
        raise CellConfigError(f"{key} must be {_tname(typ)}, got a boolean")
    if typ is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, typ):
        raise CellConfigError(f"{key} must be {_tname(typ)}, got {type(value).__name__} {value!r}")
    return value


def _tname(typ: Any) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return str(typ.__name__)


def _sub(cls: Any, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise CellConfigError(f"{where} must be an object, got {type(raw).__name__}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        typ = {"int": int, "bool": bool, "float": float, "str": str, "str | None": (str, type(None))}[str(f.type)]
        try:
            kwargs[f.name] = _typed(raw, f.name, typ, None if typ == (str, type(None)) else ...)
        except CellConfigError as err:
            raise CellConfigError(f"{where}.{err}") from None
    return cls(**kwargs)


def _model(raw: Any) -> ModelShape:
    if not isinstance(raw, Mapping):
        raise CellConfigError(f"model must be an object (ModelShape.as_dict()), got {type(raw).__name__}")
    need = ("name", "family", "n_layers", "hidden", "n_heads", "ffn_hidden", "vocab_size")
    missing = [k for k in need if k not in raw]
    if missing:
        raise CellConfigError(f"model is missing keys: {', '.join(missing)}")
    kwargs: dict[str, Any] = {}
    for f in fields(ModelShape):
        if f.name in raw:
            typ = str if f.name in ("name", "family") else int
            kwargs[f.name] = _typed(raw, f.name, typ)
    shape = ModelShape(**kwargs)
    for k in ("n_layers", "hidden", "n_heads", "ffn_hidden", "vocab_size", "max_seq_len"):
        if getattr(shape, k) < 1:
            raise CellConfigError(f"model.{k} must be >= 1, got {getattr(shape, k)}")
    return shape

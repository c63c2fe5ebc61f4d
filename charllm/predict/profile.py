"""Per-layer profiles: what one (GPU type, tp, micro batch) costs, layer by layer.

A profile is what the planners (:mod:`charllm.predict.timing`, :mod:`charllm.predict.memory`,
:mod:`charllm.predict.search`) read instead of running a cell. It is written by a cell with
``profile: layers`` (``charllm.train.layer_profile``, CUDA events through module hooks) or
synthesised from the calibrated roofline (:func:`charllm.predict.timing.synth_profile`) for a
GPU type or tp nobody profiled yet; ``source`` says which.

The layout follows the idea of Metis's profiles (one file per device type, tp degree and
batch size, per-layer lists with the embedding first and the head last); the code and the
field names are our own.

JSON (``schema: "charllm.layer-profile/1"``), one file per key, named
``{gpu_type}_tp{tp}_mb{micro_batch}.json`` (:func:`profile_filename`)::

    {
      "schema": "charllm.layer-profile/1",
      "gpu_type": "h200",            # cpu | h100 | h200 | a100
      "tp": 1,                       # tensor-parallel degree the layers were measured at
      "micro_batch": 8,              # sequences per micro batch
      "seq_len": 2048,
      "precision": "bf16",
      "recompute": "none",           # none | full | selective: what the measured bwd includes
      "compile": true,
      "engine": "torch",
      "model": {...},                # charllm.modelcat.ModelShape.as_dict() of the measured model
      "source": "measured",          # measured | roofline
      "layers": [                    # index 0: embedding; 1..L: blocks; last: head
        {"name": "embedding", "kind": "embedding",
         "fwd_s": 1.2e-4,            # forward time of this layer, one micro batch, seconds
         "bwd_s": 3.0e-4,            # backward time (with recompute: the replayed forward too)
         "saved_activation_bytes": 33554432,  # bytes this layer's forward keeps until backward
         "params": 103022592,        # parameter elements this rank holds for the layer (tp shard)
         "param_bytes": 412090368,   # of those: weights as held (fp32 master [+ bf16 copies])
         "grad_bytes": 412090368,    # gradient bytes
         "optimizer_bytes": 824180736},  # optimizer state bytes (AdamW: 2 fp32 moments)
        {"name": "block.0", "kind": "block", ...},
        ...,
        {"name": "head", "kind": "head", ...}   # final norm + output layer + loss
      ],
      "optimizer_step_s": 0.0123,    # one optimizer step over all layers of this rank
      "batch_time_s": 0.271,         # one micro batch, forward + backward, measured as a whole
      "step_overhead_s": 0.004,      # the step outside its micro batches and the optimizer (0 if unknown)
      "step_time_s": 1.101,          # one optimizer step of the profiled cell (all micro batches)
      "grad_accum": 4,               # micro batches per step in the profiled cell
      "max_memory_allocated_bytes": 62900057088,  # the profiled cell's peak (0 if unknown)
      "provenance": {...}            # free-form: cell id, device name, torch version, method
    }

Times are means over the profiled steps' micro batches (so they add up to the step). Bytes are per rank, as held
(``saved_activation_bytes`` of a compiled block is what inductor keeps, not a formula).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from charllm import modelcat
from charllm.errors import ConfigError
from charllm.modelcat import ModelShape

SCHEMA = "charllm.layer-profile/1"
LAYER_KINDS = ("embedding", "block", "head")
GPU_TYPES = ("cpu", "h100", "h200", "a100")
RECOMPUTE = ("none", "full", "selective")
SOURCES = ("measured", "roofline")
MAX_TP = 65_536
MAX_MICRO_BATCH = 65_536
MAX_LAYERS = 4096
MAX_TIME_S = 1e6  # one layer's forward longer than 11 days is an error in the file
MAX_BYTES = 1 << 50


def profile_filename(gpu_type: str, tp: int, micro_batch: int) -> str:
    """``{gpu_type}_tp{tp}_mb{micro_batch}.json``."""
    return f"{gpu_type}_tp{tp}_mb{micro_batch}.json"


@dataclass(frozen=True)
class LayerCost:
    """One layer of one rank, one micro batch."""

    name: str
    kind: str  # embedding | block | head
    fwd_s: float
    bwd_s: float
    saved_activation_bytes: int
    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int

    @property
    def time_s(self) -> float:
        """Forward plus backward."""
        return self.fwd_s + self.bwd_s

    @property
    def state_bytes(self) -> int:
        """Weights, gradients and optimizer state (no activations)."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


@dataclass(frozen=True)
class LayerProfile:
    """Per-layer costs of one (GPU type, tp, micro batch); see the module docstring for the JSON."""

    gpu_type: str
    tp: int
    micro_batch: int
    seq_len: int
    precision: str
    recompute: str
    compile: bool
    engine: str
    model: ModelShape
    layers: tuple[LayerCost, ...]
    optimizer_step_s: float
    batch_time_s: float
    step_overhead_s: float = 0.0
    step_time_s: float = 0.0
    grad_accum: int = 1
    max_memory_allocated_bytes: int = 0
    source: str = "measured"
    provenance: Mapping[str, Any] = field(default_factory=dict)

    # -- derived ---------------------------------------------------------------------------
    @property
    def key(self) -> tuple[str, int, int]:
        return (self.gpu_type, self.tp, self.micro_batch)

    @property
    def blocks(self) -> tuple[LayerCost, ...]:
        return tuple(layer for layer in self.layers if layer.kind == "block")

    @property
    def n_layers(self) -> int:
        """Transformer blocks (``len(layers) - 2``)."""
        return len(self.blocks)

    def layer_times_s(self) -> list[float]:
        """Forward + backward per entry of ``layers`` (embedding first, head last)."""
        return [layer.time_s for layer in self.layers]

    def layers_time_s(self) -> float:
        """Sum over layers of forward + backward: one micro batch through the whole model."""
        return math.fsum(self.layer_times_s())

    def profiled_step_s(self) -> float:
        """What the profile adds up to for the profiled cell's step: accum x layers + optimizer + overhead."""
        return self.grad_accum * self.layers_time_s() + self.optimizer_step_s + self.step_overhead_s

    def mean_block(self) -> LayerCost:
        """The blocks' mean costs (the planners scale this to other depths)."""
        bs = self.blocks
        if not bs:
            raise ValueError("profile has no blocks")
        n = len(bs)
        return LayerCost(
            name="block.mean",
            kind="block",
            fwd_s=math.fsum(b.fwd_s for b in bs) / n,
            bwd_s=math.fsum(b.bwd_s for b in bs) / n,
            saved_activation_bytes=round(sum(b.saved_activation_bytes for b in bs) / n),
            params=round(sum(b.params for b in bs) / n),
            param_bytes=round(sum(b.param_bytes for b in bs) / n),
            grad_bytes=round(sum(b.grad_bytes for b in bs) / n),
            optimizer_bytes=round(sum(b.optimizer_bytes for b in bs) / n),
        )

    def with_layers(self, n_blocks: int) -> LayerProfile:
        """The same profile for a model of ``n_blocks`` blocks (the mean block repeated).

        Profiles are taken on depth-cut proxies (``model.proxy_layers``); a block's costs do not
        depend on the depth, so the full model is the embedding, ``n_blocks`` mean blocks and the head.
        """
        if n_blocks < 1 or n_blocks > MAX_LAYERS:
            raise ValueError(f"n_blocks must be in 1..{MAX_LAYERS}, got {n_blocks}")
        mean = self.mean_block()
        emb = [layer for layer in self.layers if layer.kind == "embedding"]
        head = [layer for layer in self.layers if layer.kind == "head"]
        blocks = [replace(mean, name=f"block.{i}") for i in range(n_blocks)]
        base = self.model.name.rsplit("-L", 1)[0]
        try:
            full = modelcat.get(base).n_layers
        except KeyError:
            full = -1
        name = base if n_blocks == full else f"{base}-L{n_blocks}"
        return replace(self, layers=tuple(emb + blocks + head), model=replace(self.model, n_layers=n_blocks, name=name))

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "gpu_type": self.gpu_type,
            "tp": self.tp,
            "micro_batch": self.micro_batch,
            "seq_len": self.seq_len,
            "precision": self.precision,
            "recompute": self.recompute,
            "compile": self.compile,
            "engine": self.engine,
            "model": self.model.as_dict(),
            "source": self.source,
            "layers": [asdict(layer) for layer in self.layers],
            "optimizer_step_s": self.optimizer_step_s,
            "batch_time_s": self.batch_time_s,
            "step_overhead_s": self.step_overhead_s,
            "step_time_s": self.step_time_s,
            "grad_accum": self.grad_accum,
            "max_memory_allocated_bytes": self.max_memory_allocated_bytes,
            "provenance": dict(self.provenance),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    def write(self, directory: str | Path) -> Path:
        """Write ``directory/{gpu}_tp{tp}_mb{mb}.json`` (atomically) and return its path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / profile_filename(*self.key)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<profile>") -> LayerProfile:
        """Validate ``raw``; errors name ``source`` and the field."""
        return _parse(raw, source)

    @classmethod
    def read(cls, path: str | Path) -> LayerProfile:
        p = Path(path)
        try:
            raw = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(str(p), "-", "no such profile file") from None
        except (OSError, ValueError) as err:
            raise ConfigError(str(p), "-", f"not readable JSON: {err}") from None
        return _parse(raw, str(p))


class ProfileSet:
    """Profiles by (GPU type, tp, micro batch), e.g. every file of a folder."""

    def __init__(self, profiles: Iterable[LayerProfile] = ()) -> None:
        self._by_key: dict[tuple[str, int, int], LayerProfile] = {}
        for p in profiles:
            self.add(p)

    def add(self, profile: LayerProfile) -> None:
        self._by_key[profile.key] = profile

    def get(self, gpu_type: str, tp: int, micro_batch: int) -> LayerProfile | None:
        return self._by_key.get((gpu_type, tp, micro_batch))

    def keys(self) -> list[tuple[str, int, int]]:
        return sorted(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Any:
        return iter(self._by_key[k] for k in self.keys())

    @classmethod
    def load(cls, directory: str | Path) -> ProfileSet:
        """Every ``*_tp*_mb*.json`` under ``directory`` (not recursive)."""
        d = Path(directory)
        if not d.is_dir():
            raise ConfigError(str(d), "-", "profile folder does not exist")
        return cls(LayerProfile.read(p) for p in sorted(d.glob("*_tp*_mb*.json")))


# -- validation ------------------------------------------------------------------------------


def _need(raw: Mapping[str, Any], key: str, source: str, where: str) -> Any:
    if key not in raw:
        raise ConfigError(source, f"{where}{key}", "missing")
    return raw[key]


def _int(raw: Mapping[str, Any], key: str, source: str, lo: int, hi: int, where: str = "", default: Any = ...) -> int:
    if default is not ... and key not in raw:
        return int(default)
    v = _need(raw, key, source, where)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(source, f"{where}{key}", f"must be a whole number, got {v!r}")
    if not lo <= v <= hi:
        raise ConfigError(source, f"{where}{key}", f"must be in {lo}..{hi}, got {v}")
    return v


def _float(raw: Mapping[str, Any], key: str, source: str, where: str = "", default: Any = ...) -> float:
    if default is not ... and key not in raw:
        return float(default)
    v = _need(raw, key, source, where)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(source, f"{where}{key}", f"must be a number, got {v!r}")
    if not (math.isfinite(v) and 0.0 <= v <= MAX_TIME_S):
        raise ConfigError(source, f"{where}{key}", f"must be a finite time in 0..{MAX_TIME_S:g} s, got {v}")
    return float(v)


def _choice(raw: Mapping[str, Any], key: str, source: str, allowed: tuple[str, ...], default: Any = ...) -> str:
    if default is not ... and key not in raw:
        return str(default)
    v = _need(raw, key, source, "")
    if v not in allowed:
        raise ConfigError(source, key, f"must be one of {', '.join(allowed)}; got {v!r}")
    return str(v)


def _parse(raw: Any, source: str) -> LayerProfile:
    if not isinstance(raw, Mapping):
        raise ConfigError(source, "-", f"a profile is a JSON object, got {type(raw).__name__}")
    if raw.get("schema") != SCHEMA:
        raise ConfigError(source, "schema", f"must be {SCHEMA!r}, got {raw.get('schema')!r}")
    m = _need(raw, "model", source, "")
    if not isinstance(m, Mapping):
        raise ConfigError(source, "model", "must be an object (ModelShape fields)")
    try:
        shape = ModelShape(**{k: m[k] for k in m if k in ModelShape.__dataclass_fields__})
    except TypeError as err:
        raise ConfigError(source, "model", str(err)) from None
    for k in ("n_layers", "hidden", "n_heads", "ffn_hidden", "vocab_size"):
        v = getattr(shape, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(source, f"model.{k}", f"must be a positive whole number, got {v!r}")
    layers_raw = _need(raw, "layers", source, "")
    if not isinstance(layers_raw, list) or not 3 <= len(layers_raw) <= MAX_LAYERS + 2:
        raise ConfigError(source, "layers", f"must be a list of 3..{MAX_LAYERS + 2} layers (embedding, blocks, head)")
    layers = []
    for i, lr in enumerate(layers_raw):
        w = f"layers[{i}]."
        if not isinstance(lr, Mapping):
            raise ConfigError(source, f"layers[{i}]", "must be an object")
        kind = lr.get("kind")
        if kind not in LAYER_KINDS:
            raise ConfigError(source, f"{w}kind", f"must be one of {', '.join(LAYER_KINDS)}; got {kind!r}")
        name = lr.get("name", f"{kind}.{i}")
        if not isinstance(name, str) or len(name) > 200:
            raise ConfigError(source, f"{w}name", "must be a short string")
        layers.append(
            LayerCost(
                name=name,
                kind=kind,
                fwd_s=_float(lr, "fwd_s", source, w),
                bwd_s=_float(lr, "bwd_s", source, w),
                saved_activation_bytes=_int(lr, "saved_activation_bytes", source, 0, MAX_BYTES, w),
                params=_int(lr, "params", source, 0, MAX_BYTES, w),
                param_bytes=_int(lr, "param_bytes", source, 0, MAX_BYTES, w),
                grad_bytes=_int(lr, "grad_bytes", source, 0, MAX_BYTES, w),
                optimizer_bytes=_int(lr, "optimizer_bytes", source, 0, MAX_BYTES, w),
            )
        )
    if layers[0].kind != "embedding" or layers[-1].kind != "head" or any(x.kind != "block" for x in layers[1:-1]):
        raise ConfigError(source, "layers", "must be the embedding, then the blocks, then the head")
    prov = raw.get("provenance", {})
    if not isinstance(prov, Mapping):
        raise ConfigError(source, "provenance", "must be an object")
    comp = raw.get("compile", False)
    if not isinstance(comp, bool):
        raise ConfigError(source, "compile", f"must be true or false, got {comp!r}")
    return LayerProfile(
        gpu_type=_choice(raw, "gpu_type", source, GPU_TYPES),
        tp=_int(raw, "tp", source, 1, MAX_TP),
        micro_batch=_int(raw, "micro_batch", source, 1, MAX_MICRO_BATCH),
        seq_len=_int(raw, "seq_len", source, 1, 1 << 20),
        precision=_choice(raw, "precision", source, ("bf16", "fp32")),
        recompute=_choice(raw, "recompute", source, RECOMPUTE, "none"),
        compile=comp,
        engine=_choice(raw, "engine", source, ("torch", "megatron", "nemo"), "torch"),
        model=shape,
        layers=tuple(layers),
        optimizer_step_s=_float(raw, "optimizer_step_s", source),
        batch_time_s=_float(raw, "batch_time_s", source),
        step_overhead_s=_float(raw, "step_overhead_s", source, default=0.0),
        step_time_s=_float(raw, "step_time_s", source, default=0.0),
        grad_accum=_int(raw, "grad_accum", source, 1, 1 << 24, default=1),
        max_memory_allocated_bytes=_int(raw, "max_memory_allocated_bytes", source, 0, MAX_BYTES, default=0),
        source=_choice(raw, "source", source, SOURCES, "measured"),
        provenance=dict(prov),
    )

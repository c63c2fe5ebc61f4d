"""Campaign files: typed models, sweep expansion, per-cell checks and content hashes.

A campaign file (YAML) names a cluster profile, a model and sweep axes. Axes expand
by cartesian product, then ``include`` adds cells and ``exclude`` removes them. Each
resulting cell is checked for consistency and gets a content hash of its resolved
configuration, so the same cell in two campaigns is the same cell.

Every error is a :class:`~charllm.errors.ConfigError` naming the file and the field.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from charllm import modelcat
from charllm.errors import ConfigError
from charllm.shell import NAME_RE

HASH_LEN = 16


def _safe_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a safe name: use letters, digits, '_', '.', '-' "
            "(first a letter or digit, at most 128 characters)"
        )
    return value


SafeName = Annotated[str, AfterValidator(_safe_name)]

_TIME_RE = r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$|^\d+$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterProfile(_Strict):
    """Where cells run: GPU type, node shape and scheduler settings."""

    name: SafeName
    gpu_type: Literal["cpu", "h100", "h200", "a100"] = "cpu"
    gpus_per_node: int = Field(1, ge=1, le=64)
    nodes: int = Field(1, ge=1, le=4096)
    partition: SafeName | None = None
    account: SafeName | None = None
    qos: SafeName | None = None
    time_limit: str = Field("00:30:00", pattern=_TIME_RE)
    gres_per_node: str | None = Field(None, pattern=r"^[A-Za-z0-9_:]+$")
    cpus_per_task: int = Field(1, ge=1)
    mem: str | None = Field(None, pattern=r"^\d+[KMGT]?$")
    launcher: Literal["torchrun", "srun", "python"] = "torchrun"
    poll_interval_s: float = Field(10.0, gt=0, le=600)
    # local backend only: how many jobs may run at once (1 keeps measurements apart)
    local_slots: int = Field(1, ge=1, le=64)
    # the training environment on the cluster ({env_dir}/bin/python); relative to the login home
    env_dir: str | None = Field(None, pattern=r"^[A-Za-z0-9_./~\-]+$")
    # how the environment job installs it: packages (pinned by requirements.lock) and extra pip args
    train_packages: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-\[\],=<>!]+$")]] = Field(
        default_factory=lambda: ["torch", "numpy", "pandas", "pyarrow", "nvidia-ml-py", "pyyaml"]
    )
    pip_args: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:/=\-]+$")]] = Field(default_factory=list)
    bootstrap_python: str = Field("python3", pattern=r"^[A-Za-z0-9_./\-]+$")
    workdir: str | None = Field(None, pattern=r"^[A-Za-z0-9_./~\-]+$")
    # extra environment for every job (values are quoted when rendered)
    env: dict[SafeName, str] = Field(default_factory=dict)
    modules: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_./+\-]+$")]] = Field(default_factory=list)

    @field_validator("env")
    @classmethod
    def _env_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not k.replace("_", "").isalnum() or k[0].isdigit():
                raise ValueError(f"environment variable name {k!r} is not valid")
        return v

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes


class ModelRef(_Strict):
    name: str
    proxy_layers: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in modelcat.names():
            raise ValueError(f"unknown model {v!r}; known: {', '.join(modelcat.names())}")
        return v

    def shape(self) -> modelcat.ModelShape:
        return modelcat.get(self.name, self.proxy_layers)


class Warmup(_Strict):
    """When a cell counts as warm: at least min_steps, steady step time and temperature."""

    min_steps: int = Field(2, ge=0)
    max_steps: int = Field(20, ge=0)
    step_time_cv: float = Field(0.05, gt=0)
    temp_slope_c_per_s: float = Field(0.05, gt=0)


class Dataset(_Strict):
    kind: Literal["synthetic", "indexed"] = "synthetic"
    path: str | None = None


class ReferenceBand(_Strict):
    """An expected value with bounds, checked after aggregation."""

    metric: SafeName
    value: float
    lower: float
    upper: float
    unit: str = ""
    cells: str = "*"  # glob over cell names


AXES = (
    "model",
    "gpus",
    "tp",
    "pp",
    "dp",
    "cp",
    "ep",
    "fsdp",
    "micro_batch",
    "global_batch",
    "seq_len",
    "recompute",
    "overlap",
    "opt_code",
)

_OptCode = Annotated[str, Field(pattern=r"^[01]{5}$")]


class Sweep(_Strict):
    """Sweep axes: each a list of values. ``dp`` may be ``auto`` (gpus / (tp*pp*cp))."""

    model: list[ModelRef] | None = None
    gpus: list[Annotated[int, Field(ge=1)]] | None = None
    tp: list[Annotated[int, Field(ge=1)]] = [1]
    pp: list[Annotated[int, Field(ge=1)]] = [1]
    dp: list[Annotated[int, Field(ge=1)] | Literal["auto"]] = [1]
    cp: list[Annotated[int, Field(ge=1)]] = [1]
    ep: list[Annotated[int, Field(ge=1)]] = [1]
    fsdp: list[bool] = [False]
    micro_batch: list[Annotated[int, Field(ge=1)]] = [1]
    global_batch: list[Annotated[int, Field(ge=1)]] = [8]
    seq_len: list[Annotated[int, Field(ge=1)]] = [64]
    recompute: list[bool] = [False]
    overlap: list[bool] = [False]
    opt_code: list[_OptCode] | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": m} if isinstance(m, str) else m for m in v]
        return v

    @model_validator(mode="after")
    def _nonempty(self) -> Sweep:
        for axis in AXES:
            v = getattr(self, axis)
            if v is not None and len(v) == 0:
                raise ValueError(f"axis {axis!r} is empty")
        return self


class TimeLimitRule(_Strict):
    """A longer (or shorter) Slurm time limit for the cells whose name matches a glob."""

    cells: str = Field(min_length=1, max_length=256)
    time_limit: str = Field(pattern=_TIME_RE)


class Campaign(_Strict):
    """A campaign file, validated."""

    name: SafeName
    description: str = ""
    cluster: SafeName | ClusterProfile
    model: ModelRef
    engine: Literal["torch", "megatron"] = "torch"
    precision: Literal["bf16", "fp32"] = "bf16"
    backend: Literal["local", "slurm"] = "local"
    connection_id: SafeName | None = None
    schedule: str | None = None
    steps: int = Field(10, ge=1)
    repeats: int = Field(1, ge=1, le=100)
    warmup: Warmup = Warmup()
    telemetry_hz: float = Field(20.0, gt=0, le=1000)
    profile_kernels: bool = False
    compile: bool = False
    learning_rate: float = Field(3e-4, gt=0, le=1)
    seed: int = 1234
    dataset: Dataset = Dataset()
    sweep: Sweep = Sweep()
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    references: list[ReferenceBand] = Field(default_factory=list)
    # per-cell job time limits, first match wins; other cells get the cluster profile's
    time_limits: list[TimeLimitRule] = Field(default_factory=list)
    tags: list[SafeName] = Field(default_factory=list)

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None or v.startswith("@"):
            return v
        if len(v.split()) != 5 or any(c in v for c in ";|&$`\n"):
            raise ValueError(f"{v!r} is not a five-field cron expression")
        return v

    @field_validator("include", "exclude")
    @classmethod
    def _axes_known(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, entry in enumerate(v):
            unknown = set(entry) - set(AXES)
            if unknown:
                raise ValueError(f"entry {i}: unknown axis {sorted(unknown)}; axes are {', '.join(AXES)}")
        return v


class ParallelLayout(_Strict):
    tp: int
    pp: int
    dp: int
    cp: int
    ep: int
    fsdp: bool


class Cell(_Strict):
    """One resolved sweep cell. ``cell_id`` is the content hash of everything measured."""

    campaign: str
    cell_id: str
    name: str
    model: dict[str, Any]
    parallel: ParallelLayout
    micro_batch: int
    global_batch: int
    seq_len: int
    opt: dict[str, bool | float]
    opt_code: str
    steps: int
    warmup: Warmup
    engine: str
    precision: str
    dataset: Dataset
    telemetry: dict[str, float]
    gpu_type: str
    gpus_per_node: int
    world_size: int
    nodes: int
    seed: int

    def job_config(self, repeat: int) -> dict[str, Any]:
        """The JSON handed to ``python -m charllm.train --cell``."""
        data = self.model_dump(mode="json")
        data["repeat"] = repeat
        return data

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.parallel.dp)


# -- hashing ----------------------------------------------------------------------------

_HASHED_EXCLUDE = {"campaign", "cell_id", "name"}


def cell_hash(resolved: dict[str, Any]) -> str:
    """Content hash over a resolved cell, independent of key order and campaign."""
    payload = {k: v for k, v in resolved.items() if k not in _HASHED_EXCLUDE}
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:HASH_LEN]


# -- loading ----------------------------------------------------------------------------


def _loc(err: Any) -> str:
    return ".".join(str(p) for p in err["loc"]) or "(top level)"


def _raise_validation(source: str, exc: ValidationError) -> None:
    first = exc.errors()[0]
    field = _loc(first)
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    extra = len(exc.errors()) - 1
    if extra:
        msg += f" (and {extra} more error{'s' if extra > 1 else ''})"
    raise ConfigError(source, field, msg) from exc


def read_yaml(path: Path) -> dict[str, Any]:
    src = str(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(src, "(file)", f"cannot read: {err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        raise ConfigError(src, where, f"YAML syntax error: {getattr(err, 'problem', err)}") from err
    if not isinstance(data, dict):
        raise ConfigError(src, "(top level)", "expected a mapping of fields")
    return data


def clusters_dir(campaign_path: Path) -> Path:
    """``include/clusters`` beside ``include/campaigns``."""
    return campaign_path.parent.parent / "clusters"


def load_cluster(name: str, search: Path, source: str) -> ClusterProfile:
    path = search / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in search.glob("*.yaml")) if search.is_dir() else []
        raise ConfigError(source, "cluster", f"no cluster profile {name!r} in {search} (known: {known})")
    data = read_yaml(path)
    try:
        return ClusterProfile.model_validate(data)
    except ValidationError as exc:
        _raise_validation(str(path), exc)
        raise  # unreachable


class LoadedCampaign:
    """A validated campaign with its cluster and expanded cells."""

    def __init__(self, campaign: Campaign, cluster: ClusterProfile, cells: list[Cell], source: str) -> None:
        self.campaign = campaign
        self.cluster = cluster
        self.cells = cells
        self.source = source

    @property
    def name(self) -> str:
        return self.campaign.name

    def cluster_for(self, cell: Cell) -> ClusterProfile:
        """The cluster profile a cell's job runs with: the first ``time_limits`` rule matching its name applies."""
        for rule in self.campaign.time_limits:
            if fnmatch.fnmatchcase(cell.name, rule.cells):
                return self.cluster.model_copy(update={"time_limit": rule.time_limit})
        return self.cluster

    def select(self, pattern: str | None) -> list[Cell]:
        """Cells whose name or id matches a glob (comma-separated globs allowed)."""
        if not pattern or pattern.strip() in ("", "*"):
            return list(self.cells)
        pats = [p.strip() for p in pattern.split(",") if p.strip()]
        return [c for c in self.cells if any(fnmatch.fnmatchcase(c.name, p) or c.cell_id.startswith(p) for p in pats)]


def load_campaign(path: str | Path, clusters: Path | None = None) -> LoadedCampaign:
    """Read, validate and expand a campaign file. Raises ConfigError naming file and field."""
    path = Path(path)
    src = str(path)
    data = read_yaml(path)
    try:
        camp = Campaign.model_validate(data)
    except ValidationError as exc:
        _raise_validation(src, exc)
        raise
    if isinstance(camp.cluster, ClusterProfile):
        cluster = camp.cluster
    else:
        cluster = load_cluster(camp.cluster, clusters or clusters_dir(path), src)
    cells = expand(camp, cluster, src)
    return LoadedCampaign(camp, cluster, cells, src)


# -- expansion --------------------------------------------------------------------------


def _model_ref(value: ModelRef | str | dict[str, Any], source: str, field: str) -> ModelRef:
    if isinstance(value, ModelRef):
        return value
    try:
        if isinstance(value, str):
            return ModelRef(name=value)
        return ModelRef.model_validate(value)
    except ValidationError as exc:
        raise ConfigError(source, field, exc.errors()[0]["msg"]) from exc


def _axis_values(camp: Campaign) -> dict[str, list[Any]]:
    sweep = camp.sweep
    axes: dict[str, list[Any]] = {}
    for axis in AXES:
        v = getattr(sweep, axis)
        if v is not None:
            axes[axis] = list(v)
    if "model" not in axes:
        axes["model"] = [camp.model]
    return axes


def _matches(point: dict[str, Any], pattern: dict[str, Any]) -> bool:
    for k, v in pattern.items():
        pv = point.get(k)
        if k == "model":
            pv = pv.name if isinstance(pv, ModelRef) else pv
            v = v["name"] if isinstance(v, dict) else v
        if pv != v:
            return False
    return True


def _point_name(p: dict[str, Any], shape: modelcat.ModelShape, code: str) -> str:
    par = p["parallel"]
    bits = [shape.name, f"tp{par['tp']}pp{par['pp']}dp{par['dp']}"]
    if par["cp"] > 1:
        bits[-1] += f"cp{par['cp']}"
    if par["ep"] > 1:
        bits[-1] += f"ep{par['ep']}"
    if par["fsdp"]:
        bits.append("fsdp")
    bits += [f"mb{p['micro_batch']}", f"gb{p['global_batch']}", f"s{p['seq_len']}", code]
    return "-".join(bits)


def resolve(camp: Campaign, cluster: ClusterProfile, point: dict[str, Any], source: str, where: str) -> Cell:
    """Turn one sweep point into a checked Cell."""

    def bad(field: str, msg: str) -> ConfigError:
        return ConfigError(source, f"{where}.{field}", msg)

    ref = _model_ref(point.get("model", camp.model), source, f"{where}.model")
    shape = ref.shape()
    tp, pp, cp, ep = (int(point.get(k, 1)) for k in ("tp", "pp", "cp", "ep"))
    dp_raw = point.get("dp", 1)
    gpus = point.get("gpus")
    if dp_raw == "auto":
        if gpus is None:
            raise bad("dp", "dp 'auto' needs a 'gpus' axis")
        if gpus % (tp * pp * cp):
            raise bad("dp", f"gpus={gpus} is not divisible by tp*pp*cp={tp * pp * cp}")
        dp = gpus // (tp * pp * cp)
    else:
        dp = int(dp_raw)
    world = tp * pp * dp * cp
    if gpus is not None and gpus != world:
        raise bad("gpus", f"world size mismatch: gpus={gpus} but tp*pp*dp*cp = {tp}*{pp}*{dp}*{cp} = {world}")
    code = point.get("opt_code")
    if code is not None:
        overlap, recompute = code[0] == "1", code[1] == "1"
    else:
        overlap, recompute = bool(point.get("overlap", False)), bool(point.get("recompute", False))
        code = f"{int(overlap)}{int(recompute)}000"
    mb, gb, seq = int(point.get("micro_batch", 1)), int(point.get("global_batch", 8)), int(point.get("seq_len", 64))
    fsdp = bool(point.get("fsdp", False))

    if shape.n_heads % tp:
        raise bad("tp", f"tensor parallel size {tp} does not divide {shape.name}'s {shape.n_heads} attention heads")
    if shape.kv_heads % tp and tp % shape.kv_heads:
        raise bad("tp", f"tensor parallel size {tp} and {shape.kv_heads} KV heads do not divide one another")
    if shape.n_layers % pp:
        raise bad("pp", f"pipeline parallel size {pp} does not divide {shape.name}'s {shape.n_layers} layers")
    if gb % (mb * dp):
        raise bad("global_batch", f"global batch {gb} is not divisible by micro_batch*dp = {mb}*{dp}")
    if seq % cp:
        raise bad("cp", f"context parallel size {cp} does not divide sequence length {seq}")
    if seq > shape.max_seq_len:
        raise bad("seq_len", f"{seq} exceeds {shape.name}'s maximum sequence length {shape.max_seq_len}")
    if ep > 1:
        if not shape.num_experts:
            raise bad("ep", f"expert parallel size {ep} on dense model {shape.name}")
        if shape.num_experts % ep:
            raise bad("ep", f"expert parallel size {ep} does not divide {shape.num_experts} experts")
        if (dp * cp) % ep:
            raise bad("ep", f"expert parallel size {ep} does not divide dp*cp = {dp * cp}")
    if world > cluster.total_gpus:
        raise bad("gpus", f"cell needs {world} GPUs, cluster {cluster.name} has {cluster.total_gpus}")
    if world > cluster.gpus_per_node and world % cluster.gpus_per_node:
        raise bad("gpus", f"world size {world} is not a whole number of {cluster.gpus_per_node}-GPU nodes")
    nodes = max(1, -(-world // cluster.gpus_per_node))

    resolved: dict[str, Any] = {
        "model": shape.as_dict(),
        "parallel": {"tp": tp, "pp": pp, "dp": dp, "cp": cp, "ep": ep, "fsdp": fsdp},
        "micro_batch": mb,
        "global_batch": gb,
        "seq_len": seq,
        "opt": {
            "recompute": recompute,
            "overlap": overlap,
            "compile": camp.compile,
            "profile": camp.profile_kernels,
            "lr": camp.learning_rate,
        },
        "opt_code": code,
        "steps": camp.steps,
        "warmup": camp.warmup.model_dump(),
        "engine": camp.engine,
        "precision": camp.precision,
        "dataset": camp.dataset.model_dump(),
        "telemetry": {"hz": camp.telemetry_hz},
        "gpu_type": cluster.gpu_type,
        "gpus_per_node": cluster.gpus_per_node,
        "world_size": world,
        "nodes": nodes,
        "seed": camp.seed,
    }
    cid = cell_hash(resolved)
    name = _point_name(resolved, shape, code)
    return Cell.model_validate({"campaign": camp.name, "cell_id": cid, "name": name, **resolved})


def expand(camp: Campaign, cluster: ClusterProfile, source: str = "<campaign>") -> list[Cell]:
    """All cells of a campaign: product of axes, plus include, minus exclude; deduplicated."""
    axes = _axis_values(camp)
    keys = list(axes)
    points: list[tuple[str, dict[str, Any]]] = []
    for i, combo in enumerate(itertools.product(*(axes[k] for k in keys))):
        points.append((f"sweep[{i}]", dict(zip(keys, combo, strict=True))))
    points = [(w, p) for w, p in points if not any(_matches(p, ex) for ex in camp.exclude)]
    base = {k: v[0] for k, v in axes.items() if len(v) == 1}
    for i, inc in enumerate(camp.include):
        points.append((f"include[{i}]", {**base, **inc}))
    cells: dict[str, Cell] = {}
    for where, point in points:
        cell = resolve(camp, cluster, point, source, where)
        cells.setdefault(cell.cell_id, cell)
    if not cells:
        raise ConfigError(source, "sweep", "the sweep expands to no cells")
    return list(cells.values())


def discover(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if not p.name.startswith("_"))


def dedupe(campaigns: Sequence[LoadedCampaign]) -> dict[str, list[str]]:
    """Cell id -> campaigns that contain it."""
    owners: dict[str, list[str]] = {}
    for lc in campaigns:
        for c in lc.cells:
            owners.setdefault(c.cell_id, []).append(lc.name)
    return owners


def iter_errors(paths: Iterable[Path]) -> Iterable[tuple[Path, ConfigError]]:
    for p in paths:
        try:
            load_campaign(p)
        except ConfigError as err:
            yield p, err

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
import math
import operator
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from charllm import capabilities, modelcat
from charllm.capabilities import CellView, Refusal
from charllm.errors import ConfigError
from charllm.paths import path_under  # noqa: F401  (re-exported: campaign.path_under)
from charllm.shell import has_control, is_safe_name
from charllm.yamlload import load_yaml_file

HASH_LEN = 16

# -- bounds: checked before any expansion work -------------------------------------------------

DEFAULT_MAX_CELLS = 10_000  # cells per campaign (sweep product + include entries); CHARLLM_MAX_CELLS
MAX_EXCLUDE = 1_000  # exclude entries per campaign
MAX_STEPS = 100_000
MAX_SEED = 2**31 - 1
MAX_DEGREE = 65_536  # tp, pp, pp_virtual, dp, cp, ep
MAX_GPUS = 4096 * 64  # the largest cluster profile: 4096 nodes of 64
MAX_MICRO_BATCH = 65_536
MAX_GLOBAL_BATCH = 1 << 24
MAX_SEQ_LEN = 1 << 20
MAX_PROXY_LAYERS = 1024


def max_cells() -> int:
    """Cells one campaign may hold: ``CHARLLM_MAX_CELLS`` or :data:`DEFAULT_MAX_CELLS`."""
    raw = os.environ.get("CHARLLM_MAX_CELLS", "").strip()
    if not raw:
        return DEFAULT_MAX_CELLS
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError("environment", "CHARLLM_MAX_CELLS", f"{raw!r} is not a positive whole number")
    return int(raw)


def field_error(field: str, message: str) -> PydanticCustomError:
    """An error of a model-level check that belongs to one field (``_raise_validation`` names it)."""
    return PydanticCustomError("field_error", "{message}", {"field": field, "message": message})


def _plan_ref(value: str) -> str:
    """``frequency_plan``: a plans.jsonl under the results home, ``path[@point]`` (charllm.energy.freqplan)."""
    from charllm.energy.freqplan import parse_ref

    parse_ref(value)  # ValueError names the rule
    return value


def _safe_name(value: str) -> str:
    if not is_safe_name(value):
        raise ValueError(
            f"{value!r} is not a safe name: use letters, digits, '_', '.', '-' "
            "(first a letter or digit, at most 128 characters, no spaces or control characters)"
        )
    return value


# every name that reaches a file path, a job name or a script: one full-match pattern (charllm.shell)
SafeName = Annotated[str, Strict(), AfterValidator(_safe_name)]


def _no_control(value: str) -> str:
    if has_control(value):
        raise ValueError(f"{value[:80]!r} holds a control character (newline, tab, ...)")
    return value


#: free text that may reach a job script (quoted there) or a log line: no control characters
Text = Annotated[str, Strict(), AfterValidator(_no_control)]
#: a glob over cell names
Glob = Annotated[str, Strict(), Field(min_length=1, max_length=1024), AfterValidator(_no_control)]

_NUMBER_RE = re.compile(r"\A[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\Z")


def _number_text(value: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` as a string: accept a plain decimal literal, nothing else (no "nan", "inf")."""
    if isinstance(value, str) and _NUMBER_RE.match(value.strip()):
        return float(value)
    return value


#: a whole number: no bool, no float (2.5 is not truncated to 2), no string ("2")
Int = Annotated[int, Strict()]
#: a finite number: an int is fine, a numeric YAML-1.1 string like ``3e-4`` too; bools, "nan", "abc" are not
Number = Annotated[float, BeforeValidator(_number_text), Strict(), Field(allow_inf_nan=False)]
Degree = Annotated[int, Strict(), Field(ge=1, le=MAX_DEGREE)]
Gpus = Annotated[int, Strict(), Field(ge=1, le=MAX_GPUS)]
MicroBatch = Annotated[int, Strict(), Field(ge=1, le=MAX_MICRO_BATCH)]
GlobalBatch = Annotated[int, Strict(), Field(ge=1, le=MAX_GLOBAL_BATCH)]
SeqLen = Annotated[int, Strict(), Field(ge=1, le=MAX_SEQ_LEN)]

_TIME_RE = r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$|^\d+$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuControl(_Strict):
    """May a job change SM clocks / the power limit, and through what: ``deny``, ``nvml`` (the job
    itself, needs the rights) or ``zeusd`` (Zeus's privileged daemon; accepted, not driven yet)."""

    clocks: Literal["deny", "nvml", "zeusd"] = "deny"
    power_limit: Literal["deny", "nvml", "zeusd"] = "deny"


class ClusterProfile(_Strict):
    """Where cells run: GPU type, node shape and scheduler settings."""

    name: SafeName
    gpu_type: Literal["cpu", "h100", "h200", "a100"] = "cpu"
    gpus_per_node: Int = Field(1, ge=1, le=64)
    nodes: Int = Field(1, ge=1, le=4096)
    partition: SafeName | None = None
    account: SafeName | None = None
    qos: SafeName | None = None
    time_limit: str = Field("00:30:00", pattern=_TIME_RE)
    gres_per_node: str | None = Field(None, pattern=r"^[A-Za-z0-9_:]+$")
    cpus_per_task: Int = Field(1, ge=1, le=4096)
    mem: str | None = Field(None, pattern=r"^\d+[KMGT]?$")
    launcher: Literal["torchrun", "srun", "python"] = "torchrun"
    poll_interval_s: Number = Field(10.0, gt=0, le=600)
    # local backend only: how many jobs may run at once (1 keeps measurements apart)
    local_slots: Int = Field(1, ge=1, le=64)
    # the training environment on the cluster ({env_dir}/bin/python); relative to the login home
    env_dir: str | None = Field(None, pattern=r"^[A-Za-z0-9_./~\-]+$")
    # how the environment job installs it: packages (pinned by requirements.lock) and extra pip args
    train_packages: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-\[\],=<>!]+$")]] = Field(
        default_factory=lambda: ["torch", "numpy", "pandas", "pyarrow", "nvidia-ml-py", "pyyaml"]
    )
    pip_args: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:/=\-]+$")]] = Field(default_factory=list)
    bootstrap_python: str = Field("python3", pattern=r"^[A-Za-z0-9_./\-]+$")
    # engine: nemo cells run inside this container image (Slurm's pyxis: srun --container-image),
    # e.g. nvcr.io#nvidia/nemo:25.11 or a .sqsh path; then the install stage installs no NeMo
    nemo_container: str | None = Field(None, min_length=1, max_length=512, pattern=r"^[A-Za-z0-9_./:@#+\-]+$")
    workdir: str | None = Field(None, pattern=r"^[A-Za-z0-9_./~\-]+$")
    # extra environment for every job (values are quoted when rendered)
    env: dict[SafeName, Annotated[Text, Field(max_length=4096)]] = Field(default_factory=dict)
    modules: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_./+\-]+$")]] = Field(default_factory=list)
    # shared-cluster manners (charllm.runner; each also settable by CHARLLM_<NAME> in the environment):
    # jobs of this cluster in flight at once, over every campaign run and `charllm run` (none: no limit)
    max_jobs_in_flight: int | None = Field(None, ge=1, le=100_000)
    # how long an unreachable cluster is waited out before a task fails (seconds; default 1800)
    transport_patience_s: float | None = Field(None, gt=0, le=604_800)
    # attempts of a cell repeat per run when its jobs are lost (node failure, preemption; default 3)
    max_attempts: int | None = Field(None, ge=1, le=20)
    # the first wait after sbatch refuses a job for a submit limit (seconds; default 30, then doubling)
    submit_limit_backoff_s: float | None = Field(None, gt=0, le=3600)
    # link bandwidths for the time model (charllm.predict.timing; defaults there: NVLink 360 GB/s
    # all-reduce bus bandwidth per GPU, 100 Gb/s per node between nodes)
    intra_node_gbyte_per_s: float | None = Field(None, gt=0, le=100_000)
    inter_node_gbit_per_s: float | None = Field(None, gt=0, le=1_000_000)
    # how the Slurm backend reaches the login node (charllm.transport): "ssh" (the campaign's
    # connection_id; the default) or "local" (Airflow runs on the login node: this machine's shell)
    slurm_transport: Literal["ssh", "local"] | None = None
    # what the site lets a job change on its GPUs (charllm.energy.control); deny unless said otherwise
    gpu_control: GpuControl = Field(default_factory=lambda: GpuControl())

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
    name: Annotated[str, Strict()]
    proxy_layers: Int | None = Field(None, ge=1, le=MAX_PROXY_LAYERS)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in modelcat.names():
            raise ValueError(f"unknown model {v!r}; known: {', '.join(modelcat.names())}")
        return v

    @model_validator(mode="after")
    def _proxy(self) -> ModelRef:
        try:
            self.shape()
        except (KeyError, ValueError) as err:
            raise field_error("proxy_layers", str(err).strip("'\"")) from None
        return self

    def shape(self) -> modelcat.ModelShape:
        return modelcat.get(self.name, self.proxy_layers)


class Warmup(_Strict):
    """When a cell counts as warm: at least min_steps, steady step time and temperature."""

    min_steps: Int = Field(2, ge=0, le=MAX_STEPS)
    max_steps: Int = Field(20, ge=0, le=MAX_STEPS)
    step_time_cv: Number = Field(0.05, gt=0, le=100)
    temp_slope_c_per_s: Number = Field(0.05, gt=0, le=1000)

    @model_validator(mode="after")
    def _order(self) -> Warmup:
        if self.min_steps > self.max_steps:
            raise field_error("min_steps", f"{self.min_steps} is greater than max_steps {self.max_steps}")
        return self


DATA_FORMAT_VERSION = 1  # bump when the prepared dataset's layout changes (new directory key)
DEFAULT_DATA_PATH = "charllm-data"


class Dataset(_Strict):
    """What the cells train on.

    ``synthetic``: generated by each job from the cell's seed (nothing to prepare).

    ``indexed``: a corpus tokenized once by the dataset job (``charllm.setup.dataprep``) into a
    Megatron-style indexed dataset that every job memory-maps. ``corpus`` lists text files
    (``.txt``: one document a line; ``.jsonl``: the ``text`` field of each line): a relative
    path is relative to the ``include/`` directory of the orchestrator's charllm checkout and
    is staged with the dataset job (so the shipped ``data/corpus/*`` works on any cluster);
    an absolute path (or ``~/...``) is read on the machine the dataset job runs on; an
    ``http(s)://`` URL is downloaded by the job. ``tokenizer``: ``bytes`` (UTF-8 bytes + an
    end-of-document id, 257 ids). ``path``: the output root on the cluster (default
    ``charllm-data``); a relative path is taken from the login home on Slurm and from the
    results home (``CHARLLM_HOME``) on the local backend. The dataset lands in
    ``<path>/<key>/tokens.{bin,idx}`` where ``key`` hashes the corpus list, tokenizer and
    format version.
    """

    kind: Literal["synthetic", "indexed"] = "synthetic"
    path: str | None = Field(None, pattern=r"^[A-Za-z0-9_./~\-]+$")
    corpus: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(default_factory=list)
    tokenizer: Literal["bytes"] = "bytes"

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = v.split("/")
        if ".." in parts:
            raise ValueError(f"{v!r}: a '..' component would leave the data root")
        if any(p.startswith("~") for p in parts[1:]) or (parts[0].startswith("~") and parts[0] != "~"):
            raise ValueError(f"{v!r}: '~' only as the first component ('~/...': the login home)")
        return v

    @field_validator("corpus")
    @classmethod
    def _corpus(cls, v: list[str]) -> list[str]:
        for i, src in enumerate(v):
            if has_control(src):
                raise ValueError(f"corpus[{i}]: control characters in {src!r}")
            if "://" in src and not src.startswith(("http://", "https://")):
                raise ValueError(f"corpus[{i}]: {src!r}: only local paths and http(s) URLs are supported")
            if not src.startswith(("http://", "https://", "/", "~/")) and ".." in Path(src).parts:
                raise ValueError(f"corpus[{i}]: {src!r}: a relative path must stay inside include/")
        return v

    @model_validator(mode="after")
    def _kind_fields(self) -> Dataset:
        if self.kind == "indexed" and not self.corpus:
            raise ValueError("an indexed dataset needs a non-empty 'corpus' (list of files)")
        if self.kind == "synthetic" and self.corpus:
            raise ValueError("'corpus' is only for kind 'indexed'")
        return self

    @property
    def data_path(self) -> str:
        return self.path or DEFAULT_DATA_PATH

    @property
    def key(self) -> str:
        """Directory key of the prepared dataset: corpus list, tokenizer, format version."""
        spec = {"corpus": list(self.corpus), "tokenizer": self.tokenizer, "format": DATA_FORMAT_VERSION}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:HASH_LEN]

    def resolved(self) -> dict[str, Any]:
        """What a cell records (and hashes). Synthetic keeps its historical form, so its hashes hold."""
        if self.kind == "synthetic":
            return {"kind": "synthetic", "path": self.path}
        return {
            "kind": "indexed",
            "path": self.data_path,
            "corpus": list(self.corpus),
            "tokenizer": self.tokenizer,
            "key": self.key,
        }


class ReferenceBand(_Strict):
    """An expected value with bounds, checked after aggregation."""

    metric: SafeName
    value: Number
    lower: Number
    upper: Number
    unit: Annotated[Text, Field(max_length=64)] = ""
    cells: Glob = "*"  # glob over cell names


AXES = (
    "model",
    "gpus",
    "tp",
    "pp",
    "pp_virtual",
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
    "recompute_layers",
    "offload_alpha",
    "zero",
    "cpu_offload",
    "interconnect",
    "pp_partition",
    "gpu_clock_mhz",
    "power_limit_w",
    "frequency_plan",
)
#: the Kwai/PCIe knobs' defaults: a knob at its default stays out of the hashed cell
KNOB_DEFAULTS: dict[str, Any] = {
    "recompute_layers": 0,
    "offload_alpha": 0.0,
    "zero": 0,
    "cpu_offload": False,
    "interconnect": "native",
}

_OptCode = Annotated[str, Strict(), Field(pattern=r"^[01]{5}$")]
_Recompute = StrictBool | Literal["none", "full", "selective", "kwai"]
_RecomputeLayers = Annotated[int, Strict(), Field(ge=0, le=4096)]
_Alpha = Annotated[float, BeforeValidator(_number_text), Strict(), Field(ge=0.0, le=1.0, allow_inf_nan=False)]
_Zero = Literal[0, 1, 2, 3]
_Interconnect = Literal["native", "pcie"]
# the Perseus study (charllm.energy): stage start layers, GPU clock / power limit, a frequency plan
_PpPartition = Annotated[str, Strict(), Field(max_length=4096, pattern=r"^(uniform|custom:\d+(,\d+)*)$")]
_ClockMhz = Annotated[int, Strict(), Field(ge=100, le=5000)]
_PowerW = Annotated[int, Strict(), Field(ge=50, le=2000)]
_PlanName = Annotated[str, Strict(), Field(max_length=512), AfterValidator(_plan_ref)]
_Dp = Degree | Literal["auto"]


def _model_names(v: Any) -> Any:
    """``model: gpt3-1.3b`` is ``model: {name: gpt3-1.3b}``."""
    if isinstance(v, list):
        return [{"name": m} if isinstance(m, str) else m for m in v]
    return {"name": v} if isinstance(v, str) else v


class Sweep(_Strict):
    """Sweep axes: each a list of values. ``dp`` may be ``auto`` (gpus / (tp*pp*cp)).

    ``pp_virtual``: virtual pipeline stages per pipeline rank (interleaved 1F1B; 1 = plain).
    ``recompute``: ``false``/``"none"``, ``true``/``"full"`` (whole layers), ``"selective"``
    (the attention core only) or ``"kwai"`` (norms + MLP activation, Megatron-Kwai). With
    ``opt_code``, its second digit turns recompute on (full, or the mode this axis names) or off.
    ``recompute_layers``: recompute only the first N layers of each stage (0: all).
    ``offload_alpha``: fraction (0..1) of each micro batch's saved activations offloaded to host.
    ``zero``: 0 | 1 (DDP + sharded optimizer state) | 2 | 3 (FSDP2); ``cpu_offload`` with 2/3.
    ``interconnect``: ``native`` or ``pcie`` (NCCL kept off peer-to-peer and NVLS).

    The value types (and bounds) are :class:`Point`'s: one definition for the axes and for
    the ``include``/``exclude`` entries.
    """

    model: list[ModelRef] | None = None
    gpus: list[Gpus] | None = None
    tp: list[Degree] = [1]
    pp: list[Degree] = [1]
    pp_virtual: list[Degree] = [1]
    dp: list[_Dp] = [1]
    cp: list[Degree] = [1]
    ep: list[Degree] = [1]
    fsdp: list[StrictBool] = [False]
    micro_batch: list[MicroBatch] = [1]
    global_batch: list[GlobalBatch] = [8]
    seq_len: list[SeqLen] = [64]
    recompute: list[_Recompute] = [False]
    overlap: list[StrictBool] = [False]
    opt_code: list[_OptCode] | None = None
    recompute_layers: list[_RecomputeLayers] = [0]
    offload_alpha: list[_Alpha] = [0.0]
    zero: list[_Zero] = [0]
    cpu_offload: list[StrictBool] = [False]
    interconnect: list[_Interconnect] = ["native"]
    pp_partition: list[_PpPartition] | None = None
    gpu_clock_mhz: list[_ClockMhz] | None = None
    power_limit_w: list[_PowerW] | None = None
    frequency_plan: list[_PlanName] | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        return _model_names(v)

    @model_validator(mode="after")
    def _nonempty(self) -> Sweep:
        for axis in AXES:
            v = getattr(self, axis)
            if v is not None and len(v) == 0:
                raise ValueError(f"axis {axis!r} is empty")
        return self


class Point(_Strict):
    """One ``include`` or ``exclude`` entry: some axes, each one value of :class:`Sweep`'s type.

    ``{fsdp: "false"}`` is an error (not a true string), ``{tp: 2.5}`` too (not 2), ``{tp: 0}``
    too; a null value is an error (leave the axis out instead).
    """

    model: ModelRef | None = None
    gpus: Gpus | None = None
    tp: Degree | None = None
    pp: Degree | None = None
    pp_virtual: Degree | None = None
    dp: _Dp | None = None
    cp: Degree | None = None
    ep: Degree | None = None
    fsdp: StrictBool | None = None
    micro_batch: MicroBatch | None = None
    global_batch: GlobalBatch | None = None
    seq_len: SeqLen | None = None
    recompute: _Recompute | None = None
    overlap: StrictBool | None = None
    opt_code: _OptCode | None = None
    recompute_layers: _RecomputeLayers | None = None
    offload_alpha: _Alpha | None = None
    zero: _Zero | None = None
    cpu_offload: StrictBool | None = None
    interconnect: _Interconnect | None = None
    pp_partition: _PpPartition | None = None
    gpu_clock_mhz: _ClockMhz | None = None
    power_limit_w: _PowerW | None = None
    frequency_plan: _PlanName | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        return _model_names(v)

    @model_validator(mode="after")
    def _given(self) -> Point:
        nulls = sorted(k for k in self.model_fields_set if getattr(self, k) is None)
        if nulls:
            raise ValueError(f"null value for {', '.join(nulls)}: leave the axis out instead")
        if not self.model_fields_set:
            raise ValueError("an empty entry: name at least one axis")
        return self

    def axes(self) -> dict[str, Any]:
        """The axes this entry names, with their values."""
        return {k: getattr(self, k) for k in AXES if k in self.model_fields_set}


class Nightly(_Strict):
    """What a scheduled run re-measures: the cells matching ``cells``, ``repeats`` new repeats each."""

    cells: Glob = "*"
    repeats: Int = Field(1, ge=1, le=100)


class TimeLimitRule(_Strict):
    """A longer (or shorter) Slurm time limit for the cells whose name matches a glob."""

    cells: Glob
    time_limit: str = Field(pattern=_TIME_RE)


class Campaign(_Strict):
    """A campaign file, validated."""

    name: SafeName
    description: Annotated[str, Strict(), Field(max_length=10_000)] = ""
    cluster: SafeName | ClusterProfile
    model: ModelRef
    engine: Literal["torch", "megatron", "nemo"] = "torch"
    precision: Literal["bf16", "fp32"] = "bf16"
    backend: Annotated[str, Strict(), Field(max_length=64)] = "local"  # a kind of charllm.backends' registry
    connection_id: SafeName | None = None
    schedule: Annotated[str, Strict(), Field(max_length=256)] | None = None
    steps: Int = Field(10, ge=1, le=MAX_STEPS)
    repeats: Int = Field(1, ge=1, le=100)
    warmup: Warmup = Warmup()
    telemetry_hz: Number = Field(20.0, gt=0, le=1000)
    profile_kernels: StrictBool = False
    # what the job profiles besides steps and telemetry: none | layers | instructions (every
    # forward/backward of every micro batch per pipeline stage, charllm.energy.recorder)
    profile: Literal["none", "layers", "instructions"] = "none"
    # fixed: every cell measures `steps` steps; adaptive: until the median step time's 95 % CI is
    # within 1 % and 10 s of energy are integrated, at most `steps` (charllm.train.window)
    window: Literal["fixed", "adaptive"] = "fixed"
    # what `plan --predict` and the runner skip: cells predicted to run out of memory (one canary per
    # model still runs), also cells another cell beats in predicted time and energy, or nothing
    prune: Literal["none", "oom", "dominated"] = "none"
    compile: StrictBool = False
    learning_rate: Number = Field(3e-4, gt=0, le=1)
    seed: Int = Field(1234, ge=0, le=MAX_SEED)
    dataset: Dataset = Dataset()
    sweep: Sweep = Sweep()
    include: list[Point] = Field(default_factory=list)
    exclude: list[Point] = Field(default_factory=list, max_length=MAX_EXCLUDE)
    references: list[ReferenceBand] = Field(default_factory=list)
    # scheduled runs re-measure this subset as new repeats (drift across nights)
    nightly: Nightly = Nightly()
    # per-cell job time limits, first match wins; other cells get the cluster profile's
    time_limits: list[TimeLimitRule] = Field(default_factory=list)
    tags: list[SafeName] = Field(default_factory=list)

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v: Any) -> Any:
        return _model_names(v)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        return None if v is None else check_schedule(v)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from charllm.backends import backend_kinds

        if v not in backend_kinds():
            raise ValueError(f"unknown backend {v!r}: one of {', '.join(repr(k) for k in backend_kinds())}")
        return v

    @model_validator(mode="after")
    def _backend(self) -> Campaign:
        from charllm.backends import backend_class

        if backend_class(self.backend).capabilities.needs_connection and self.connection_id is None:
            raise field_error(
                "connection_id",
                f"backend {self.backend!r} needs connection_id (the Airflow SSH connection to the cluster)",
            )
        return self


#: the ``@`` presets Airflow 3.3 turns into a timetable (``airflow.utils.dates.cron_presets`` and
#: ``@once``); ``@continuous`` is left out: it would start the whole campaign again the moment it ends
SCHEDULE_PRESETS = ("@once", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")


def check_schedule(v: str) -> str:
    """A five-field cron expression croniter (Airflow's parser) accepts and that fires, or a preset."""
    if any(not ch.isprintable() for ch in v):
        raise ValueError(f"{v!r}: control characters in a schedule")
    if v.startswith("@"):
        if v not in SCHEDULE_PRESETS:
            raise ValueError(
                f"{v!r} is not a schedule preset Airflow accepts; use one of {', '.join(SCHEDULE_PRESETS)}"
            )
        return v
    if len(v.split()) != 5:
        raise ValueError(f"{v!r} is not a five-field cron expression (minute hour day month weekday, one space apart)")
    from datetime import datetime

    from croniter import CroniterBadCronError, CroniterBadDateError, croniter

    try:
        croniter(v, datetime(2026, 1, 1)).get_next(datetime)
    except CroniterBadCronError as err:
        raise ValueError(f"{v!r} is not a valid cron expression: {err}") from None
    except CroniterBadDateError:
        raise ValueError(f"{v!r} never fires (no such date)") from None
    except (ValueError, TypeError, KeyError, IndexError) as err:  # croniter's own parser on odd input
        raise ValueError(f"{v!r} is not a valid cron expression: {err}") from None
    return v


class ParallelLayout(_Strict):
    tp: int
    pp: int
    dp: int
    cp: int
    ep: int
    fsdp: bool
    pp_virtual: int = 1  # in the hashed dict only when > 1, so older cells keep their ids
    pp_partition: str = ""  # "custom:0,8,14,20,26"; in the hashed dict only when set


class Cell(_Strict):
    """One resolved sweep cell. ``cell_id`` is the content hash of everything measured."""

    campaign: SafeName
    cell_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    name: SafeName
    model: dict[str, Any]
    parallel: ParallelLayout
    micro_batch: int
    global_batch: int
    seq_len: int
    opt: dict[str, bool | int | float | str]  # recompute_granularity only when not "full"; knobs when not default
    opt_code: str
    steps: int
    warmup: Warmup
    engine: str
    precision: str
    dataset: dict[str, Any]  # Dataset.resolved()
    telemetry: dict[str, float]
    gpu_type: str
    gpus_per_node: int
    world_size: int
    nodes: int
    seed: int
    # only for cells that ask to change clocks / power limits: the cluster's gate and the request
    gpu_control: dict[str, Any] | None = None

    def job_config(self, repeat: int) -> dict[str, Any]:
        """The JSON handed to ``python -m charllm.train --cell``."""
        data = self.model_dump(mode="json")
        data["repeat"] = repeat
        return data

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.parallel.dp)

    @property
    def recompute_mode(self) -> str:
        """none | full | selective."""
        if not self.opt.get("recompute"):
            return "none"
        return str(self.opt.get("recompute_granularity", "full"))

    def view(self, cluster_gpus: int | None = None) -> CellView:
        """The cell as :mod:`charllm.capabilities` judges it; ``cluster_gpus``: the cluster's total, if known."""
        par = self.parallel
        return CellView(
            engine=self.engine,
            device=capabilities.device_of(self.gpu_type),
            model=modelcat.ModelShape(**self.model),
            tp=par.tp,
            pp=par.pp,
            pp_virtual=par.pp_virtual,
            dp=par.dp,
            cp=par.cp,
            ep=par.ep,
            fsdp=par.fsdp,
            recompute=self.recompute_mode,
            recompute_layers=int(self.opt.get("recompute_layers", 0)),
            offload_alpha=float(self.opt.get("offload_alpha", 0.0)),
            zero=int(self.opt.get("zero", 0)),
            cpu_offload=bool(self.opt.get("cpu_offload", False)),
            interconnect=str(self.opt.get("interconnect", "native")),
            overlap=bool(self.opt.get("overlap", False)),
            compile=bool(self.opt.get("compile", False)),
            pp_partition=par.pp_partition,
            profile_mode=str(self.opt.get("profile_mode", "none")),
            frequency_plan=bool(((self.gpu_control or {}).get("request") or {}).get("frequency_plan")),
            dataset=str((self.dataset or {}).get("kind", "synthetic")),
            precision=self.precision,
            micro_batch=self.micro_batch,
            global_batch=self.global_batch,
            seq_len=self.seq_len,
            world_size=self.world_size,
            gpus_per_node=self.gpus_per_node,
            cluster_gpus=cluster_gpus,
        )


def cell_refusals(cell: Cell, cluster: ClusterProfile | None = None) -> list[Refusal]:
    """Why ``cell`` cannot run (on ``cluster``, when given): :func:`charllm.capabilities.refusals`."""
    return capabilities.refusals(cell.view(cluster.total_gpus if cluster is not None else None))


# -- hashing ----------------------------------------------------------------------------

_HASHED_EXCLUDE = {"campaign", "cell_id", "name"}


def cell_hash(resolved: dict[str, Any]) -> str:
    """Content hash over a resolved cell, independent of key order and campaign."""
    payload = {k: v for k, v in resolved.items() if k not in _HASHED_EXCLUDE}
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:HASH_LEN]


# -- loading ----------------------------------------------------------------------------


_FIELD_PART = re.compile(r"\A[a-z_][a-z0-9_]*\Z")
# pydantic names the member of a union (or the validator) that failed inside the loc: not a field
_TYPE_TAGS = {"int", "bool", "str", "float", "list", "dict", "none", "constrained-int", "constrained-str"}
_DICT_FIELDS = {"env"}  # mapping fields whose keys the file chooses


def _loc(err: Any) -> str:
    """Pydantic's error location as ``sweep.dp[0]``, without the union member tags pydantic adds."""
    out = ""
    loc = list(err["loc"])
    if err.get("type") == "field_error":
        loc.append(err["ctx"]["field"])
    if err.get("type") == "extra_forbidden" and loc and isinstance(loc[-1], str):
        key = loc.pop()  # the unknown key, as the file spells it
        return (_loc({**err, "loc": tuple(loc), "type": ""}) + f".{key}").removeprefix("(top level).")
    prev = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and prev in _DICT_FIELDS:
            out += f".{part}"  # a key of a mapping field (env: {NAME: value})
        elif isinstance(part, str) and _FIELD_PART.match(part) and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
        else:
            continue
        prev = part if isinstance(part, str) and prev not in _DICT_FIELDS else ""
    return out or "(top level)"


def _msg(err: Any) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        loc = err["loc"]
        if len(loc) >= 3 and loc[0] in ("include", "exclude") and isinstance(loc[1], int):
            return f"unknown axis {loc[-1]!r}; axes are {', '.join(AXES)}"
        return "unknown field"
    return msg


def _got(err: Any, msg: str) -> str:
    """`` (got 'false')``: the offending value, unless the message shows it already."""
    value = err.get("input")
    if err["type"] in ("missing", "field_error", "extra_forbidden"):
        return ""
    if not isinstance(value, str | int | float | bool | None):
        return ""
    shown = repr(value)
    if shown in msg:
        return ""
    return f" (got {shown[:80]}{'...' if len(shown) > 80 else ''})"


def _raise_validation(source: str, exc: ValidationError, prefix: str = "") -> None:
    """The first failing field (its messages from every union member joined) and how many others failed.

    Where a union failed both as a plain value and as a model (``cluster: name | {profile}``),
    the type error of the branch the input was not meant for is dropped.
    """
    errors = exc.errors()
    locs = [_loc(e) for e in errors]
    keep = [
        (e, loc)
        for e, loc in zip(errors, locs, strict=True)
        if not (
            str(e["type"]).endswith("_type")
            and any(other != loc and other.startswith(loc + (".") if loc != "(top level)" else "") for other in locs)
        )
    ]
    groups: dict[str, list[str]] = {}
    got: dict[str, str] = {}
    for err, loc in keep:
        field = f"{prefix}.{loc}" if prefix else loc
        msgs = groups.setdefault(field, [])
        m = _msg(err)
        if m not in msgs:
            msgs.append(m)
        got.setdefault(field, _got(err, m))
    field, msgs = next(iter(groups.items()))
    msg = "; or ".join(msgs) + got[field]
    extra = len(groups) - 1
    if extra:
        msg += f" (and {extra} more field{'s' if extra > 1 else ''} with errors)"
    raise ConfigError(source, field, msg) from exc


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping, read within :mod:`charllm.yamlload`'s bounds."""
    data = load_yaml_file(path)
    if not isinstance(data, dict):
        raise ConfigError(str(path), "(top level)", "expected a mapping of fields")
    return data


def clusters_dir(campaign_path: Path) -> Path:
    """``include/clusters`` beside ``include/campaigns``."""
    return campaign_path.parent.parent / "clusters"


def load_cluster(name: str, search: Path, source: str) -> ClusterProfile:
    if not is_safe_name(name):
        raise ConfigError(source, "cluster", f"{name!r} is not a safe name")
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
    """A validated campaign with its cluster and expanded cells.

    ``refused``: cell id -> why it cannot run; empty unless loaded with ``check=False``
    (a checked load raises on the first refused cell instead).
    """

    def __init__(
        self,
        campaign: Campaign,
        cluster: ClusterProfile,
        cells: list[Cell],
        source: str,
        refused: dict[str, list[Refusal]] | None = None,
    ) -> None:
        self.campaign = campaign
        self.cluster = cluster
        self.cells = cells
        self.source = source
        self.refused = refused or {}

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


def load_campaign(path: str | Path, clusters: Path | None = None, check: bool = True) -> LoadedCampaign:
    """Read, validate and expand a campaign file. Raises ConfigError naming file and field.

    ``check=False`` keeps the cells the capability table refuses (``plan``, ``validate``
    list them with their reasons in ``LoadedCampaign.refused``) instead of raising.
    """
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
    if check:
        return LoadedCampaign(camp, cluster, expand(camp, cluster, src), src)
    cells, refused = expand_all(camp, cluster, src)
    return LoadedCampaign(camp, cluster, cells, src, refused)


# -- expansion --------------------------------------------------------------------------


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


def _norm(axis: str, value: Any) -> Any:
    """An axis value as ``exclude`` compares it: recompute in any spelling, pp_virtual 1 when absent."""
    if axis == "recompute":
        return capabilities.recompute_mode(value)
    if axis == "pp_virtual" and value is None:
        return 1
    if axis in KNOB_DEFAULTS:
        return KNOB_DEFAULTS[axis] if value is None else value
    if axis == "model" and isinstance(value, ModelRef):
        return (value.name, value.proxy_layers)
    return value


class _Excluder:
    """``exclude`` entries grouped by the axes they name: per point, one C-level key build and set lookup
    per group (1,000 entries with distinct axis sets against 10,000 points: about a second)."""

    def __init__(self, excludes: Sequence[Point]) -> None:
        groups: dict[tuple[str, ...], set[Any]] = {}
        for ex in excludes:
            ax = {axis: _norm(axis, value) for axis, value in ex.axes().items()}
            if "model" in ax and ex.model is not None and ex.model.proxy_layers is None:
                ax["model_name"] = ax.pop("model")[0]  # {model: name}: that model and any proxy of it
            keys = tuple(sorted(ax))
            groups.setdefault(keys, set()).add(operator.itemgetter(*keys)(ax))
        self.groups = [(operator.itemgetter(*keys), vals) for keys, vals in groups.items()]

    @staticmethod
    def normalized(point: dict[str, Any]) -> dict[str, Any]:
        out = {axis: _norm(axis, point.get(axis)) for axis in AXES}
        model = point.get("model")
        out["model_name"] = model.name if isinstance(model, ModelRef) else None
        return out

    def excludes(self, point: dict[str, Any]) -> bool:
        if not self.groups:
            return False
        norm = self.normalized(point)
        return any(get(norm) in vals for get, vals in self.groups)


def check_size(camp: Campaign, source: str) -> int:
    """The number of points the campaign names (product of the axis lengths + include entries), checked
    against :func:`max_cells` before anything is expanded."""
    axes = _axis_values(camp)
    product = math.prod(len(v) for v in axes.values())
    total = product + len(camp.include)
    limit = max_cells()
    if total > limit:
        shape = " x ".join(f"{k} {len(v)}" for k, v in axes.items() if len(v) > 1) or "1"
        field = "include" if len(camp.include) > limit else "sweep"
        raise ConfigError(
            source,
            field,
            f"the campaign names {total} cells (sweep {shape} = {product}, plus {len(camp.include)} include "
            f"entries); at most {limit} cells per campaign (CHARLLM_MAX_CELLS): split it into several campaigns",
        )
    return total


def _point_name(p: dict[str, Any], shape: modelcat.ModelShape, code: str) -> str:
    par = p["parallel"]
    vp = f"vp{par['pp_virtual']}" if par.get("pp_virtual", 1) > 1 else ""
    bits = [shape.name, f"tp{par['tp']}pp{par['pp']}{vp}dp{par['dp']}"]
    if par["cp"] > 1:
        bits[-1] += f"cp{par['cp']}"
    if par["ep"] > 1:
        bits[-1] += f"ep{par['ep']}"
    if par["fsdp"]:
        bits.append("fsdp")
    bits += [f"mb{p['micro_batch']}", f"gb{p['global_batch']}", f"s{p['seq_len']}", code]
    o = p["opt"]
    if o.get("recompute_granularity") == "selective":
        bits.append("rsel")
    if o.get("recompute_granularity") == "kwai":
        bits.append("rkwai")
    if o.get("recompute_layers"):
        bits.append(f"rl{o['recompute_layers']}")
    if o.get("offload_alpha"):
        bits.append(f"a{o['offload_alpha']:g}")
    if o.get("zero"):
        bits.append(f"z{o['zero']}")
    if o.get("cpu_offload"):
        bits.append("cpuoff")
    if o.get("interconnect", "native") != "native":
        bits.append(str(o["interconnect"]))
    if par.get("pp_partition"):
        bits.append("pc" + str(par["pp_partition"]).removeprefix("custom:").replace(",", "_"))
    req = (p.get("gpu_control") or {}).get("request") or {}
    for key, tag in (("gpu_clock_mhz", "f"), ("power_limit_w", "pl"), ("frequency_plan", "plan-")):
        if key in req:
            val = req[key] if key != "frequency_plan" else hashlib.sha256(str(req[key]).encode()).hexdigest()[:8]
            bits.append(f"{tag}{val}")
    return "-".join(bits)


def refusal_error(source: str, where: str, cell_name: str, refused: Sequence[Refusal]) -> ConfigError:
    """A refused cell as a ConfigError: the file, ``where.field`` of the first reason, the cell and every reason."""
    first, rest = refused[0], refused[1:]
    msg = f"cell {cell_name} cannot run: {first.reason}"
    if rest:
        msg += f" (and {len(rest)} more: " + "; ".join(str(r) for r in rest) + ")"
    return ConfigError(source, f"{where}.{first.field}", msg)


def resolve(
    camp: Campaign, cluster: ClusterProfile, point: dict[str, Any], source: str, where: str, check: bool = True
) -> Cell:
    """Turn one sweep point into a Cell checked against :mod:`charllm.capabilities`.

    A point that names no cell (dp ``auto`` not dividing ``gpus``, ``gpus`` not tp*pp*dp*cp)
    always raises; a cell the capability table refuses raises only with ``check``. ``point``
    may hold raw values (``{"model": "tiny", "tp": 2}``): they are checked as a :class:`Point`.
    """
    try:
        typed = Point.model_validate(point).axes()
    except ValidationError as exc:
        _raise_validation(source, exc, prefix=where)
        raise
    cell, refused = _resolve(camp, cluster, typed, source, where)
    if check and refused:
        raise refusal_error(source, where, cell.name, refused)
    return cell


def _resolve(
    camp: Campaign, cluster: ClusterProfile, point: dict[str, Any], source: str, where: str
) -> tuple[Cell, list[Refusal]]:
    def bad(field: str, msg: str) -> ConfigError:
        return ConfigError(source, f"{where}.{field}", msg)

    ref: ModelRef = point.get("model", camp.model)
    shape = ref.shape()
    tp, pp, cp, ep, vp = (point.get(k, 1) for k in ("tp", "pp", "cp", "ep", "pp_virtual"))
    dp_raw = point.get("dp", 1)
    gpus = point.get("gpus")
    if dp_raw == "auto":
        if gpus is None:
            raise bad("dp", "dp 'auto' needs a 'gpus' axis")
        if gpus % (tp * pp * cp):
            raise bad("dp", f"gpus={gpus} is not divisible by tp*pp*cp={tp * pp * cp}")
        dp = gpus // (tp * pp * cp)
    else:
        dp = dp_raw
    world = tp * pp * dp * cp
    if gpus is not None and gpus != world:
        raise bad("gpus", f"world size mismatch: gpus={gpus} but tp*pp*dp*cp = {tp}*{pp}*{dp}*{cp} = {world}")
    try:
        mode = capabilities.recompute_mode(point.get("recompute", False))
    except ValueError as err:
        raise bad("recompute", str(err)) from None
    code = point.get("opt_code")
    if code is not None:
        overlap = code[0] == "1"
        mode = (mode if mode in ("selective", "kwai") else "full") if code[1] == "1" else "none"
    else:
        overlap = point.get("overlap", False)
        code = f"{int(overlap)}{int(mode != 'none')}000"
    mb, gb, seq = point.get("micro_batch", 1), point.get("global_batch", 8), point.get("seq_len", 64)
    fsdp = point.get("fsdp", False)
    nodes = max(1, -(-world // cluster.gpus_per_node))

    # knobs at their default stay out of the hashed dict: older cells keep their ids
    parallel: dict[str, Any] = {"tp": tp, "pp": pp, "dp": dp, "cp": cp, "ep": ep, "fsdp": fsdp}
    if vp != 1:
        parallel["pp_virtual"] = vp
    partition = point.get("pp_partition", "uniform")
    if partition != "uniform":
        parallel["pp_partition"] = partition
    opt: dict[str, Any] = {
        "recompute": mode != "none",
        "overlap": overlap,
        "compile": camp.compile,
        "profile": camp.profile_kernels,
        "lr": camp.learning_rate,
    }
    if mode in ("selective", "kwai"):
        opt["recompute_granularity"] = mode
    for knob, default in KNOB_DEFAULTS.items():
        value = point.get(knob, default)
        if value != default:
            opt[knob] = float(value) if knob == "offload_alpha" else value
    if camp.profile != "none":
        opt["profile_mode"] = camp.profile
    if camp.window != "fixed":
        opt["window"] = camp.window
    resolved: dict[str, Any] = {
        "model": shape.as_dict(),
        "parallel": parallel,
        "micro_batch": mb,
        "global_batch": gb,
        "seq_len": seq,
        "opt": opt,
        "opt_code": code,
        "steps": camp.steps,
        "warmup": camp.warmup.model_dump(),
        "engine": camp.engine,
        "precision": camp.precision,
        "dataset": camp.dataset.resolved(),
        "telemetry": {"hz": camp.telemetry_hz},
        "gpu_type": cluster.gpu_type,
        "gpus_per_node": cluster.gpus_per_node,
        "world_size": world,
        "nodes": nodes,
        "seed": camp.seed,
    }
    request = {k: point[k] for k in ("gpu_clock_mhz", "power_limit_w", "frequency_plan") if point.get(k) is not None}
    if request:  # hashed with the gate: a cell skipped under deny is a new cell where control is allowed
        resolved["gpu_control"] = {**cluster.gpu_control.model_dump(), "request": request}
    cid = cell_hash(resolved)
    name = _point_name(resolved, shape, code)
    cell = Cell.model_validate({"campaign": camp.name, "cell_id": cid, "name": name, **resolved})
    return cell, cell_refusals(cell, cluster)


def _points(camp: Campaign, source: str = "<campaign>") -> list[tuple[str, dict[str, Any]]]:
    check_size(camp, source)  # before itertools.product: a million-cell sweep is refused, not built
    axes = _axis_values(camp)
    keys = list(axes)
    ex = _Excluder(camp.exclude)
    points: list[tuple[str, dict[str, Any]]] = []
    for i, combo in enumerate(itertools.product(*(axes[k] for k in keys))):
        point = dict(zip(keys, combo, strict=True))
        if not ex.excludes(point):
            points.append((f"sweep[{i}]", point))
    base = {k: v[0] for k, v in axes.items() if len(v) == 1}
    for i, inc in enumerate(camp.include):
        points.append((f"include[{i}]", {**base, **inc.axes()}))
    return points


def expand(camp: Campaign, cluster: ClusterProfile, source: str = "<campaign>") -> list[Cell]:
    """All cells of a campaign: product of axes, plus include, minus exclude; deduplicated.

    Raises ConfigError (file, ``sweep[i]``/``include[i]`` and field, cell name, reason) for
    the first cell the capability table refuses.
    """
    cells: dict[str, Cell] = {}
    for where, point in _points(camp, source):
        cell, refused = _resolve(camp, cluster, point, source, where)
        if refused:
            raise refusal_error(source, where, cell.name, refused)
        cells.setdefault(cell.cell_id, cell)
    if not cells:
        raise ConfigError(source, "sweep", "the sweep expands to no cells")
    return list(cells.values())


def expand_all(
    camp: Campaign, cluster: ClusterProfile, source: str = "<campaign>"
) -> tuple[list[Cell], dict[str, list[Refusal]]]:
    """Like :func:`expand`, but refused cells are kept: (cells, cell id -> why it cannot run)."""
    cells: dict[str, Cell] = {}
    refused: dict[str, list[Refusal]] = {}
    for where, point in _points(camp, source):
        cell, why = _resolve(camp, cluster, point, source, where)
        cells.setdefault(cell.cell_id, cell)
        if why:
            have = refused.setdefault(cell.cell_id, [])
            have.extend(r for r in why if r not in have)
    if not cells:
        raise ConfigError(source, "sweep", "the sweep expands to no cells")
    return list(cells.values()), refused


def discover(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if not p.name.startswith("_"))


_NAMES: dict[Path, tuple[tuple[int, int], str | None]] = {}


def campaign_name_of(path: Path) -> str | None:
    """The ``name`` of a campaign file (None where it cannot be read); cached by mtime and size."""
    try:
        st = path.stat()
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _NAMES.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        name = read_yaml(path).get("name")
    except ConfigError:
        name = None
    name = name if is_safe_name(name) else None
    _NAMES[path] = (stamp, name)
    return name


def _same_dag(a: str, b: str) -> bool:
    """Whether campaigns named ``a`` and ``b`` claim a DAG id in common (``charllm_<name>[_figures]``)."""
    return a == b or a == f"{b}_figures" or b == f"{a}_figures"


def name_clashes(path: Path, name: str) -> list[tuple[Path, str]]:
    """The other campaign files in ``path``'s folder whose name claims one of this campaign's DAG ids."""
    me = path.resolve()
    out = []
    for other in discover(path.parent):
        if other.resolve() == me:
            continue
        theirs = campaign_name_of(other)
        if theirs is not None and _same_dag(name, theirs):
            out.append((other, theirs))
    return out


def check_unique_name(path: str | Path, name: str) -> None:
    """ConfigError naming both files when another campaign file in the folder claims this one's DAG ids.

    Airflow keeps one DAG per id: without this, the second file silently takes over the first
    one's DAG. Both files' DAGs fail to import instead, each naming the other.
    """
    path = Path(path)
    clashes = name_clashes(path, name)
    if not clashes:
        return
    other, theirs = clashes[0]
    what = (
        f"campaign name {name!r} is also used by {other}"
        if theirs == name
        else f"campaign name {name!r} and {other}'s name {theirs!r} both claim the DAG id "
        f"charllm_{max(name, theirs, key=len)}"
    )
    more = f" (and {len(clashes) - 1} more: {', '.join(str(p) for p, _ in clashes[1:])})" if len(clashes) > 1 else ""
    raise ConfigError(
        str(path),
        "name",
        f"{what}{more}: Airflow would keep only one of their DAGs; give each campaign its own name",
    )


def dedupe(campaigns: Sequence[LoadedCampaign]) -> dict[str, list[str]]:
    """Cell id -> campaigns that contain it."""
    owners: dict[str, list[str]] = {}
    for lc in campaigns:
        for c in lc.cells:
            owners.setdefault(c.cell_id, []).append(lc.name)
    return owners

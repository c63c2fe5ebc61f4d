"""GPU clock and power-limit control, behind the cluster profile's gate.

A cluster profile says what a site allows: ``gpu_control: {clocks: deny|nvml|zeusd,
power_limit: deny|nvml|zeusd}``, ``deny`` for both unless the profile says otherwise. A cell
that asks for control (``gpu_clock_mhz``, ``power_limit_w``, ``frequency_plan``) where the
gate denies it ends ``skipped`` with the reason (never failed, never retried), and no setter
is ever called.

:class:`GpuController` changes settings through NVML (``nvidia-ml-py``'s ``pynvml``; needs
root or ``nvidia-smi -acp UNRESTRICTED`` for clocks on most drivers) and puts every GPU it
touched back on every exit path: the normal end (``with`` / :meth:`restore`), an exception
(``__exit__``), SIGTERM and SIGINT (its handlers restore, then exit 143 / 130) and interpreter
exit (``atexit``). A Slurm epilog that runs ``nvidia-smi -rgc; nvidia-smi -pl <default>``
remains the guard against SIGKILL (docs/energy.md).

``zeusd`` (Zeus's privileged daemon) is accepted by the gate's schema but not driven by this
version: a cell that would need it is skipped with that reason.
"""

from __future__ import annotations

import atexit
import importlib
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

GATE_VALUES = ("deny", "nvml", "zeusd")
DRIVEN = ("nvml",)  # the gate values this version can act on


@dataclass(frozen=True)
class Gate:
    clocks: str = "deny"
    power_limit: str = "deny"

    def __post_init__(self) -> None:
        for name in ("clocks", "power_limit"):
            v = getattr(self, name)
            if v not in GATE_VALUES:
                raise ValueError(f"gpu_control.{name} must be one of {', '.join(GATE_VALUES)}; got {v!r}")

    @classmethod
    def of(cls, data: Mapping[str, Any] | None) -> Gate:
        return cls(**dict(data or {}))


@dataclass(frozen=True)
class ControlRequest:
    """What a cell asks of the GPUs: global clock, power limit, a per-instruction plan."""

    gpu_clock_mhz: int | None = None
    power_limit_w: int | None = None
    frequency_plan: str | None = None

    @property
    def clocks(self) -> bool:
        return self.gpu_clock_mhz is not None or self.frequency_plan is not None

    @property
    def power(self) -> bool:
        return self.power_limit_w is not None

    @property
    def any(self) -> bool:
        return self.clocks or self.power

    @classmethod
    def of(cls, data: Mapping[str, Any] | None) -> ControlRequest:
        return cls(**dict(data or {}))


def skip_reason(gate: Gate, req: ControlRequest) -> str | None:
    """Why a cell asking ``req`` cannot run under ``gate`` (it ends ``skipped``); None when it may."""
    why = []
    for wanted, name, what in ((req.clocks, "clocks", "SM clocks"), (req.power, "power_limit", "the power limit")):
        if not wanted:
            continue
        mode = getattr(gate, name)
        if mode == "deny":
            why.append(f"the cluster profile's gpu_control.{name} is deny: this cell would change {what}")
        elif mode not in DRIVEN:
            why.append(f"gpu_control.{name} is {mode!r}, which this version does not drive (only {', '.join(DRIVEN)})")
    return "; ".join(why) or None


class ControlDenied(RuntimeError):
    """A setter was asked for where the gate denies it (the controller never calls NVML then)."""


def load_pynvml() -> Any:
    return importlib.import_module("pynvml")


@dataclass
class _Saved:
    power_limit_mw: int | None = None
    clocks_locked: bool = False


@dataclass
class GpuController:
    """Locks clocks / sets power limits on ``devices`` (NVML indices); restores on every exit path.

    ``nvml`` is the ``pynvml`` module (a recording fake in the tests: never real GPUs there).
    """

    gate: Gate
    devices: Sequence[int] = (0,)
    nvml: Any = None
    log: Callable[[str], None] = lambda _m: None
    _handles: dict[int, Any] = field(default_factory=dict)
    _saved: dict[int, _Saved] = field(default_factory=dict)
    _prev: dict[int, Any] = field(default_factory=dict)
    _installed: bool = False
    _current_mhz: int | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> GpuController:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
        self.uninstall()

    def install(self) -> None:
        """Restore on SIGTERM/SIGINT (then exit 143/130) and at interpreter exit."""
        if self._installed:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._prev[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: atexit and __exit__ still guard
                pass
        atexit.register(self.restore)
        self._installed = True

    def uninstall(self) -> None:
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)
        self._prev.clear()
        atexit.unregister(self.restore)
        self._installed = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.log(f"signal {signum}: restoring GPU settings")
        self.restore()
        sys.exit(128 + signum)

    # -- NVML ----------------------------------------------------------------------------
    def _lib(self) -> Any:
        if self.nvml is None:
            self.nvml = load_pynvml()
            self.nvml.nvmlInit()
        return self.nvml

    def _handle(self, idx: int) -> Any:
        if idx not in self._handles:
            self._handles[idx] = self._lib().nvmlDeviceGetHandleByIndex(idx)
        return self._handles[idx]

    def _allow(self, name: str) -> None:
        mode = getattr(self.gate, name)
        if mode not in DRIVEN:
            raise ControlDenied(f"gpu_control.{name} is {mode}: no {name.replace('_', ' ')} change is made")

    # -- setters -------------------------------------------------------------------------
    def lock_clocks(self, mhz: int) -> None:
        """Lock the SM clock of every device at ``mhz`` (min = max)."""
        self._allow("clocks")
        if mhz == self._current_mhz:
            return
        nv = self._lib()
        for idx in self.devices:
            h = self._handle(idx)
            self._saved.setdefault(idx, _Saved()).clocks_locked = True
            nv.nvmlDeviceSetGpuLockedClocks(h, int(mhz), int(mhz))
        self._current_mhz = int(mhz)

    def set_power_limit(self, watts: int) -> None:
        self._allow("power_limit")
        nv = self._lib()
        for idx in self.devices:
            h = self._handle(idx)
            saved = self._saved.setdefault(idx, _Saved())
            if saved.power_limit_mw is None:
                saved.power_limit_mw = int(nv.nvmlDeviceGetPowerManagementLimit(h))
            nv.nvmlDeviceSetPowerManagementLimit(h, int(watts) * 1000)

    def instruction_hook(self, plan: Mapping[tuple[str, int], int]) -> Callable[[str, int], None]:
        """A pre-instruction callback that locks the plan's frequency for (instruction, micro batch)."""
        self._allow("clocks")

        def before(instruction: str, micro_batch: int) -> None:
            mhz = plan.get((instruction, micro_batch))
            if mhz is not None:
                self.lock_clocks(mhz)

        return before

    def restore(self) -> None:
        """Put back every setting this controller changed (idempotent; errors are logged, not raised)."""
        if not self._saved:
            return
        nv = self.nvml
        for idx, saved in list(self._saved.items()):
            h = self._handles.get(idx)
            if saved.clocks_locked:
                try:
                    nv.nvmlDeviceResetGpuLockedClocks(h)
                except Exception as err:
                    self.log(f"GPU {idx}: resetting locked clocks failed: {err}")
            if saved.power_limit_mw is not None:
                try:
                    nv.nvmlDeviceSetPowerManagementLimit(h, saved.power_limit_mw)
                except Exception as err:
                    self.log(f"GPU {idx}: restoring the power limit failed: {err}")
        self._saved.clear()
        self._current_mhz = None


def apply_request(ctl: GpuController, req: ControlRequest) -> None:
    """Apply a cell's global settings (the per-instruction plan goes through :meth:`instruction_hook`)."""
    if req.power_limit_w is not None:
        ctl.set_power_limit(req.power_limit_w)
    if req.gpu_clock_mhz is not None:
        ctl.lock_clocks(req.gpu_clock_mhz)


def request_of(extra: Mapping[str, Any]) -> tuple[Gate, ControlRequest]:
    """The gate and request a job's cell carries (``gpu_control`` in its JSON; absent: nothing asked)."""
    raw = extra.get("gpu_control") or {}
    if not isinstance(raw, Mapping):
        raise ValueError("gpu_control must be an object like {'clocks': 'deny', 'power_limit': 'deny', 'request': {}}")
    gate = Gate(clocks=str(raw.get("clocks", "deny")), power_limit=str(raw.get("power_limit", "deny")))
    return gate, ControlRequest.of(raw.get("request"))


def job_skip_reason(extra: Mapping[str, Any]) -> str | None:
    """Why the job must not run this cell (it ends ``skipped``), before it touches a GPU; None: run it."""
    gate, req = request_of(extra)
    why = skip_reason(gate, req)
    if why is None and req.frequency_plan is not None:
        why = (
            "frequency_plan: per-instruction plans are computed by `charllm energy-plan` but this version's job "
            "does not execute them yet (the controller's instruction hook is tested on a fake NVML only)"
        )
    return why


def job_control(extra: Mapping[str, Any], local_rank: int, log: Callable[[str], None] = print) -> Any:
    """A context manager applying the cell's global clock / power limit on this rank's GPU, restoring after.

    A ``contextlib.nullcontext`` when the cell asks for nothing.
    """
    import contextlib

    gate, req = request_of(extra)
    if not req.any:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def ctl() -> Any:
        with GpuController(gate, (local_rank,), log=log) as c:
            apply_request(c, req)
            yield c

    return ctl()

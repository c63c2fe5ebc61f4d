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
exit (``atexit``). A Python signal handler runs only when the main thread runs Python code, and a
rank blocked in a collective (a pipeline peer that died) may not for minutes; so the controller
also listens on :func:`signal.set_wakeup_fd` from a thread, which restores at once and, if the
main thread has not exited within a grace period, ends the process with 128 + the signal. A Slurm epilog that runs ``nvidia-smi -rgc; nvidia-smi -pl <default>``
remains the guard against SIGKILL (docs/energy.md).

``zeusd`` (Zeus's privileged daemon) is accepted by the gate's schema but not driven by this
version: a cell that would need it is skipped with that reason.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
    plan: Any = None  # a charllm.energy.freqplan.FrequencyPlan the job applies per instruction
    grace_s: float = 5.0  # after a signal's restore, how long the main thread may take to exit
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _wake: tuple[int, int] | None = None
    _prev_wake: int = -1

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
        if self._prev:
            self._start_watchdog()
        atexit.register(self.restore)
        self._installed = True

    def _start_watchdog(self) -> None:
        """Restore from a thread as soon as SIGTERM/SIGINT arrives (the main thread may be blocked in C)."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            self._prev_wake = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            os.close(r)
            os.close(w)
            return
        self._wake = (r, w)
        threading.Thread(target=self._watch, args=(r,), name="gpu-control-restore", daemon=True).start()

    def _watch(self, fd: int) -> None:
        wanted = {int(signal.SIGTERM), int(signal.SIGINT)}
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:  # uninstalled
                os.close(fd)
                return
            hit = [b for b in data if b in wanted]
            if hit:
                self.log(f"signal {hit[0]}: restoring GPU settings (watchdog)")
                self.restore()
                threading.Event().wait(self.grace_s)
                os._exit(128 + hit[0])  # the main thread did not exit by itself: blocked in a collective

    def uninstall(self) -> None:
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)
        self._prev.clear()
        if self._wake is not None:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(self._prev_wake)
            _r, w = self._wake
            os.close(w)  # the watchdog reads EOF, closes its end and ends
            self._wake = None
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
    def lock_clocks(self, mhz: int, force: bool = False) -> None:
        """Lock the SM clock of every device at ``mhz`` (min = max); ``force``: even if already there."""
        self._allow("clocks")
        if mhz == self._current_mhz and not force:
            return
        with self._lock:
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
        """A pre-instruction callback: one clock lock per instruction, at the plan's (instruction, micro batch).

        Set every time (not only on a change): a clock the driver or another tool moved is put back,
        and the call record is one lock per instruction. An instruction the plan lacks raises.
        """
        self._allow("clocks")

        def before(instruction: str, micro_batch: int) -> None:
            mhz = plan.get((instruction, micro_batch))
            if mhz is None:
                raise KeyError(f"the frequency plan has no clock for {instruction} of micro batch {micro_batch}")
            self.lock_clocks(mhz, force=True)

        return before

    def restore(self) -> None:
        """Put back every setting this controller changed (idempotent; errors are logged, not raised)."""
        with self._lock:
            self._restore()

    def _restore(self) -> None:
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
    return skip_reason(gate, req)


def job_control(
    extra: Mapping[str, Any], local_rank: int, log: Callable[[str], None] = print, folder: Any = None
) -> Any:
    """A context manager applying the cell's global clock / power limit on this rank's GPU, restoring after.

    It yields the :class:`GpuController` (``None`` when the cell asks for nothing). A cell with a
    ``frequency_plan`` gets the plan shipped beside its ``cell.json`` in ``folder``
    (:func:`charllm.energy.freqplan.load_job_plan`) as ``controller.plan``; the job's instruction
    recorder locks its clocks before every forward and backward (:func:`charllm.energy.recorder.maybe_attach`).
    """
    gate, req = request_of(extra)
    if not req.any:
        return contextlib.nullcontext()
    plan = None
    if req.frequency_plan is not None:
        from pathlib import Path

        from charllm.energy.freqplan import load_job_plan

        if folder is None:
            raise ValueError("frequency_plan: the job's folder holding frequency_plan.json is not known")
        plan = load_job_plan(Path(folder), req.frequency_plan)  # before any GPU setting changes

    @contextlib.contextmanager
    def ctl() -> Any:
        with GpuController(gate, (local_rank,), log=log, plan=plan) as c:
            apply_request(c, req)
            yield c

    return ctl()


def plan_job_file(cell: Any, home: Path) -> dict[str, str]:
    """``{"frequency_plan.json": text}`` for a cell whose allowed clock request names a plan; else ``{}``
    (the plan resolved under the results home ``home`` and checked against the cell's pipeline)."""
    import json

    from charllm.energy.freqplan import JOB_FILE, resolve

    extra = {"gpu_control": cell.gpu_control}
    if not extra["gpu_control"]:
        return {}
    gate, req = request_of(extra)
    if req.frequency_plan is None or skip_reason(gate, req) is not None:
        return {}  # nothing asked, or the job ends skipped without reading it
    plan = resolve(req.frequency_plan, home, cell.parallel.pp, cell.grad_accum)
    return {JOB_FILE: json.dumps(plan.to_json()) + "\n"}

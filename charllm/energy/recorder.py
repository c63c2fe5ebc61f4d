"""``profile: instructions``: time every forward and backward of every micro batch of a stage.

:class:`InstructionRecorder` wraps a ``torch.distributed.pipelining`` stage's
``forward_one_chunk`` and ``backward_one_chunk`` (one call per micro batch) and the schedule's
point-to-point waits. On a GPU each instruction is bracketed by CUDA events and converted to
host (unix) seconds against a reference event recorded right after a synchronize at the start
of the step, so the timeline lines up with the NVML energy counter sampled by the telemetry
thread (``energy_total_j`` at ``unix_s``); on CPU the host clock is read around each call.
The last stage's loss is part of its forward (as in Merak); the stage's gradient scaling after
its last backward is recorded apart (``reduce``, host-timed). The step window is the
schedule's ``step()``; ``busy`` (instructions) plus ``wait``
(point-to-point posts and waits, host-timed) should cover it, which the tests check.

Per rank it writes ``instructions-<rank>.csv`` (``step,micro_batch,instruction,start,end``),
``instruction_steps-<rank>.json`` (each step's window, waits, stage) and, on a GPU, the rank's
``stage_profile-<rank>.csv`` from its telemetry's energy counter (:mod:`.runprofile`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from charllm.energy.attribution import Instruction, write_timeline


class InstructionRecorder:
    def __init__(self, device: Any, stage: int, clock: Callable[[], float] = time.time) -> None:
        self.device, self.stage, self.clock = device, stage, clock
        self.cuda = getattr(device, "type", "cpu") == "cuda"
        self.rows: list[Instruction] = []
        self.steps: list[dict[str, Any]] = []
        self.before: Callable[[str, int], None] | None = None  # e.g. a frequency plan's clock lock
        self._step = -1
        self._pending: list[tuple[int, int, str, Any, Any]] = []
        self._waits: list[tuple[float, float]] = []
        self._reduce: list[tuple[float, float]] = []
        self._ref: Any = None
        self._ref_host = 0.0
        self._t0 = 0.0

    # -- one instruction -----------------------------------------------------------------
    @contextlib.contextmanager
    def instruction(self, name: str, micro_batch: int) -> Iterator[None]:
        if self.before is not None:
            self.before(name, micro_batch)
        if self.cuda:
            import torch

            ev0 = torch.cuda.Event(enable_timing=True)
            ev1 = torch.cuda.Event(enable_timing=True)
            ev0.record()
            yield
            ev1.record()
            self._pending.append((self._step, micro_batch, name, ev0, ev1))
        else:
            t0 = self.clock()
            yield
            self.rows.append(Instruction(self._step, micro_batch, name, t0, self.clock()))

    # -- one step ------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self._step = step
        self._waits = []
        self._reduce = []
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record()
            self._ref_host = self.clock()
            self._t0 = self._ref_host
        else:
            self._t0 = self.clock()

    def end_step(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            t1 = self.clock()
            for step, mb, name, ev0, ev1 in self._pending:
                start = self._ref_host + self._ref.elapsed_time(ev0) / 1e3
                end = self._ref_host + self._ref.elapsed_time(ev1) / 1e3
                self.rows.append(Instruction(step, mb, name, start, end))
            self._pending.clear()
        else:
            t1 = self.clock()
        self.steps.append(
            {"step": self._step, "start": self._t0, "end": t1, "waits": list(self._waits), "reduce": list(self._reduce)}
        )

    def _extend_last_forward(self) -> None:
        """Stretch the latest forward to now (the last stage computes its loss right after it)."""
        if self.cuda:
            if self._pending and self._pending[-1][2] == "forward":
                import torch

                step, mb, name, ev0, _ = self._pending[-1]
                ev1 = torch.cuda.Event(enable_timing=True)
                ev1.record()
                self._pending[-1] = (step, mb, name, ev0, ev1)
        elif self.rows and self.rows[-1].instruction == "forward" and self.rows[-1].step == self._step:
            r = self.rows[-1]
            self.rows[-1] = Instruction(r.step, r.micro_batch, r.instruction, r.start, self.clock())

    # -- attaching to a pipeline stage and schedule --------------------------------------
    def attach_stage(self, stage: Any) -> None:
        """Time ``stage.forward_one_chunk`` / ``backward_one_chunk`` (micro batch = their chunk id)."""
        fwd, bwd = stage.forward_one_chunk, stage.backward_one_chunk

        def forward_one_chunk(fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
            with self.instruction("forward", fwd_chunk_id):
                return fwd(fwd_chunk_id, *args, **kwargs)

        def backward_one_chunk(bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
            with self.instruction("backward", bwd_chunk_id):
                return bwd(bwd_chunk_id, *args, **kwargs)

        stage.forward_one_chunk = forward_one_chunk
        stage.backward_one_chunk = backward_one_chunk
        reduce = getattr(stage, "perform_reduce_grad", None)
        if reduce is not None:

            def perform_reduce_grad(*args: Any, **kwargs: Any) -> Any:  # gradient scaling after the last backward
                t0 = self.clock()
                try:
                    return reduce(*args, **kwargs)
                finally:
                    self._reduce.append((t0, self.clock()))

            stage.perform_reduce_grad = perform_reduce_grad

    @contextlib.contextmanager
    def timing_waits(self) -> Iterator[None]:
        """Host-time the pipeline schedule's point-to-point waits while inside the block."""
        from torch.distributed.pipelining import schedules

        orig_wait, orig_issue = schedules._wait_batch_p2p, schedules._batch_p2p

        def wait(work: Any) -> Any:
            t0 = self.clock()
            try:
                return orig_wait(work)
            finally:
                self._waits.append((t0, self.clock()))

        def issue(*args: Any, **kwargs: Any) -> Any:  # posting sends/receives (gloo copies here)
            t0 = self.clock()
            try:
                return orig_issue(*args, **kwargs)
            finally:
                self._waits.append((t0, self.clock()))

        schedules._wait_batch_p2p = wait  # type: ignore[assignment]
        schedules._batch_p2p = issue  # type: ignore[assignment]
        try:
            yield
        finally:
            schedules._wait_batch_p2p = orig_wait  # type: ignore[assignment]
            schedules._batch_p2p = orig_issue  # type: ignore[assignment]

    def wrap_engine(self, engine: Any) -> None:
        """Attach to a torch engine: its pipeline stage, and each ``engine.step`` as a step window."""
        schedule = getattr(engine, "schedule", None)
        if schedule is None:
            raise ValueError("profile: instructions needs a pipelined cell (pp > 1) in the torch engine")
        self.attach_stage(schedule._stage)
        inner = schedule.step

        def step(*args: Any, **kwargs: Any) -> Any:
            self.begin_step(self._next)
            try:
                with self.timing_waits():
                    return inner(*args, **kwargs)
            finally:
                self.end_step()

        schedule.step = step
        loss = schedule._maybe_compute_loss

        def maybe_compute_loss(*args: Any, **kwargs: Any) -> Any:  # the last stage's loss: part of its forward
            try:
                return loss(*args, **kwargs)
            finally:
                self._extend_last_forward()

        schedule._maybe_compute_loss = maybe_compute_loss
        outer = engine.step

        def engine_step(n: int) -> Any:
            self._next = n
            return outer(n)

        self._next = 0
        engine.step = engine_step

    # -- output --------------------------------------------------------------------------
    def write(self, out: Path, rank: int, extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
        """The timeline and step windows; on a GPU rank whose telemetry holds the energy counter,
        also ``stage_profile-<rank>.csv`` (its stage's rows, the first step left out)."""
        timeline = out / f"instructions-{rank}.csv"
        write_timeline(self.rows, timeline)
        meta = out / f"instruction_steps-{rank}.json"
        info: dict[str, Any] = {"rank": rank, "stage": self.stage, **(extra or {}), "steps": self.steps}
        meta.write_text(json.dumps(info) + "\n")
        tele = out / "telemetry" / f"rank{rank}.parquet"
        if self.cuda and tele.exists():
            from charllm.energy.attribution import stage_profile, write_stage_profile
            from charllm.energy.runprofile import rank_profile

            try:
                p = rank_profile(out, rank)
                rows = stage_profile(
                    (p["stage"], p["frequency"], r, e) for r, e in zip(p["rows"], p["energies"], strict=True)
                )
                write_stage_profile(rows, out / f"stage_profile-{rank}.csv")
            except (ValueError, KeyError, OSError, ImportError) as err:  # no counter on this GPU, too few steps
                info["stage_profile_error"] = str(err)
                meta.write_text(json.dumps(info) + "\n")
        return timeline, meta


def maybe_attach(engine: Any, cell: Any, device: Any, controller: Any = None) -> InstructionRecorder | None:
    """The recorder for a ``profile: instructions`` cell (``opt.profile_mode``) or a cell running a
    frequency plan (``controller.plan``: the controller locks this stage's clock before every
    forward and backward, at the plan's value), attached; else None."""
    plan = getattr(controller, "plan", None)
    if cell.opt.profile_mode != "instructions" and plan is None:
        return None
    stage = int(getattr(engine, "pp_rank", 0))
    rec = InstructionRecorder(device, stage)
    rec.wrap_engine(engine)
    if plan is not None:
        rec.before = controller.instruction_hook(plan.for_stage(stage))
    return rec

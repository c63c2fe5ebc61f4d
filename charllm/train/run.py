"""The training job: read a cell, train, measure, write DIR/result.json and friends.

Outputs in ``--out DIR`` (all written atomically):

- ``result.json`` (rank 0; on OOM, the rank that ran out):
  ``{"outcome", "error", "metrics", "provenance", "per_rank"}``
- ``steps.csv`` (rank 0): ``step,phase,start_unix_s,end_unix_s,duration_s,loss,tokens``
- ``telemetry/rank{R}.parquet`` (GPU runs, every rank); ``telemetry/node_rank{R}.parquet``
  (CPU runs: node CPU/memory only, no GPU columns invented)
- ``kernels_rank{R}.csv`` (``opt.profile``; one rank per pipeline stage)

Exit status: 0 ok, :data:`OOM_EXIT_CODE` (42) out of memory, 1 any other failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from charllm.outcomes import Outcome
from charllm.train import FAILED_EXIT_CODE, OOM_EXIT_CODE
from charllm.train.cell import CellSpec
from charllm.train.dist import DistEnv, detect, init_process_group, pick_device
from charllm.train.errors import LaunchError
from charllm.train.io import write_json_atomic, write_text_atomic
from charllm.train.metrics import (
    StepRecord,
    energy_metrics,
    flat_numbers,
    measure_window,
    step_metrics,
    steps_csv,
)
from charllm.train.oom import classify_exception
from charllm.train.warmup import WarmupMonitor

FLOP_FORMULA = "6*N_active*T + 12*L*h*s*T (N_active: matmul weights a token passes, output layer included)"
FLOP_FORMULA_CAUSAL = "6*N_active*T + 6*L*h*s*T (Megatron-Kwai's mfu_causal: attention halved for the causal mask)"


def _log(msg: str) -> None:
    print(msg, flush=True)


def build_engine(cell: CellSpec, denv: DistEnv, device: Any) -> Any:
    if cell.engine == "megatron":
        from charllm.train import engine_megatron

        return engine_megatron.build(cell, denv, device)
    if cell.engine == "nemo":
        from charllm.train import engine_nemo

        return engine_nemo.build(cell, denv, device)
    from charllm.train.engine_torch import TorchEngine

    return TorchEngine(cell, denv, device)


class Job:
    """One rank of one cell."""

    def __init__(self, cell: CellSpec, denv: DistEnv, out: Path) -> None:
        self.cell, self.denv, self.out = cell, denv, out
        self.rank = denv.rank
        self.started_unix_s = time.time()
        self.zeus_totals: dict[str, float] = {}
        self.zeus_note = "off"
        self.window_steps_s: list[float] = []  # measured steps' durations, max over ranks (same on all)
        self.window_record: dict[str, Any] = {"mode": "fixed"}
        # torch.cuda.max_memory_allocated right after the second step (Kwai's Figure 7 quantity)
        self.mem_step2: int | None = None
        self.gpu_controller: Any = None  # charllm.energy.control.GpuController when the cell changes GPU settings

    # ---- telemetry -----------------------------------------------------------------------
    def _start_sampler(self, device: Any) -> tuple[Any, Path, bool]:
        from charllm.telemetry import NodeSource, Sampler

        ident = {"host": socket.gethostname(), "rank": self.rank, "local_rank": self.denv.local_rank}
        if device.type == "cuda":
            from charllm.telemetry.nvml_source import NvmlSource, cuda_uuid_of

            uuid = cuda_uuid_of(device.index)
            gpu = NvmlSource(uuid=uuid) if uuid else NvmlSource(index=device.index)
            sampler = Sampler([gpu, NodeSource()], self.cell.telemetry_hz, ident, name=f"telemetry-r{self.rank}")
            path, is_gpu = self.out / "telemetry" / f"rank{self.rank}.parquet", True
        else:
            sampler = Sampler([NodeSource()], self.cell.telemetry_hz, ident, name=f"telemetry-r{self.rank}")
            path, is_gpu = self.out / "telemetry" / f"node_rank{self.rank}.parquet", False
        return sampler.start(), path, is_gpu

    def _temp_slope(self, sampler: Any, is_gpu: bool) -> float:
        from charllm.telemetry import temperature_slope_c_per_s

        if not is_gpu:
            return math.nan
        w = self.cell.warmup.temp_window_s
        ts, vs = sampler.recent("gpu_temp_c", w)
        return temperature_slope_c_per_s(ts, vs, min_span_s=0.8 * w)

    # ---- the run -----------------------------------------------------------------------
    def run(self) -> None:
        import torch
        import torch.distributed as dist

        cell, denv = self.cell, self.denv
        if cell.world_size != denv.world_size:
            raise LaunchError(
                f"cell wants world_size {cell.world_size} (tp*pp*dp*cp) but the launcher started {denv.world_size} ranks"
            )
        device = pick_device(cell.gpu_type, denv.local_rank)
        # the capability table the campaign validator used (charllm.capabilities), before any engine
        cell.check_engine(device.type)
        torch.manual_seed(cell.seed)
        if cell.opt.interconnect == "pcie":  # NCCL reads these when its communicators start
            from charllm.capabilities import PCIE_ENV

            os.environ.update(PCIE_ENV)
        init_process_group(denv, device)
        try:
            self._run(device)
        except BaseException:
            if denv.world_size == 1 and dist.is_initialized():
                dist.destroy_process_group()  # alone, teardown cannot hang on peers
            raise

    def _run(self, device: Any) -> None:
        import torch
        import torch.distributed as dist

        cell, denv = self.cell, self.denv
        engine = build_engine(cell, denv, device)
        from charllm.energy.recorder import maybe_attach

        recorder = maybe_attach(engine, cell, device, self.gpu_controller)  # profile: instructions, frequency plans
        if self.rank == 0:
            _log(
                f"[charllm.train] cell {cell.cell_id} {cell.name}: {cell.model.name} "
                f"tp{cell.parallel.tp} pp{cell.parallel.pp} dp{cell.parallel.dp} fsdp={cell.parallel.fsdp} "
                f"mb{cell.micro_batch} gb{cell.global_batch} seq{cell.seq_len} {cell.precision} "
                f"world {denv.world_size} on {device.type}; grad_sync {engine.grad_sync}, accum {engine.accum}"
            )
        sampler, tele_path, is_gpu = self._start_sampler(device)
        from charllm.telemetry.zeus_window import ZeusWindow

        zeus_window, self.zeus_note = ZeusWindow.create(
            cell.telemetry_zeus, device.index if device.type == "cuda" else None, denv.local_rank == 0
        )
        try:
            records = self._train(engine, sampler, is_gpu, zeus_window)
        finally:
            sampler.stop()
        sampler.write_parquet(tele_path)

        mem = {}
        if device.type == "cuda":
            mem = {
                "max_memory_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
                "max_memory_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
            }
            if self.mem_step2 is not None:
                mem["max_memory_allocated_step2_bytes"] = self.mem_step2
        window: list[Any] = [measure_window(records) if self.rank == 0 else None]
        dist.broadcast_object_list(window, src=0)
        t0, t1 = window[0]
        summary = None
        from charllm.telemetry import gpu_window_summary

        summary = gpu_window_summary(sampler.frame(), t0, t1)
        tele_info = {
            "errors_by_field": dict(getattr(sampler.sources[0], "errors_by_field", {})),
            "unsupported": sorted({u for s in sampler.sources for u in s.unsupported}),
            "power_source": getattr(sampler.sources[0], "power_source", None),
            "missed_ticks": sampler.missed_ticks,
            "rows": len(sampler.rows),
        }
        own_loop = not getattr(engine, "drives_loop", False)  # nemo: its trainer owns the steps
        if cell.opt.profile and own_loop:
            self._profile(engine, records[-1].step + 1, device)
        if cell.opt.profile_mode == "layers" and own_loop:  # charllm.train.layer_profile: per-layer costs
            import statistics

            from charllm.train.layer_profile import profile_in_job

            med = statistics.median(r.duration_s for r in records if r.phase == "measure")
            profile_in_job(engine, records[-1].step + 1 + cell.opt.profile_steps, cell.opt.profile_steps, self.out, med)
        if recorder is not None:
            recorder.write(self.out, self.rank, {"pp_partition": cell.parallel.pp_partition, "pp": cell.parallel.pp})

        from charllm.train.provenance import placement

        gpu_src = sampler.sources[0] if is_gpu else None
        mine = {
            "rank": self.rank,
            "summary": summary,
            "memory": mem,
            "telemetry": tele_info,
            "placement": placement(
                self.rank,
                denv.local_rank,
                device,
                getattr(gpu_src, "identity", {}),
                getattr(gpu_src, "info", {}),
            ),
            "engine": engine.describe(),
            "zeus": self.zeus_totals,
            "extra": engine.extra_metrics() if hasattr(engine, "extra_metrics") else {},
        }
        gathered: list[Any] = [None] * denv.world_size
        dist.all_gather_object(gathered, mine)
        if self.rank == 0:
            self._write_outputs(records, gathered, is_gpu, engine)
        dist.barrier()
        dist.destroy_process_group()

    def _train(self, engine: Any, sampler: Any, is_gpu: bool, zeus_window: Any = None) -> list[StepRecord]:
        import torch.distributed as dist

        if getattr(
            engine, "drives_loop", False
        ):  # engine nemo: NeMo's trainer runs the loop, a callback keeps the clock
            return list(engine.train(self, sampler, is_gpu, zeus_window))
        cell = self.cell
        wm = WarmupMonitor(cell.warmup)
        self.warmup = wm
        in_warmup = cell.warmup.max_steps > 0
        records: list[StepRecord] = []
        measured, step = 0, 0
        tokens = cell.tokens_per_step
        dist.barrier()
        if not in_warmup and zeus_window is not None:
            zeus_window.begin()
        prev_end = time.time()
        while True:
            t_start = prev_end
            loss_t = engine.step(step)
            engine.sync()
            local_s = time.time() - t_start
            if step == 1 and is_gpu:
                import torch

                self.mem_step2 = int(torch.cuda.max_memory_allocated())
            slope = self._temp_slope(sampler, is_gpu)
            loss, step_max_s, slope_max = engine.reduce_step_stats(loss_t, local_s, slope)
            t_end = time.time()
            phase = "warmup" if in_warmup else "measure"
            rec = StepRecord(step, phase, t_start, t_end, loss, tokens)
            records.append(rec)
            if self.rank == 0:
                _log(
                    f"step {step:5d} [{phase}] loss {loss:.4f} time {rec.duration_s:.4f} s "
                    f"tok/s {tokens / rec.duration_s:,.0f}"
                    + (f" dT/dt {slope_max:+.3f} C/s" if slope_max == slope_max and math.isfinite(slope_max) else "")
                )
            prev_end = t_end
            step += 1
            if in_warmup:
                if wm.update(step_max_s, slope_max):
                    in_warmup = False
                    if zeus_window is not None:
                        zeus_window.begin()
                    if self.rank == 0:
                        _log(f"warm-up over after {step} steps ({wm.reason}); measuring {cell.steps} steps")
            else:
                measured += 1
                window_done = self._window_done(step_max_s)  # also records the window's state
                if measured >= cell.steps or window_done:
                    if zeus_window is not None:
                        self.zeus_totals = zeus_window.end()
                    return records

    def _window_done(self, step_max_s: float) -> bool:
        """``opt.window: adaptive`` (:mod:`charllm.train.window`): every rank decides from the same numbers."""
        from charllm.train import window

        self.window_steps_s.append(step_max_s)
        dec = window.should_stop(self.window_steps_s, sum(self.window_steps_s), self.cell.steps)
        mode = self.cell.opt.window
        self.window_record = window.record(dec, mode)
        return mode == "adaptive" and dec.stop

    def _profile(self, engine: Any, first_step: int, device: Any) -> None:
        from torch.profiler import ProfilerActivity, profile

        from charllm.train.profiling import breakdown, events_from_profiler, to_csv, top_kernels

        on_gpu = device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        ctx: Any = profile(activities=acts) if engine.profiles else contextlib.nullcontext()
        with ctx as prof:
            for i in range(self.cell.opt.profile_steps):
                engine.step(first_step + i)
                engine.sync()
        if engine.profiles:
            events = events_from_profiler(prof, on_gpu)
            write_text_atomic(self.out / f"kernels_rank{self.rank}.csv", to_csv(breakdown(events)))
            write_text_atomic(self.out / f"kernels_top_rank{self.rank}.csv", top_kernels(events))

    def _write_outputs(
        self, records: list[StepRecord], gathered: Sequence[Mapping[str, Any]], is_gpu: bool, engine: Any
    ) -> None:
        from charllm.telemetry import combine
        from charllm.train.flops import peak_flops
        from charllm.train.provenance import gpu_topology, relevant_env, software

        cell = self.cell
        write_text_atomic(self.out / "steps.csv", steps_csv(records))
        metrics: dict[str, Any] = step_metrics(
            records,
            shape=cell.model,
            seq_len=cell.seq_len,
            global_batch=cell.global_batch,
            world_size=cell.world_size,
            gpu_type=cell.gpu_type,
            precision=cell.precision,
            recompute=cell.opt.recompute_granularity if cell.opt.recompute else "none",
        )
        metrics["warmup_converged"] = float(self.warmup.converged)
        summaries = [g["summary"] for g in gathered if g["summary"] is not None]
        tele = combine(summaries)
        if is_gpu:
            metrics.update(tele)
            metrics.update(
                energy_metrics(
                    tele,
                    measured_steps=int(metrics["measured_steps"]),
                    global_batch=cell.global_batch,
                    seq_len=cell.seq_len,
                    step_time_median_s=metrics["step_time_median_s"],
                )
            )
        else:
            for k in ("avg_cpu_util_pct", "peak_mem_used_bytes", "sampling_rate_min_hz", "telemetry_samples"):
                if k in tele:
                    metrics[f"node_{k}"] = tele[k]
        from charllm.telemetry.zeus_window import combine_zeus

        metrics.update(combine_zeus([g["zeus"] for g in gathered], metrics.get("energy_gpu_j")))
        mems = [g["memory"] for g in gathered]
        per_rank: dict[str, Any] = {}
        if any(mems):
            for key in ("max_memory_allocated_bytes", "max_memory_reserved_bytes", "max_memory_allocated_step2_bytes"):
                vals = [m.get(key) for m in mems]
                if all(v is None for v in vals):
                    continue
                per_rank[key] = vals
                metrics[key] = max(v for v in vals if v is not None)
        extras = [g.get("extra") or {} for g in gathered]
        for key in sorted({k for e in extras for k in e}):  # engine counters (offload): max over ranks
            vals = [e.get(key) for e in extras]
            per_rank[key] = vals
            metrics[key] = max(v for v in vals if v is not None)
        if is_gpu:
            per_rank["gpu"] = [{"rank": g["rank"], **(g["summary"] or {})} for g in gathered]
        metrics = flat_numbers(metrics)

        provenance: dict[str, Any] = {
            "cell": cell.as_dict(),
            "software": software(),
            "launcher": self.denv.launcher,
            "world_size": self.denv.world_size,
            "placement": [g["placement"] for g in gathered],
            "env": relevant_env(),
            "topology": gpu_topology() if is_gpu else None,
            "engine": gathered[0]["engine"],
            "warmup": self.warmup.record(),
            "measure_window_unix_s": list(measure_window(records)),
            "measure_window": self.window_record,
            "flops": {
                "formula": FLOP_FORMULA,
                "formula_causal": FLOP_FORMULA_CAUSAL,
                "peak_flops_per_gpu": peak_flops(cell.gpu_type, cell.precision),
                "peak_table": "charllm.train.flops.PEAK_FLOPS (dense bf16: h100 989e12, h200 989e12)",
            },
            "energy_basis": "sampled NVML board power (power_w, includes HBM); memory power reported separately",
            "telemetry": {
                "hz": cell.telemetry_hz,
                "gpu": is_gpu,
                "per_rank": [{"rank": g["rank"], **g["telemetry"]} for g in gathered],
                "zeus": self.zeus_note,
            },
            "started_unix_s": self.started_unix_s,
            "finished_unix_s": time.time(),
        }
        result = {
            "outcome": Outcome.OK,
            "error": None,
            "metrics": metrics,
            "provenance": provenance,
            "per_rank": per_rank,
        }
        write_json_atomic(self.out / "result.json", result)
        _log(
            f"[charllm.train] ok: step {metrics['step_time_median_s']:.4f} s median, "
            f"{metrics['tokens_per_s']:,.0f} tok/s"
            + (f", MFU {metrics['mfu']:.3f}" if "mfu" in metrics else "")
            + (f", {metrics['energy_per_step_j']:.1f} J/step" if "energy_per_step_j" in metrics else "")
        )


# ---- failure path ------------------------------------------------------------------------
def _existing_outcome(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text()).get("outcome"))
    except (OSError, ValueError, AttributeError):
        return None


def _fail(exc: BaseException, denv: DistEnv | None, out: Path, env: Mapping[str, str]) -> int:
    kind, detail = classify_exception(exc)
    rank = denv.rank if denv is not None else int(env.get("RANK", env.get("SLURM_PROCID", "0")) or 0)
    traceback.print_exception(exc, file=sys.stderr)
    path = out / "result.json"
    prov = {"rank": rank, "host": socket.gethostname(), "failed_unix_s": time.time()}
    existing = _existing_outcome(path)
    if kind is Outcome.OOM:
        oom = {"rank": rank, **detail}
        print(f"[charllm.train] rank {rank}: out of memory: {detail.get('message', '')}", file=sys.stderr, flush=True)
        if existing != Outcome.OOM:  # the first OOM wins; it replaces a failure it may have caused
            write_json_atomic(
                path,
                {
                    "outcome": Outcome.OOM,
                    "error": detail.get("message"),
                    "metrics": {},
                    "provenance": {**prov, "oom": oom},
                    "oom": oom,
                },
            )
        return OOM_EXIT_CODE
    # Any rank may report the first failure (rank 0 may be stuck in a collective meanwhile);
    # later failures, often consequences of the first, do not overwrite it.
    if existing is None:
        write_json_atomic(path, {"outcome": Outcome.FAILED, "error": str(detail), "metrics": {}, "provenance": prov})
    return FAILED_EXIT_CODE


def run(cell_path: str | Path, out_dir: str | Path, env: Mapping[str, str] | None = None) -> int:
    """Run one rank of the job; returns the process exit status."""
    env = os.environ if env is None else env
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    denv: DistEnv | None = None
    try:
        denv = detect(env)
        if denv.rank == 0:
            with contextlib.suppress(FileNotFoundError):
                (out / "result.json").unlink()  # stale result of an earlier attempt in this DIR
        cell = CellSpec.from_json(cell_path)
        from charllm.energy.control import job_control, job_skip_reason

        skip = job_skip_reason(cell.extra)  # GPU control the cluster's gate denies: skipped, never failed
        if skip is not None:
            if denv.rank == 0:
                write_json_atomic(out / "result.json", {"outcome": "skipped", "error": skip, "metrics": {}})
            _log(f"[charllm.train] cell skipped: {skip}")
            return 0
        # restores clocks/limits on every exit path; a frequency plan shipped beside cell.json goes with it
        with job_control(cell.extra, denv.local_rank, _log, Path(cell_path).parent) as ctl:
            job = Job(cell, denv, out)
            job.gpu_controller = ctl
            job.run()
        return 0
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        return _fail(exc, denv, out, env)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m charllm.train", description=__doc__.splitlines()[0])
    parser.add_argument("--cell", required=True, help="resolved cell JSON")
    parser.add_argument("--out", required=True, help="output directory (created)")
    args = parser.parse_args(argv)
    return run(args.cell, args.out)

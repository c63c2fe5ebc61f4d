"""``charllm plan --predict``: per cell the predicted memory, step time, MFU, energy and GPU-hours.

For every cell of a campaign: the worst rank's predicted peak memory (:mod:`charllm.predict.memory`)
against the card, the step time, MFU, power and energy per step (:mod:`charllm.predict.timing`,
with the layer profiles of ``--profiles DIR`` where one matches), and the job's predicted
GPU-hours: start-up, warm-up (:func:`charllm.predict.timing.warmup_steps`),
measured and profiled steps, times GPUs and repeats. A cell predicted to run out of memory costs
one failed start (:data:`charllm.predict.timing.OOM_JOB_S`).

The campaign's ``prune`` decides what the runner skips (:func:`pruned`):

- ``none``: nothing;
- ``oom``: cells predicted to run out of memory, except one canary per model (its predicted-OOM
  cell closest to fitting), which runs to confirm the prediction on the cluster;
- ``dominated``: also every cell that another cell differing only in its parallel layout (same
  model, GPU count, global, micro batch, sequence length and optimisation code) beats by
  :data:`DOMINANCE_MARGIN` in both predicted step time and energy per step. Each optimisation
  code and micro batch keeps its best layouts; a characterisation of layouts (Fig 4) loses
  its slow ones, so this is for campaigns that look for good configurations.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from charllm.predict import memory, timing
from charllm.predict.profile import ProfileSet

if TYPE_CHECKING:
    from charllm.campaign import Cell, LoadedCampaign

DOMINANCE_MARGIN = 0.10
NODE_STARTUP_S = 10.0  # each further node: rendezvous, NCCL communicators (assumed, not measured)
PROFILE_STEP_FACTOR = 2.0  # a step under torch.profiler (profile_kernels) takes about twice as long
PRUNE_MODES = ("none", "oom", "dominated")


@dataclass(frozen=True)
class CellPrediction:
    cell: Cell
    mem: memory.MemoryEstimate
    step: timing.StepEstimate
    gpu_hours: float  # predicted, if the cell runs
    limit_hours: float  # at the job's time limit (the old upper bound)
    refused: str  # why the cell cannot run at all ("" if it can)
    action: str = "run"  # run | canary | skip
    reason: str = ""

    @property
    def spent_hours(self) -> float:
        return 0.0 if self.action == "skip" or self.refused else self.gpu_hours


def _links(lc: LoadedCampaign, cell: Cell) -> timing.Links:
    cl = lc.cluster_for(cell)
    intra = cl.intra_node_gbyte_per_s or timing.DEFAULT_INTRA_GBYTE_S
    inter = cl.inter_node_gbit_per_s or timing.DEFAULT_INTER_GBIT_S
    return timing.Links(intra_gbyte_s=float(intra), inter_gbit_s=float(inter), gpus_per_node=cl.gpus_per_node)


def predict_cell(
    lc: LoadedCampaign, cell: Cell, profiles: ProfileSet | None = None, repeats: int | None = None
) -> CellPrediction:
    """The models' verdict on one cell (``action`` is ``run`` until :func:`apply_prune`)."""
    from charllm.backends.base import parse_time_limit

    camp = lc.campaign
    reps = repeats or camp.repeats
    q = memory.query_of_cell(cell)
    prof = None
    if profiles is not None:
        p = profiles.get(cell.gpu_type, q.tp, q.micro_batch)
        prof = p if p is not None and timing.usable(p, q) else None
    mem = memory.estimate(q, prof)
    step = timing.predict_step(q, profiles, _links(lc, cell))
    prof_steps = 0
    if cell.opt.get("profile"):
        prof_steps += int(PROFILE_STEP_FACTOR * 3)
    if cell.opt.get("profile_mode", "none") != "none":
        prof_steps += 4
    startup = timing.STARTUP_S + NODE_STARTUP_S * (cell.nodes - 1)
    if mem.oom:
        job_s = timing.OOM_JOB_S + NODE_STARTUP_S * (cell.nodes - 1)
    else:
        warm = timing.warmup_steps(step.step_s, camp.warmup.min_steps, camp.warmup.max_steps)
        job_s = timing.job_seconds(
            step.step_s, warm, camp.steps, prof_steps, bool(cell.opt.get("compile")), startup_s=startup
        )
    limit_s = parse_time_limit(lc.cluster_for(cell).time_limit)
    job_s = min(job_s, limit_s)  # the scheduler ends it there
    why = lc.refused.get(cell.cell_id)
    return CellPrediction(
        cell=cell,
        mem=mem,
        step=step,
        gpu_hours=timing.gpu_hours(job_s, cell.world_size, reps),
        limit_hours=timing.gpu_hours(limit_s, cell.world_size, reps),
        refused="; ".join(str(r) for r in why) if why else "",
    )


def apply_prune(preds: list[CellPrediction], mode: str) -> list[CellPrediction]:
    """Mark what ``mode`` skips, with the reason, and the canaries that run anyway."""
    if mode not in PRUNE_MODES:
        raise ValueError(f"prune must be one of {', '.join(PRUNE_MODES)}; got {mode!r}")
    out = list(preds)
    if mode == "none":
        return out
    from dataclasses import replace

    live = [p for p in out if not p.refused]
    canaries: dict[str, CellPrediction] = {}
    for p in live:
        if p.mem.oom:
            model = str(p.cell.model.get("name"))
            best = canaries.get(model)
            if best is None or p.mem.headroom > best.mem.headroom:
                canaries[model] = p
    canary_ids = {p.cell.cell_id for p in canaries.values()}
    result: list[CellPrediction] = []
    for p in out:
        if p.refused:
            result.append(p)
            continue
        if p.mem.oom:
            if p.cell.cell_id in canary_ids:
                result.append(
                    replace(p, action="canary", reason="predicted OOM; runs to confirm the memory model for its model")
                )
            else:
                need = p.mem.peak_bytes * (1 + memory.FRAGMENTATION) / memory.GIB
                cap = p.mem.capacity_bytes / memory.GIB
                result.append(
                    replace(p, action="skip", reason=f"predicted OOM: {need:.1f} GiB of {cap:.1f} GiB per rank")
                )
            continue
        result.append(p)
    if mode == "dominated":
        fits = [p for p in result if p.action == "run"]
        groups: dict[tuple[object, ...], list[CellPrediction]] = {}
        for p in fits:
            c = p.cell
            key = (c.model.get("name"), c.world_size, c.global_batch, c.seq_len, c.micro_batch, c.opt_code)
            groups.setdefault(key, []).append(p)
        dominated: dict[str, str] = {}
        m = 1 - DOMINANCE_MARGIN
        for members in groups.values():
            for p in members:
                for o in members:
                    if o is p:
                        continue
                    if o.step.step_s <= m * p.step.step_s and o.step.energy_per_step_j <= m * p.step.energy_per_step_j:
                        dominated[p.cell.cell_id] = (
                            f"dominated by {o.cell.name}: predicted {o.step.step_s:.2f} s vs {p.step.step_s:.2f} s, "
                            f"{o.step.energy_per_step_j / 1e3:.1f} kJ vs {p.step.energy_per_step_j / 1e3:.1f} kJ per step"
                        )
                        break
        result = [
            replace(p, action="skip", reason=dominated[p.cell.cell_id]) if p.cell.cell_id in dominated else p
            for p in result
        ]
    return result


def predict_campaign(
    lc: LoadedCampaign,
    profiles: ProfileSet | None = None,
    prune: str | None = None,
    pattern: str | None = None,
    repeats: int | None = None,
) -> list[CellPrediction]:
    """Every selected cell's prediction, pruned by ``prune`` (default: the campaign's ``prune``)."""
    mode = prune or lc.campaign.prune
    cells = lc.select(pattern)
    return apply_prune([predict_cell(lc, c, profiles, repeats) for c in cells], mode)


def pruned(lc: LoadedCampaign, profiles: ProfileSet | None = None) -> dict[str, str]:
    """Cell id -> why the campaign's ``prune`` skips it (what the runner leaves out)."""
    return {p.cell.cell_id: p.reason for p in predict_campaign(lc, profiles) if p.action == "skip"}


def totals(preds: list[CellPrediction]) -> dict[str, float]:
    live = [p for p in preds if not p.refused]
    return {
        "cells": float(len(preds)),
        "runnable": float(len(live)),
        "predicted_oom": float(sum(1 for p in live if p.mem.oom)),
        "skipped": float(sum(1 for p in live if p.action == "skip")),
        "canaries": float(sum(1 for p in live if p.action == "canary")),
        "gpu_hours": sum(p.spent_hours for p in live),
        "gpu_hours_unpruned": sum(p.gpu_hours for p in live),
        "limit_hours": sum(p.limit_hours for p in live),
    }


def format_table(preds: list[CellPrediction]) -> str:
    head = f"{'cell':<52} {'gpus':>4} {'mem/rank GiB':>12} {'step s':>8} {'MFU':>5} {'kJ/step':>8} {'GPU-h':>7} {'time':>8}  action"
    lines = [head]
    for p in preds:
        c = p.cell
        if p.refused:
            lines.append(
                f"{c.name:<52} {c.world_size:>4} {'-':>12} {'-':>8} {'-':>5} {'-':>8} {'-':>7}  refused: {p.refused}"
            )
            continue
        mem = f"{p.mem.peak_bytes / memory.GIB:.1f}{'!' if p.mem.oom else ''}"
        mfu = f"{p.step.mfu:.2f}" if p.step.mfu == p.step.mfu else "-"
        act = p.action + (" (OOM)" if p.mem.oom and p.action == "run" else "")
        lines.append(
            f"{c.name:<52} {c.world_size:>4} {mem:>12} {p.step.step_s:>8.2f} {mfu:>5} "
            f"{p.step.energy_per_step_j / 1e3:>8.1f} {p.spent_hours:>7.2f} {p.step.source:>8}  {act}"
            + (f": {p.reason}" if p.reason else "")
        )
    return "\n".join(lines)


def add_plan_flags(parser: argparse.ArgumentParser) -> None:
    """``charllm plan --predict [--profiles DIR] [--prune MODE]``."""
    parser.add_argument("--predict", action="store_true", help="predict memory, step time, energy and GPU-hours")
    parser.add_argument("--profiles", default=None, help="folder of layer profiles ({gpu}_tp{tp}_mb{mb}.json)")
    parser.add_argument("--prune", default=None, choices=PRUNE_MODES, help="override the campaign's prune")


def cmd_plan_predict(args: argparse.Namespace) -> int:
    from charllm.campaign import load_campaign

    lc = load_campaign(args.file, check=False)
    profiles = ProfileSet.load(Path(args.profiles)) if args.profiles else None
    preds = predict_campaign(lc, profiles, args.prune, args.cells, args.repeats)
    print(format_table(preds))
    t = totals(preds)
    mode = args.prune or lc.campaign.prune
    print(
        f"{int(t['runnable'])} of {int(t['cells'])} cells runnable; {int(t['predicted_oom'])} predicted out of memory; "
        f"prune {mode}: {int(t['skipped'])} skipped, {int(t['canaries'])} canaries"
    )
    print(
        f"predicted GPU-hours: {t['gpu_hours']:.1f} (without pruning {t['gpu_hours_unpruned']:.1f}; "
        f"at the job time limits {t['limit_hours']:.1f})"
    )
    return 0

"""Kernel-time breakdown by category from a torch.profiler run (PPT's figures 10 and 15).

On GPU the device time of each CUDA kernel is classified by its name; on CPU (tests) the
self CPU time of each operator is, since there are no kernels. Categories: matmul,
attention, all-reduce, reduce-scatter, all-gather, send/recv, other.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

CATEGORIES = ("matmul", "attention", "all-reduce", "reduce-scatter", "all-gather", "send/recv", "other")

_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("all-reduce", re.compile(r"allreduce|all_reduce", re.I)),
    ("reduce-scatter", re.compile(r"reducescatter|reduce_scatter", re.I)),
    ("all-gather", re.compile(r"allgather|all_gather", re.I)),
    (
        "send/recv",
        re.compile(
            r"sendrecv|ncclDevKernel_Send|ncclDevKernel_Recv|\bsend\b|\brecv\b|isend|irecv|c10d::send|c10d::recv_", re.I
        ),
    ),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|scaled_dot_product", re.I)),
    (
        "matmul",
        re.compile(
            r"gemm|cutlass|xmma|nvjet|cublas|matmul|aten::mm\b|aten::addmm|aten::bmm|aten::baddbmm|aten::linear|_scaled_mm|\bwgmma|sm90_",
            re.I,
        ),
    ),
)


def categorise(name: str) -> str:
    for cat, pat in _RULES:
        if pat.search(name):
            return cat
    return "other"


def breakdown(events: Iterable[tuple[str, float, int]]) -> list[dict[str, Any]]:
    """Rows (category, time_s, fraction, count) from (name, seconds, count) triples."""
    totals = {c: 0.0 for c in CATEGORIES}
    counts = {c: 0 for c in CATEGORIES}
    for name, secs, count in events:
        cat = categorise(name)
        totals[cat] += secs
        counts[cat] += count
    grand = sum(totals.values()) or 1.0
    return [{"category": c, "time_s": totals[c], "fraction": totals[c] / grand, "count": counts[c]} for c in CATEGORIES]


def events_from_profiler(prof: Any, on_gpu: bool) -> list[tuple[str, float, int]]:
    """(name, seconds, count) per kernel (GPU) or per leaf CPU op (CPU) from a finished profiler."""
    out = []
    for ev in prof.key_averages():
        if on_gpu:
            # kernels are the events with device time of their own
            secs = getattr(ev, "self_device_time_total", getattr(ev, "self_cuda_time_total", 0.0)) / 1e6
            if secs <= 0 or getattr(ev, "device_type", None) is None:
                continue
            if str(getattr(ev, "device_type", "")).endswith("CPU"):
                continue
        else:
            secs = ev.self_cpu_time_total / 1e6
            if secs <= 0:
                continue
        out.append((ev.key, secs, int(ev.count)))
    return out


def to_csv(rows: list[dict[str, Any]]) -> str:
    lines = ["category,time_s,fraction,count"]
    lines += [f"{r['category']},{r['time_s']:.6f},{r['fraction']:.6f},{r['count']}" for r in rows]
    return "\n".join(lines) + "\n"


def top_kernels(events: Iterable[tuple[str, float, int]], n: int = 30) -> str:
    """CSV of the ``n`` most expensive kernels/ops: name, category, time_s, count."""
    rows = sorted(events, key=lambda e: -e[1])[:n]
    lines = ["name,category,time_s,count"]
    for name, secs, count in rows:
        clean = name.replace('"', "'")
        lines.append(f'"{clean[:200]}",{categorise(name)},{secs:.6f},{count}')
    return "\n".join(lines) + "\n"

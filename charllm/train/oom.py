"""Tell an out-of-memory failure (an expected outcome of a cell) from any other failure."""

from __future__ import annotations

import re
from typing import Any

from charllm.outcomes import Outcome

_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4, "bytes": 1}

# The caching allocator's message, e.g. "CUDA out of memory. Tried to allocate 20.00 GiB.
# GPU 0 has a total capacity of 79.19 GiB of which 3.06 GiB is free. ..."
_OOM_PATTERNS = (
    re.compile(r"CUDA out of memory", re.I),
    re.compile(r"CUDA error: out of memory", re.I),
    re.compile(r"CUBLAS_STATUS_ALLOC_FAILED"),
    re.compile(r"cuDNN error: CUDNN_STATUS_(NOT_SUPPORTED|ALLOC_FAILED)\b.*memory", re.I),
    re.compile(r"NCCL.*(Failed to CUDA calloc|cudaMalloc.*out of memory|out of memory)", re.I | re.S),
)
_TRIED = re.compile(r"Tried to allocate ([\d.]+) ?(B|KiB|MiB|GiB|TiB|bytes)")
_GPU = re.compile(
    r"GPU (\d+) has a total capacity of ([\d.]+) ?(B|KiB|MiB|GiB|TiB) of which ([\d.]+) ?(B|KiB|MiB|GiB|TiB) is free"
)


def _bytes(num: str, unit: str) -> int:
    return round(float(num) * _UNITS[unit])


def parse_oom_message(text: str) -> dict[str, Any]:
    """Numbers in an allocator OOM message: attempted bytes, device, capacity, free bytes."""
    out: dict[str, Any] = {"message": text.strip().splitlines()[0][:500] if text.strip() else ""}
    if m := _TRIED.search(text):
        out["attempted_alloc_bytes"] = _bytes(m.group(1), m.group(2))
    if m := _GPU.search(text):
        out["gpu"] = int(m.group(1))
        out["total_capacity_bytes"] = _bytes(m.group(2), m.group(3))
        out["free_bytes"] = _bytes(m.group(4), m.group(5))
    return out


def classify_exception(exc: BaseException) -> tuple[Outcome, Any]:
    """``(Outcome.OOM, detail dict)`` for a device out-of-memory error, else ``(Outcome.FAILED, text)``."""
    text = f"{type(exc).__name__}: {exc}"
    oom_type = False
    try:
        import torch

        oom_type = isinstance(exc, torch.OutOfMemoryError)
    except ImportError:
        pass
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:  # the cause may be wrapped (e.g. by a schedule)
        seen.append(cur)
        msg = str(cur)
        if oom_type or any(p.search(msg) for p in _OOM_PATTERNS):
            return Outcome.OOM, parse_oom_message(msg)
        cur = cur.__cause__ or cur.__context__
    return Outcome.FAILED, text

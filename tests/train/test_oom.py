"""OOM classification on messages recorded on GPUs (tests/data/gpu/oom is from an H100)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from charllm.train.oom import classify_exception, parse_oom_message

DATA = Path(__file__).resolve().parents[1] / "data" / "gpu" / "oom"
RECORDED = (DATA / "oom_message.txt").read_text().split(": ", 1)[1].strip()


def test_recorded_h100_oom_is_oom_with_numbers() -> None:
    kind, detail = classify_exception(torch.OutOfMemoryError(RECORDED))
    assert kind == "oom"
    assert detail["attempted_alloc_bytes"] == 1024 * 2**20
    assert detail["gpu"] == 0
    assert detail["total_capacity_bytes"] == round(79.18 * 2**30)
    assert detail["free_bytes"] == round(650.56 * 2**20)
    assert detail["message"].startswith("CUDA out of memory. Tried to allocate 1024.00 MiB")


def test_recorded_message_as_runtime_error_text() -> None:
    # some wrappers re-raise the allocator's message as a plain RuntimeError
    kind, detail = classify_exception(RuntimeError(RECORDED))
    assert kind == "oom" and detail["attempted_alloc_bytes"] == 2**30


def test_wrapped_cause_is_found() -> None:
    try:
        try:
            raise torch.OutOfMemoryError(RECORDED)
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("pipeline stage 1 failed") from inner
    except RuntimeError as outer:
        kind, _ = classify_exception(outer)
    assert kind == "oom"


def test_nccl_and_cublas_allocation_failures() -> None:
    assert (
        classify_exception(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))[0] == "oom"
    )
    nccl = "NCCL error in: ProcessGroupNCCL.cpp:1935, unhandled cuda error, NCCL version 2.27.3\nFailed to CUDA calloc 4194304 bytes"
    assert classify_exception(RuntimeError(nccl))[0] == "oom"


def test_other_errors_fail_with_text() -> None:
    kind, text = classify_exception(ValueError("shapes (2,3) and (4,5) not aligned"))
    assert kind == "failed"
    assert text == "ValueError: shapes (2,3) and (4,5) not aligned"


def test_recorded_result_json_of_the_oom_run() -> None:
    res = json.loads((DATA / "result.json").read_text())
    assert res["outcome"] == "oom" and res["metrics"] == {}
    assert res["oom"]["rank"] == 0 and res["oom"]["attempted_alloc_bytes"] == 2**30


def test_parse_units() -> None:
    d = parse_oom_message(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 3 has a total capacity of 139.81 GiB of which 12.5 MiB is free."
    )
    assert d["attempted_alloc_bytes"] == 20 * 2**30 and d["gpu"] == 3

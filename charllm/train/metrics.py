"""Numbers of result.json from step records and telemetry summaries (pure, no torch).

Definitions (units in the names):

- step_time_{median,p10,p90}_s over the measured steps; each step's duration runs from the
  end of the previous step to the end of this one, so the durations tile the window that
  the energy is integrated over.
- tokens_per_s = global_batch * seq_len / step_time_median_s; per GPU: / world size.
- samples_per_s = global_batch / step_time_median_s.
- mfu = model_flops_per_token * tokens_per_s / (world * peak); hfu likewise with hardware
  FLOPs (only when recomputing). See :mod:`charllm.train.flops` for the formula.
- mfu_causal: Megatron-Kwai's MFU, the attention FLOPs halved for the causal mask
  (``causal_model_flops_per_token`` = 6 N + 6 L h s instead of 6 N + 12 L h s).
- max_memory_allocated_step2_bytes: ``torch.cuda.max_memory_allocated`` read right after the
  second training step (Kwai's Figure 7 quantity: the optimizer states exist from the end of
  the first step on), the maximum over ranks; max_memory_allocated_bytes is the same at the end.
- offload_bytes_per_step / offload_host_pinned_bytes (cells with ``offload_alpha`` > 0):
  activation bytes copied to host memory per optimizer step, and the pinned host pool, the
  maximum over ranks (written by the engine's activation offload).
- energy_j: energy of all GPUs over the measured window, from the sampled board power
  ``power_w`` (trapezoid). NVML's board power covers the HBM as well; memory power is also
  reported on its own (``energy_mem_j``), not added again. energy_per_step_j = energy_j /
  measured steps; energy_per_token_j = energy_j / measured tokens.
- efficiency_samples_per_s_mj = samples per step / (step_time_median_s * energy_per_step_j / 1e6)
  (PPT's efficiency: samples / (s * MJ)); energy_counter_over_sampled = NVML's energy counter
  over the sampled energy. Both defined once in :mod:`charllm.definitions` (the aggregation
  recomputes them with the same functions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from charllm.definitions import counter_over_sampled, efficiency_samples_per_s_mj, measured_window
from charllm.modelcat import ModelShape
from charllm.train.flops import (
    causal_model_flops_per_token,
    hardware_flops_per_token,
    model_flops_per_token,
    peak_flops,
    utilisation,
)

STEP_COLUMNS = ("step", "phase", "start_unix_s", "end_unix_s", "duration_s", "loss", "tokens")


@dataclass(frozen=True)
class StepRecord:
    step: int
    phase: str  # warmup | measure
    start_unix_s: float
    end_unix_s: float
    loss: float
    tokens: int

    @property
    def duration_s(self) -> float:
        return self.end_unix_s - self.start_unix_s


def steps_csv(records: Sequence[StepRecord]) -> str:
    lines = [",".join(STEP_COLUMNS)]
    for r in records:
        lines.append(
            f"{r.step},{r.phase},{r.start_unix_s:.6f},{r.end_unix_s:.6f},{r.duration_s:.6f},{r.loss:.6f},{r.tokens}"
        )
    return "\n".join(lines) + "\n"


def measure_window(records: Sequence[StepRecord]) -> tuple[float, float]:
    """The measured window of the job's steps (:func:`charllm.definitions.measured_window`)."""
    win = measured_window((r.phase, r.start_unix_s, r.end_unix_s) for r in records)
    if win is None:
        raise ValueError("no measured steps")
    return win[0], win[1]


def step_metrics(
    records: Sequence[StepRecord],
    *,
    shape: ModelShape,
    seq_len: int,
    global_batch: int,
    world_size: int,
    gpu_type: str,
    precision: str,
    recompute: bool | str,
) -> dict[str, float]:
    meas = [r for r in records if r.phase == "measure"]
    if not meas:
        raise ValueError("no measured steps")
    d = np.array([r.duration_s for r in meas], float)
    med = float(np.median(d))
    tokens_per_step = global_batch * seq_len
    out: dict[str, float] = {
        "measured_steps": float(len(meas)),
        "warmup_steps": float(sum(1 for r in records if r.phase == "warmup")),
        "step_time_median_s": med,
        "step_time_mean_s": float(d.mean()),
        "step_time_p10_s": float(np.percentile(d, 10)),
        "step_time_p90_s": float(np.percentile(d, 90)),
        "tokens_per_step": float(tokens_per_step),
        "tokens_per_s": tokens_per_step / med,
        "tokens_per_s_per_gpu": tokens_per_step / med / world_size,
        "samples_per_s": global_batch / med,
        "loss_first": records[0].loss,
        "loss_last": records[-1].loss,
        "model_flops_per_token": model_flops_per_token(shape, seq_len),
        "causal_model_flops_per_token": causal_model_flops_per_token(shape, seq_len),
    }
    peak = peak_flops(gpu_type, precision)
    mfu = utilisation(out["model_flops_per_token"], out["tokens_per_s"], world_size, peak)
    if mfu is not None:
        out["mfu"] = mfu
        out["mfu_causal"] = float(
            utilisation(out["causal_model_flops_per_token"], out["tokens_per_s"], world_size, peak) or 0.0
        )
        out["peak_flops_per_gpu"] = float(peak or 0.0)
    if recompute not in (False, "none"):
        hf = hardware_flops_per_token(shape, seq_len, recompute=recompute)
        out["hardware_flops_per_token"] = hf
        hfu = utilisation(hf, out["tokens_per_s"], world_size, peak)
        if hfu is not None:
            out["hfu"] = hfu
    return out


def energy_metrics(
    telemetry: Mapping[str, float], *, measured_steps: int, global_batch: int, seq_len: int, step_time_median_s: float
) -> dict[str, float]:
    """Per-step/per-token energy and efficiency from :func:`charllm.telemetry.combine` output."""
    e = telemetry.get("energy_gpu_j", math.nan)
    out: dict[str, float] = {}
    if e != e or measured_steps < 1:
        return out
    out["energy_j"] = e
    out["energy_per_step_j"] = e / measured_steps
    out["energy_per_token_j"] = e / (measured_steps * global_batch * seq_len)
    out["efficiency_samples_per_s_mj"] = efficiency_samples_per_s_mj(
        global_batch, step_time_median_s, out["energy_per_step_j"]
    )
    ratio = counter_over_sampled(telemetry.get("energy_counter_j", math.nan), e)
    if not math.isnan(ratio):
        out["energy_counter_over_sampled"] = ratio
    return out


def flat_numbers(d: Mapping[str, Any]) -> dict[str, float]:
    """Keep the finite numbers of ``d`` (result.json metrics are flat name -> number)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(v)):
            out[k] = float(v)
    return out

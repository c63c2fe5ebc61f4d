"""Where this process sits in the job: rank, world size, local rank, device, process groups.

The job is started as one process, by ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK) or by
``srun`` (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID with MASTER_ADDR/MASTER_PORT exported by
the batch script). :func:`detect` is pure over an environment mapping, so it is tested
without a launcher.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from charllm.train.errors import LaunchError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # single | torchrun | slurm
    master_addr: str | None = None
    master_port: int | None = None
    host: str = ""


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as err:
        raise LaunchError(f"environment variable {key}={env[key]!r} is not an integer") from err


def detect(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank and rendezvous from torchrun's variables, else Slurm's, else one process."""
    env = os.environ if env is None else env
    host = socket.gethostname()
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher = "slurm"
    else:
        return DistEnv(0, 1, 0, "single", host=host)
    if not 0 <= rank < world:
        raise LaunchError(f"rank {rank} is outside world size {world}")
    addr = env.get("MASTER_ADDR")
    port = env.get("MASTER_PORT")
    if world > 1 and (not addr or not port):
        raise LaunchError(
            f"{launcher} launch with {world} ranks needs MASTER_ADDR and MASTER_PORT in the environment "
            "(the sbatch script exports them, e.g. the first host of SLURM_JOB_NODELIST and a free port)"
        )
    return DistEnv(rank, world, local, launcher, addr, int(port) if port else None, host)


def init_process_group(denv: DistEnv, device: torch.device, timeout_s: float = 600.0) -> None:
    """Start torch.distributed: NCCL on GPU, gloo on CPU; a one-rank in-memory group when alone."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # binds NCCL to this GPU up front (eager communicator init)
    if denv.world_size == 1:
        # alone, whatever launched it (a one-task Slurm step sets SLURM_NTASKS=1): an in-memory
        # store, no TCP port that two one-rank jobs sharing a node would fight over
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **kwargs)
        return
    os.environ.setdefault("MASTER_ADDR", denv.master_addr or "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(denv.master_port or 29500))
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=denv.rank,
        world_size=denv.world_size,
        timeout=timeout,
        **kwargs,
    )


def pick_device(gpu_type: str, local_rank: int) -> torch.device:
    """The GPU this rank drives (``cuda:LOCAL_RANK``), or the CPU for ``gpu_type: cpu``."""
    import torch

    if gpu_type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError(f"cell asks for gpu_type {gpu_type!r} but torch sees no CUDA device")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise LaunchError(f"local rank {local_rank} but only {n} visible GPUs (CUDA_VISIBLE_DEVICES?)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def reduce_step_stats(
    loss: torch.Tensor, step_time_s: float, temp_slope: float, reports_loss: bool, device: torch.device
) -> tuple[float, float, float]:
    """(mean loss over the reporting ranks, max step time over ranks, max |temp slope| over GPUs).

    Every rank gets the same three numbers, so warm-up decisions agree without a broadcast.
    A NaN slope (no telemetry) travels as -1. Both engines call this once per step.
    """
    import torch
    import torch.distributed as dist

    rep = 1.0 if reports_loss else 0.0
    a = torch.stack([loss.float() * rep, torch.tensor(rep, device=device)])
    dist.all_reduce(a, op=dist.ReduceOp.SUM)
    slope = -1.0 if temp_slope != temp_slope else min(abs(temp_slope), 1e30)
    b = torch.tensor([step_time_s, slope], device=device, dtype=torch.float64)
    dist.all_reduce(b, op=dist.ReduceOp.MAX)
    la, lb = a.tolist(), b.tolist()
    mean_loss = la[0] / la[1] if la[1] else float("nan")
    return mean_loss, lb[0], (float("nan") if lb[1] < 0 else lb[1])

"""What ran where: versions, GPUs, rank placement and the relevant environment."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import sys
from collections.abc import Mapping
from typing import Any

_ENV_PREFIXES = ("SLURM_", "NCCL_", "TORCH_NCCL_", "CUDA_", "OMP_", "PYTORCH_", "TORCHINDUCTOR_")
_ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def relevant_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if env is None else env
    return {k: v for k, v in sorted(env.items()) if k.startswith(_ENV_PREFIXES) or k in _ENV_KEYS}


def software() -> dict[str, Any]:
    """Versions of python, torch, CUDA, NCCL, the driver (via NVML), charllm."""
    import torch

    import charllm

    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "charllm": getattr(charllm, "__version__", ""),
    }
    for key, dist_name in (("zeus", "zeus"), ("megatron_core", "megatron-core"), ("nvidia_ml_py", "nvidia-ml-py")):
        try:  # installed distributions, read without importing them
            out[key] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    if torch.cuda.is_available():
        try:
            v = torch.cuda.nccl.version()
            out["nccl"] = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
        except (RuntimeError, AttributeError):
            out["nccl"] = None
        out["cudnn"] = torch.backends.cudnn.version()
        from charllm.telemetry.nvml_source import driver_versions

        out.update(driver_versions())
    return out


def gpu_topology(timeout_s: float = 20.0) -> dict[str, Any]:
    """``nvidia-smi topo -m`` (the GPU/NIC link matrix: NV#, PIX, PHB, SYS...) as text, or why not."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"matrix": None, "error": "nvidia-smi not found"}
    try:
        p = subprocess.run([exe, "topo", "-m"], capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        return {"matrix": None, "error": str(err)}
    if p.returncode != 0:
        return {"matrix": None, "error": (p.stderr or p.stdout).strip()[-500:]}
    return {"matrix": p.stdout, "error": None}


def placement(
    rank: int, local_rank: int, device: Any, gpu_identity: Mapping[str, Any], gpu_info: Mapping[str, Any]
) -> dict[str, Any]:
    """This rank's host and GPU (gathered over ranks by the caller)."""
    import torch

    row: dict[str, Any] = {
        "rank": rank,
        "local_rank": local_rank,
        "host": socket.gethostname(),
        "device": str(device),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
    }
    if getattr(device, "type", "cpu") == "cuda":
        row["gpu_name"] = torch.cuda.get_device_name(device)
    row.update(gpu_identity)
    row.update(gpu_info)
    return row

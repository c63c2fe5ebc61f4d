"""Rank and rendezvous from torchrun's or Slurm's variables (pure over a mapping)."""

from __future__ import annotations

import pytest

from charllm.train.dist import detect
from charllm.train.errors import LaunchError


def test_single_process() -> None:
    d = detect({})
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (0, 1, 0, "single")


def test_torchrun_variables() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    d = detect(env)
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (3, 8, 3, "torchrun")
    assert (d.master_addr, d.master_port) == ("n1", 29500)


def test_torchrun_wins_over_slurm() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "a", "MASTER_PORT": "1",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}  # fmt: skip
    assert detect(env).launcher == "torchrun"


def test_srun_variables() -> None:
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "MASTER_ADDR": "gpu-a01",
           "MASTER_PORT": "29511"}  # fmt: skip
    d = detect(env)
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (9, 16, 1, "slurm")


def test_srun_without_master_is_a_clear_error() -> None:
    with pytest.raises(LaunchError, match="MASTER_ADDR and MASTER_PORT"):
        detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"})


def test_bad_numbers() -> None:
    with pytest.raises(LaunchError, match="not an integer"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="outside world size"):
        detect({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})


def test_one_task_slurm_job_takes_no_tcp_port(monkeypatch):
    """Two one-rank Slurm jobs on a node once both bound 29500 (EADDRINUSE): alone means no port."""
    import socket

    import torch
    import torch.distributed as dist

    from charllm.train.dist import detect, init_process_group

    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    denv = detect(env)
    assert (denv.launcher, denv.world_size, denv.master_port) == ("slurm", 1, None)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with socket.socket() as busy:  # another job holds the default port
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 29500))
            busy.listen()
        except OSError:
            pass  # already taken by someone else: the same situation
        init_process_group(denv, torch.device("cpu"), timeout_s=10)
        try:
            assert dist.get_world_size() == 1
        finally:
            dist.destroy_process_group()

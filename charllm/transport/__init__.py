"""How the orchestrator reaches a cluster's login node: a shell there, and its files.

A :class:`~charllm.transport.base.Transport` runs a command line (once, or with retries),
runs one on an event loop, writes files, lists a tree of files and reads a file (or its
tail). Two exist: :class:`~charllm.transport.ssh.SSHTransport` (an Airflow SSH connection;
paramiko for the synchronous calls, asyncssh for triggers) and
:class:`~charllm.transport.local.LocalShellTransport` (bash and files on this machine: Airflow
running on the login node itself, and the tests' fake scheduler). Schedulers
(:mod:`charllm.backends.slurm`) speak through one and never see SSH.
"""

from __future__ import annotations

from typing import Any

from charllm.errors import ConfigError
from charllm.transport.base import Backoff, Transport

__all__ = ["Backoff", "Transport", "make_transport"]


def make_transport(kind: str, **options: Any) -> Transport:
    """``"ssh"`` (options: ``conn_id``, timeouts, ``backoff``) or ``"local"`` (``home``, ``env``, ...)."""
    if kind == "ssh":
        from charllm.transport.ssh import SSHTransport

        return SSHTransport(**options)
    if kind == "local":
        from charllm.transport.local import LocalShellTransport

        options.pop("conn_id", None)
        options.pop("connect_timeout_s", None)
        return LocalShellTransport(**options)
    raise ConfigError("<backend spec>", "transport", f"{kind!r} is not 'ssh' or 'local'")

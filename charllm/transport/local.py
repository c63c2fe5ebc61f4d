"""The local-shell transport: bash and files on this machine.

For Airflow running on the cluster's login node itself (``transport: local`` in the Slurm
backend's spec, or ``CHARLLM_SLURM_TRANSPORT=local``): the Slurm commands of this machine,
job folders read and written in place. The tests run the Slurm backend on it with a fake
``sbatch``/``sacct``/``squeue`` on ``PATH`` (``tests/fake_slurm``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from charllm.transport.base import Transport


class LocalShellTransport(Transport):
    """Command lines in ``bash -c`` from ``home`` (default ``$HOME``); relative paths are under ``home``."""

    where = "localhost"

    def __init__(
        self,
        home: str | Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        command_timeout_s: float = 120.0,
        **retry: Any,
    ) -> None:
        """``retry``: the :class:`Transport` options (``backoff``, ``sleep``, ``asleep``)."""
        super().__init__(**retry)
        self.home = str(home) if home is not None else os.path.expanduser("~")
        self.env = dict(env) if env is not None else None  # None: this process's environment
        self.command_timeout_s = command_timeout_s

    def _p(self, path: str) -> str:
        return os.path.join(self.home, path)

    def exec_raw(self, line: str) -> tuple[int, str, str]:
        try:
            res = subprocess.run(
                ["bash", "-c", line],
                cwd=self.home,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=self.command_timeout_s,
            )
        except subprocess.TimeoutExpired as err:
            raise TimeoutError(f"local command ran over {self.command_timeout_s}s") from err
        return res.returncode, res.stdout, res.stderr

    async def aexec_raw(self, line: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            line,
            cwd=self.home,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out_b, err_b = await asyncio.wait_for(proc.communicate(), timeout=self.command_timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return proc.returncode or 0, out_b.decode(errors="replace"), err_b.decode(errors="replace")

    def write_raw(self, path: str, data: bytes) -> None:
        with open(self._p(path), "wb") as fh:
            fh.write(data)

    def listdir_raw(self, path: str) -> list[tuple[str, int]]:
        with os.scandir(self._p(path)) as it:
            return [(e.name, e.stat(follow_symlinks=False).st_mode) for e in it]

    def read_raw(self, path: str, last_bytes: int | None = None) -> bytes:
        with open(self._p(path), "rb") as fh:
            if last_bytes is not None:
                size = os.fstat(fh.fileno()).st_size
                fh.seek(max(0, size - last_bytes))
            return fh.read()

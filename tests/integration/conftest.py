"""One shared fixture per external system: here, the real one-node Slurm cluster over SSH.

``dev_cluster`` runs ``scripts/dev-cluster up`` once per session (it installs Slurm, MariaDB,
munge and an sshd on first use, then only checks them) and exports what it prints
(``AIRFLOW_CONN_CHARLLM_DEV_CLUSTER`` and the ``CHARLLM_SSH_*`` variables) into the test
process. It skips only where the cluster cannot be built at all (not root, no apt); any
other failure to bring it up fails the tests, so CI cannot pass without the real thing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "dev-cluster"
UP_TIMEOUT_S = 1800  # the first `up` installs packages


@dataclass(frozen=True)
class DevCluster:
    """The running dev cluster, as ``scripts/dev-cluster up`` described it."""

    env: dict[str, str]
    conn_id: str = "charllm_dev_cluster"

    @property
    def partition(self) -> str:
        return self.env.get("CHARLLM_SLURM_PARTITION", "debug")

    def run(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **self.env}
        )
        if res.returncode != 0:
            raise RuntimeError(f"scripts/dev-cluster {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        return res

    def stop_daemon(self, name: str, kill: bool = False) -> None:
        self.run("stop-daemon", name, *(["--kill"] if kill else []))

    def start_daemon(self, name: str) -> None:
        self.run("start-daemon", name, timeout_s=180)

    def slurm(self, *args: str, timeout_s: float = 60) -> str:
        """Run a Slurm client command here as root against the dev cluster (sdiag, sinfo...)."""
        env = {**os.environ, **self.env}
        if "CHARLLM_DEV_CLUSTER_DIR" in self.env:
            env["SLURM_CONF"] = str(Path(self.env["CHARLLM_DEV_CLUSTER_DIR"]) / "etc" / "slurm.conf")
        res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout_s, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout


def parse_env_lines(text: str) -> dict[str, str]:
    """``export NAME=value`` lines (bash %q or single-quoted values) into a dict."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("export "):
            continue
        words = shlex.split(line[len("export ") :])
        if len(words) == 1 and "=" in words[0]:
            name, value = words[0].split("=", 1)
            env[name] = value
    return env


def cannot_build_reason() -> str | None:
    """Why this machine can never run the dev cluster, or None if it can."""
    if not SCRIPT.exists():
        return "scripts/dev-cluster is missing"
    if os.geteuid() != 0:
        return "the dev cluster needs root (it installs packages and starts daemons)"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "the dev cluster needs apt-get (Debian) to install Slurm"
    return None


def bring_up() -> DevCluster:
    reason = cannot_build_reason()
    if reason:
        pytest.skip(reason)
    res = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=UP_TIMEOUT_S)
    if res.returncode != 0:
        pytest.fail(f"scripts/dev-cluster up failed ({res.returncode}):\n{res.stderr[-4000:]}", pytrace=False)
    env = parse_env_lines(res.stdout)
    if "AIRFLOW_CONN_CHARLLM_DEV_CLUSTER" not in env:
        pytest.fail(f"scripts/dev-cluster up printed no connection:\n{res.stdout[-2000:]}", pytrace=False)
    return DevCluster(env)


@pytest.fixture(scope="session")
def dev_cluster() -> Iterator[DevCluster]:
    cluster = bring_up()
    saved = {k: os.environ.get(k) for k in cluster.env}
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

"""docker-compose.yaml is a valid Compose file with the services of Airflow's layout.

Docker's engine does not run on our machines, but the Compose client validates the file
(`config -q`: schema, interpolation, references) without one. The test uses `docker compose`
(the v2 plugin) or `docker-compose` (Debian's 1.29), installing Debian's package when it can
(root with apt, as scripts/dev-cluster does); it skips, saying why, only where neither can be had.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yaml"
AIRFLOW_SERVICES = {"postgres", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer"}  # fmt: skip


def _compose() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if not shutil.which("docker-compose") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        res = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker-compose"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if res.returncode != 0:  # the package lists may be missing on a fresh machine
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600)
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker-compose"],
                capture_output=True,
                env=env,
                timeout=600,
            )
    found = shutil.which("docker-compose")
    if not found:
        pytest.skip(
            "no Compose client: neither `docker compose` nor `docker-compose`, and Debian's package could "
            "not be installed (needs root and apt)"
        )
    return [found]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_compose(), "-f", str(COMPOSE), *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_compose_file_is_valid():
    res = _run("config", "-q")
    assert res.returncode == 0, res.stderr


def test_compose_services_and_slurm_profile():
    import yaml

    res = _run("--profile", "slurm", "config")
    assert res.returncode == 0, res.stderr
    services = yaml.safe_load(res.stdout)["services"]
    assert set(services) == AIRFLOW_SERVICES | {"slurm"}
    # the Slurm + sshd container starts only with its profile; the Airflow services always
    assert services["slurm"].get("profiles") == ["slurm"]
    assert all(not services[s].get("profiles") for s in AIRFLOW_SERVICES)
    assert "triggerer" in str(services["airflow-triggerer"].get("command"))


def test_a_broken_compose_file_is_refused(tmp_path):
    bad = tmp_path / "docker-compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("services:", "servicez:", 1))
    res = subprocess.run([*_compose(), "-f", str(bad), "config", "-q"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0

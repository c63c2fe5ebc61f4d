"""A real ``airflow api-server`` with the charllm plugin, over a prepared results home.

Once per session: Airflow's metadata in SQLite (``db migrate``, every DAG serialised), one
DAG run of the demo with its task instances (``airflow dags test``: ``check_params`` and
``plan`` run for real, the cells' tasks are marked success, so nothing trains), the results
catalog, tables and figures prepared directly (:mod:`tests.ui.prepare`), the recorded GPU
campaign seeded as ``make demo`` does, then the API server with the simple auth manager and
three users: ``admin``, ``viewer`` (read only) and ``outsider`` (no role: no DAG access).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .prepare import prepare_demo

REPO = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).parent / "airflow")
USERS = "admin:admin,viewer:viewer,outsider:"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# the demo's DAG run: check_params and plan run, every other task is marked success (nothing trains)
MARK_SUCCESS = r"^(install\..*|prepare_dataset|cell\..*|aggregate|verdict)$"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class UIServer:
    url: str
    env: dict[str, str]
    home: Path
    airflow_home: Path
    run_id: str
    prepared: dict[str, Any]
    passwords: dict[str, str] = field(default_factory=dict)
    _tokens: dict[str, str] = field(default_factory=dict)

    def token(self, user: str) -> str:
        import httpx

        if user not in self._tokens:
            r = httpx.post(
                f"{self.url}/auth/token", json={"username": user, "password": self.passwords[user]}, timeout=30
            )
            assert r.status_code == 201, r.text
            self._tokens[user] = r.json()["access_token"]
        return self._tokens[user]

    def request(self, method: str, path: str, user: str | None = None, token: str | None = None, **kw: Any) -> Any:
        import httpx

        headers = dict(kw.pop("headers", {}) or {})
        if user is not None:
            token = self.token(user)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kw)

    def cell_id(self, i: int) -> str:
        return str(self.prepared["cells"][i].cell_id)


def _env(tmp: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CHARLLM"))}
    af = tmp / "airflow-home"
    af.mkdir(exist_ok=True)
    env.update(
        AIRFLOW_HOME=str(af),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=USERS,
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{af / 'airflow.db'}",
        AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="120",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        AIRFLOW__API_AUTH__JWT_SECRET="charllm-ui-tests-secret",
        CHARLLM_HOME=str(tmp / "charllm-home"),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    return env


def _run(env: dict[str, str], *args: str, timeout: int = 600) -> str:
    p = subprocess.run([AIRFLOW, *args], env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"airflow {' '.join(args)} failed:\n{out[-6000:]}"
    return out


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIServer]:
    tmp = tmp_path_factory.mktemp("ui")
    port = _free_port()
    env = _env(tmp, port)
    home = Path(env["CHARLLM_HOME"])
    t0 = time.monotonic()
    _run(env, "db", "migrate")
    _run(env, "dags", "reserialize")
    _run(env, "dags", "test", "charllm_demo", "--mark-success-pattern", MARK_SUCCESS)
    runs = json.loads(_run(env, "dags", "list-runs", "charllm_demo", "-o", "json").strip().splitlines()[-1])
    assert len(runs) == 1, runs
    run_id = runs[0]["run_id"]
    old = dict(os.environ)
    os.environ["CHARLLM_HOME"] = str(home)  # seed_recorded and campaign lookups use the prepared home
    try:
        prepared = prepare_demo(home, run_id)
        from charllm.orchestrate.demo import seed_recorded

        prepared["recorded"] = seed_recorded(home)
    finally:
        os.environ.clear()
        os.environ.update(old)
    log = (tmp / "api-server.log").open("w")
    proc = subprocess.Popen(
        [AIRFLOW, "api-server", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{url}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise AssertionError("api-server did not start:\n" + (tmp / "api-server.log").read_text()[-5000:])
            time.sleep(1)
        pw_file = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
        passwords = json.loads(pw_file.read_text())
        print(f"ui_server ready in {time.monotonic() - t0:.0f} s at {url} (run {run_id})")
        yield UIServer(url, env, home, Path(env["AIRFLOW_HOME"]), run_id, prepared, passwords)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the browser tests save screenshots (a test artifact); ``CHARLLM_UI_DOCS=1`` also copies
    the documented ones to ``docs/ui/``."""
    return tmp_path_factory.mktemp("screenshots")


def publish(shot: Path) -> None:
    if os.environ.get("CHARLLM_UI_DOCS") == "1":
        dest = REPO / "docs" / "ui"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, dest / shot.name)


def chromium_or_skip() -> str:
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing (.ci/run installs Debian's chromium)")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    return CHROMIUM

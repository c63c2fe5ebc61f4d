"""The install key is reproducible: the same sources give the same archive bytes."""

from __future__ import annotations

import base64
import gzip
import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from charllm.render import shell_path
from charllm.setup import jobs as envsetup


def test_source_tarball_is_byte_identical_across_clock_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    first = envsetup.source_tarball()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 86_400 * 365)  # gzip stamps time.time() unless told
    second = envsetup.source_tarball()
    assert first == second
    assert first[4:8] == b"\0\0\0\0", "gzip header MTIME must be zero"


def test_source_tarball_members_sorted_with_fixed_metadata() -> None:
    data = envsetup.source_tarball()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert "charllm/__init__.py" in names and not any("__pycache__" in n for n in names)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


# -- the environment job builds aside and switches atomically ----------------------------

_FAKE_BOOTSTRAP = """#!/bin/bash
# stands in for the cluster's python3 only in "-m venv DIR": makes DIR/bin/python, a wrapper
# that runs this test's Python (which has torch, pandas, charllm) and keeps pip and the .pth
# inside DIR, so nothing outside the test's folder is touched
set -e
[ "$1 $2" = "-m venv" ] || exit 9
D="$3"; mkdir -p "$D/bin" "$D/lib/site"
cat > "$D/bin/python" <<WRAP
#!/bin/bash
case "\\$*" in
  "-m pip"*) echo "pip \\$*" >> "$D/pip.log"; exit 0 ;;
  *sysconfig*) echo "$D/lib/site"; exit 0 ;;
esac
exec {real} "\\$@"
WRAP
chmod +x "$D/bin/python"
"""


def _install_script(tmp: Path, lock_hash: str) -> Path:
    from charllm.backends.base import JobIdentity
    from charllm.campaign import ClusterProfile
    from charllm.render import templates

    fake = tmp / "fake-python3"
    fake.write_text(_FAKE_BOOTSTRAP.format(real=sys.executable))
    fake.chmod(0o755)
    cluster = ClusterProfile(name="t", env_dir="envs/charllm-env", bootstrap_python=str(fake))
    script = (
        templates()
        .get_template("install.sbatch.j2")
        .render(
            ident=JobIdentity("_env", f"env{lock_hash}", 0, 1),
            cluster=cluster,
            env_dir="envs/charllm-env",
            env_sh=shell_path("envs/charllm-env"),
            lock_hash=lock_hash,
            packages=["torch"],
            pip_args=[],
            bootstrap_python=str(fake),
            gres=None,
            smoke_cell=False,
        )
    )
    job = tmp / f"job-{lock_hash}"
    job.mkdir()
    (job / "constraints.txt").write_text("")
    (job / "charllm-src.tar.gz.b64").write_text(base64.b64encode(envsetup.source_tarball()).decode())
    (job / "install.sh").write_text(script)
    return job


def _run(job: Path, home: Path) -> str:
    env = {**os.environ, "HOME": str(home), "SLURM_SUBMIT_DIR": str(job)}
    p = subprocess.run(["bash", str(job / "install.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_environment_is_built_aside_and_switched_atomically(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "envs").mkdir(parents=True)
    env = home / "envs" / "charllm-env"
    # an environment of the older layout, in use: it is moved aside, not rewritten
    (env / "bin").mkdir(parents=True)
    (env / "in-use").write_text("a running job's file")

    out = _run(_install_script(tmp_path, "aaaa1111"), home)
    assert "environment ready" in out and "smoke imports ok" in out
    assert env.is_symlink() and os.readlink(env) == str(home / "envs" / "charllm-env.d" / "aaaa1111")
    assert (env / ".charllm-ready").is_file() and (env / "charllm-src" / "charllm" / "__init__.py").is_file()
    legacy = [p for p in (home / "envs" / "charllm-env.d").iterdir() if p.name.startswith("legacy-")]
    assert len(legacy) == 1 and (legacy[0] / "in-use").read_text() == "a running job's file"

    # the same lock again: nothing to do, nothing rebuilt
    (tmp_path / "second").mkdir()
    out = _run(_install_script(tmp_path / "second", "aaaa1111"), home)
    assert "up to date" in out
    assert len((env / "pip.log").read_text().splitlines()) == 1  # one install, in the first run

    # a new lock: built in its own folder while the old one stays whole, then the link moves
    old = home / "envs" / "charllm-env.d" / "aaaa1111"
    (tmp_path / "third").mkdir()
    _run(_install_script(tmp_path / "third", "bbbb2222"), home)
    assert os.readlink(env) == str(home / "envs" / "charllm-env.d" / "bbbb2222")
    assert (old / ".charllm-ready").is_file() and (old / "bin" / "python").is_file()

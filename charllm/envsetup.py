"""The install and dataset stages.

On the local backend the training environment is the orchestrator's own interpreter:
``install`` verifies that it imports the training stack and records versions. On a
cluster, ``install`` submits the environment job (``include/templates/install.sbatch.j2``):
a venv at the cluster profile's ``env_dir`` with the training packages pinned by
``requirements.lock``, charllm's own source, and a smoke test. The job is keyed by the hash
of everything it installs, so a second run finds the finished job (or the marker file it
leaves in the environment) and skips it.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import logging
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charllm.backends.base import JobHandle, JobIdentity, JobSpec, JobState, JobStatus
from charllm.errors import CharllmError, ConfigError
from charllm.paths import include_dir
from charllm.render import shell_path, templates
from charllm.shell import q

if TYPE_CHECKING:
    from charllm.runner import CampaignRunner

log = logging.getLogger(__name__)

ENV_CAMPAIGN = "charllm-env"
_PKG = Path(__file__).resolve().parent
LOCK_FILE = _PKG.parent / "requirements.lock"

_SMOKE = (
    "import json, platform, torch, charllm, charllm.train; "
    "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
    "'cuda': torch.cuda.is_available(), 'charllm': charllm.__version__}))"
)


def source_tarball() -> bytes:
    """charllm's Python sources as a reproducible .tar.gz: the same sources give the same bytes.

    Sorted members, fixed mtimes, owners and modes, and no timestamp or file name in the
    gzip header (``tarfile``'s own gzip mode writes the current time there, so the install
    key changed on every run and each run rebuilt the shared cluster environment).
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(_PKG.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(_PKG.parent)))
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    out = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def lock_text() -> str:
    try:
        return LOCK_FILE.read_text()
    except OSError as err:
        raise CharllmError(f"cannot read the dependency lock {LOCK_FILE}: {err}") from err


def environment_job(runner: CampaignRunner, attempt: int = 1) -> tuple[JobSpec, str]:
    """The environment job for the runner's cluster, and its lock hash."""
    cluster = runner.lc.cluster
    env_dir = (cluster.env_dir or "charllm-env").rstrip("/") or "charllm-env"
    src = source_tarball()
    lock = lock_text()
    key = json.dumps(
        {
            "lock": lock,
            "packages": cluster.train_packages,
            "pip": cluster.pip_args,
            "env": env_dir,
            "src": hashlib.sha256(src).hexdigest(),
        },
        sort_keys=True,
    )
    lock_hash = hashlib.sha256(key.encode()).hexdigest()[:16]
    ident = JobIdentity(ENV_CAMPAIGN, f"env{lock_hash}", 0, attempt)
    gres = cluster.gres_per_node or (None if cluster.gpu_type == "cpu" else "gpu:1")
    env = templates()
    script = env.get_template("install.sbatch.j2").render(
        ident=ident,
        cluster=cluster,
        env_dir=env_dir,
        env_sh=shell_path(env_dir),
        lock_hash=lock_hash,
        packages=cluster.train_packages,
        pip_args=cluster.pip_args,
        bootstrap_python=cluster.bootstrap_python,
        gres=gres,
        smoke_cell=False,
    )
    files = {"constraints.txt": lock, "charllm-src.tar.gz.b64": base64.b64encode(src).decode() + "\n"}
    return JobSpec(ident, script, files), lock_hash


def ensure_environment(runner: CampaignRunner) -> dict[str, Any]:
    """Local: verify. Cluster: skip if built, else submit the environment job (returns its handle)."""
    if runner.backend.name == "local":
        proc = subprocess.run([sys.executable, "-c", _SMOKE], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise CharllmError(f"the local training environment does not import: {proc.stderr[-2000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        log.info("local training environment OK: %s", info)
        return {"backend": "local", "python": sys.executable, "skipped": True, **info}
    attempt = 1
    while True:
        spec, lock_hash = environment_job(runner, attempt)
        found = runner.backend.find(spec.identity)
        if found is None:
            break
        st = runner.backend.statuses([found.job_id])[found.job_id]
        if st.state is JobState.COMPLETED:
            log.info(
                "environment %s (lock %s) was built by job %s: skipped",
                runner.lc.cluster.env_dir,
                lock_hash,
                found.job_id,
            )
            return {"skipped": True, "lock_hash": lock_hash, "job_id": found.job_id}
        if not st.state.is_terminal:
            log.info(
                "environment job %s (lock %s) is still %s: waiting for it", found.job_id, lock_hash, st.state.value
            )
            return {"skipped": False, "lock_hash": lock_hash, "handle": found.as_dict()}
        log.warning(
            "environment job %s ended %s; trying again as attempt %d", found.job_id, st.state.value, attempt + 1
        )
        attempt += 1
        if attempt > 5:
            raise CharllmError(f"the environment job failed {attempt - 1} times; see {found.workdir}")
    handle = runner.backend.submit(spec)
    log.info("environment job %s submitted (lock %s) in %s", handle.job_id, lock_hash, handle.workdir)
    return {"skipped": False, "lock_hash": lock_hash, "handle": handle.as_dict()}


def check_environment_job(runner: CampaignRunner, handle: JobHandle, state: JobState, exit_code: int | None) -> None:
    """Raise with the job's log tail unless the environment job succeeded."""
    if state is JobState.COMPLETED:
        return
    out, err = runner.backend.tail(handle, 4000)
    raise CharllmError(
        f"environment job {handle.job_id} ended {state.value} (exit code {exit_code})\n"
        f"--- stdout ---\n{out}\n--- stderr ---\n{err}"
    )


DATA_CAMPAIGN = "charllm-data"
STAGE_LIMIT_BYTES = 32 * 1024 * 1024  # relative corpus files are staged with the job, up to this much
_DATA_TIME_LIMIT_S = 3600


def _corpus_word(src: str) -> str:
    if src.startswith("~/"):
        return '"$HOME"/' + q(src[2:])
    return q(src)


def dataset_job(runner: CampaignRunner, attempt: int = 1) -> tuple[JobSpec, str]:
    """The dataset job of the runner's campaign (``include/templates/dataprep.sbatch.j2``) and its key.

    Relative corpus paths are read here (under ``include/``) and staged beside the job
    script; absolute paths and URLs are passed to the job as they are.
    """
    from charllm.campaign import DATA_FORMAT_VERSION
    from charllm.render import dataset_dir_word, default_python

    ds = runner.lc.campaign.dataset
    cluster = runner.lc.cluster
    files: dict[str, str] = {}
    words: list[str] = []
    staged_sha: list[str] = []
    total = 0
    for i, src in enumerate(ds.corpus):
        if src.startswith(("/", "~/", "http://", "https://")):
            words.append(_corpus_word(src))
            continue
        path = include_dir() / src
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(
                runner.lc.source, f"dataset.corpus[{i}]", f"cannot read corpus file {path}: {err}"
            ) from err
        total += len(text.encode())
        if total > STAGE_LIMIT_BYTES:
            raise ConfigError(
                runner.lc.source,
                f"dataset.corpus[{i}]",
                f"relative corpus files are staged with the job and limited to {STAGE_LIMIT_BYTES} "
                "bytes in all; put large corpora on the cluster and give absolute paths",
            )
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in path.name)
        name = f"corpus-{i:03d}-{safe}"
        files[name] = text
        words.append(q(name))
        staged_sha.append(hashlib.sha256(text.encode()).hexdigest())
    out_word = dataset_dir_word(ds.resolved(), runner.data_home)
    key_doc = json.dumps(
        {"dataset": ds.resolved(), "format": DATA_FORMAT_VERSION, "staged": staged_sha, "out": out_word}, sort_keys=True
    )
    key = hashlib.sha256(key_doc.encode()).hexdigest()[:16]
    ident = JobIdentity(DATA_CAMPAIGN, f"data{key}", 0, attempt)
    python = sys.executable if runner.backend.name == "local" else default_python(cluster)
    env = templates()
    script = env.get_template("dataprep.sbatch.j2").render(
        ident=ident,
        cluster=cluster,
        key=ds.key,
        tokenizer=ds.tokenizer,
        out_sh=out_word,
        python_sh=q(python) if runner.backend.name == "local" else shell_path(python),
        corpus_words=words,
    )
    return JobSpec(ident, script, files, time_limit_s=_DATA_TIME_LIMIT_S), key


def _wait(runner: CampaignRunner, handle: JobHandle, timeout_s: float) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    last: JobState | None = None
    while True:
        st = runner.backend.statuses([handle.job_id])[handle.job_id]
        if st.state is not last:
            log.info("dataset job %s: %s%s", handle.job_id, st.state.value, f" on {st.nodes}" if st.nodes else "")
            last = st.state
        if st.state.is_terminal:
            return st
        if time.monotonic() > deadline:
            raise CharllmError(
                f"dataset job {handle.job_id} did not end within {timeout_s:.0f} s (still "
                f"{st.state.value}); see {handle.workdir}"
            )
        time.sleep(runner.poll_interval_s)


def ensure_dataset(runner: CampaignRunner, max_attempts: int = 3) -> dict[str, Any]:
    """Prepare the campaign's dataset: nothing for ``synthetic``; the dataset job for ``indexed``.

    The dataset job (``python -m charllm.dataprep``, itself idempotent) is submitted through
    ``runner.backend`` (local or Slurm, same interface) under the identity
    ``charllm-data/data<key>`` and skipped when a job with the same key completed before.
    Unlike the install stage (a deferrable sensor), this waits **synchronously**, polling
    ``backend.statuses`` every ``runner.poll_interval_s`` and holding its worker: the job is
    short (tokenizing a corpus once). The job's output tail goes into the log; a failed job
    raises :class:`CharllmError` with its stdout and stderr tails.
    """
    ds = runner.lc.campaign.dataset
    if ds.kind == "synthetic":
        log.info("dataset: synthetic, generated by each job from the cell's seed; nothing to prepare")
        return {"kind": "synthetic"}
    attempt = 1
    handle: JobHandle | None = None
    while True:
        spec, key = dataset_job(runner, attempt)
        out_dir = dataset_dir_of(runner)
        found = runner.backend.find(spec.identity)
        if found is None:
            break
        st = runner.backend.statuses([found.job_id])[found.job_id]
        if st.state is JobState.COMPLETED:
            log.info("dataset %s was prepared by job %s (key %s): skipped", out_dir, found.job_id, key)
            return {"kind": "indexed", "skipped": True, "key": key, "dir": out_dir, "job_id": found.job_id}
        if not st.state.is_terminal:
            log.info("dataset job %s (key %s) is still %s: waiting for it", found.job_id, key, st.state.value)
            handle = found
            break
        log.warning("dataset job %s ended %s; trying again as attempt %d", found.job_id, st.state.value, attempt + 1)
        attempt += 1
        if attempt > max_attempts:
            out, err = runner.backend.tail(found, 4000)
            raise CharllmError(
                f"the dataset job failed {attempt - 1} times; last: job {found.job_id} in "
                f"{found.workdir}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
            )
    if handle is None:
        handle = runner.backend.submit(spec)
        log.info("dataset job %s submitted (key %s) in %s: %s", handle.job_id, key, handle.workdir, out_dir)
    st = _wait(runner, handle, _DATA_TIME_LIMIT_S + 600)
    out, err = runner.backend.tail(handle, 4000)
    log.info(
        "--- dataset job %s stdout (tail) ---\n%s\n--- dataset job %s stderr (tail) ---\n%s",
        handle.job_id,
        out,
        handle.job_id,
        err,
    )
    if st.state is not JobState.COMPLETED:
        raise CharllmError(
            f"dataset job {handle.job_id} ended {st.state.value} (exit code {st.exit_code}); see {handle.workdir}\n"
            f"--- stdout ---\n{out}\n--- stderr ---\n{err}"
        )
    return {
        "kind": "indexed",
        "skipped": False,
        "key": key,
        "dir": out_dir,
        "job_id": handle.job_id,
        "handle": handle.as_dict(),
    }


def dataset_dir_of(runner: CampaignRunner) -> str:
    """The prepared dataset's directory as the jobs see it (a shell word)."""
    from charllm.render import dataset_dir_word

    return dataset_dir_word(runner.lc.campaign.dataset.resolved(), runner.data_home)

"""The install and dataset stages: two setup jobs with one life (find, submit, wait, judge).

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
import functools
import gzip
import hashlib
import io
import json
import logging
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charllm.backends.base import JobHandle, JobIdentity, JobSpec, JobStatus
from charllm.errors import CharllmError, ConfigError, SubmitLimitError
from charllm.outcomes import Action, Outcome, judge
from charllm.paths import include_dir
from charllm.render import shell_path, templates
from charllm.shell import q

if TYPE_CHECKING:
    from charllm.runner import CampaignRunner

log = logging.getLogger(__name__)

ENV_CAMPAIGN = "charllm-env"
_PKG = Path(__file__).resolve().parent.parent  # the charllm package
LOCK_FILE = _PKG.parent / "requirements.lock"
#: engine: nemo's cluster-side lock (never the Airflow venv's): installed with --no-deps on top of
#: the training environment when a campaign has nemo cells (charllm.nemo_config says why 2.7.3)
NEMO_LOCK_FILE = _PKG.parent / "requirements-nemo.lock"
#: what NeMo's import needs that a CUDA PyTorch image has but the training environment may not;
#: resolved by pip (constrained by requirements.lock) before the locked NeMo set
NEMO_BASE_PACKAGES = (
    "transformers", "huggingface-hub", "tokenizers", "safetensors", "einops", "sentencepiece",
    "tiktoken", "tqdm", "regex", "scikit-learn", "tensorboard", "onnx", "typer", "rich",
)  # fmt: skip
_NEMO_SMOKE = "import nemo, nemo.lightning; from nemo.collections import llm; print('charllm: nemo', nemo.__version__)"

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


def uses_nemo(runner: CampaignRunner) -> bool:
    """Whether the campaign has ``engine: nemo`` cells and no container image provides NeMo."""
    nemo = any(getattr(c, "engine", None) == "nemo" for c in runner.lc.cells)
    return nemo and not getattr(runner.lc.cluster, "nemo_container", None)


def nemo_lock_text() -> str:
    try:
        return NEMO_LOCK_FILE.read_text()
    except OSError as err:
        raise CharllmError(f"cannot read the NeMo lock {NEMO_LOCK_FILE}: {err}") from err


def environment_job(runner: CampaignRunner, attempt: int = 1) -> tuple[JobSpec, str]:
    """The environment job for the runner's cluster, and its lock hash."""
    cluster = runner.lc.cluster
    env_dir = (cluster.env_dir or "charllm-env").rstrip("/") or "charllm-env"
    src = source_tarball()
    lock = lock_text()
    doc: dict[str, Any] = {
        "lock": lock,
        "packages": cluster.train_packages,
        "pip": cluster.pip_args,
        "env": env_dir,
        "src": hashlib.sha256(src).hexdigest(),
    }
    nemo = uses_nemo(runner)
    if nemo:  # only then: every other campaign keeps its key (and its built environment)
        from charllm.render import nemo_env_dir

        env_dir = nemo_env_dir(cluster)  # its own environment: NeMo pins another megatron-core
        doc["env"] = env_dir
        doc["nemo_lock"] = nemo_lock_text()
        doc["nemo_base"] = list(NEMO_BASE_PACKAGES)
    key = json.dumps(doc, sort_keys=True)
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
        nemo=nemo,
        nemo_base=NEMO_BASE_PACKAGES,
        nemo_smoke=_NEMO_SMOKE,
    )
    files = {"constraints.txt": lock, "charllm-src.tar.gz.b64": base64.b64encode(src).decode() + "\n"}
    if nemo:
        files["requirements-nemo.lock"] = nemo_lock_text()
    return JobSpec(ident, script, files), lock_hash


ENV_MAX_ATTEMPTS = 5
DATA_MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class SetupJob:
    """A job keyed by its content (the environment, the dataset): run once, shared by every run."""

    kind: str  # "environment" | "dataset"
    make: Callable[[int], tuple[JobSpec, str]]  # attempt -> (spec, key)
    max_attempts: int
    wait_s: float | None = None  # how long a synchronous wait may take (None: no limit)


def setup_job(runner: CampaignRunner, kind: str) -> SetupJob:
    if kind == "environment":
        return SetupJob(kind, lambda a: environment_job(runner, a), ENV_MAX_ATTEMPTS)
    if kind == "dataset":
        return SetupJob(kind, lambda a: dataset_job(runner, a), DATA_MAX_ATTEMPTS, _DATA_TIME_LIMIT_S + 600)
    raise ValueError(f"unknown setup job {kind!r}")


def _done_message(runner: CampaignRunner, kind: str, key: str, job_id: str) -> str:
    if kind == "environment":
        return f"environment {runner.lc.cluster.env_dir} (lock {key}) was built by job {job_id}: skipped"
    return f"dataset {dataset_dir_of(runner)} was prepared by job {job_id} (key {key}): skipped"


def setup_step(runner: CampaignRunner, kind: str) -> dict[str, Any]:
    """Find the setup job's newest attempt: completed (skip), in flight (wait for it), else submit the next.

    An attempt that ended without completing (a previous run's failure) is followed by the
    next attempt, up to the job's ``max_attempts``. Remote calls wait out transport outages.
    """
    job = setup_job(runner, kind)
    patience = runner.patience()
    attempt = 1
    while True:
        spec, key = job.make(attempt)
        found = patience.call(functools.partial(runner.backend.find, spec.identity), f"looking for the {kind} job")
        if found is None:
            break
        st = patience.call(functools.partial(_status, runner, found.job_id), f"polling the {kind} job")
        if not st.state.is_terminal:
            log.info("%s job %s (key %s) is still %s: waiting for it", kind, found.job_id, key, st.state.value)
            return {"skipped": False, "key": key, "job_id": found.job_id, "handle": found.as_dict()}
        if judge(st).outcome is Outcome.OK:  # the one state table; an OOM setup job is no environment
            log.info("%s", _done_message(runner, kind, key, found.job_id))
            return {"skipped": True, "key": key, "job_id": found.job_id}
        # an earlier run's attempt ended without its result: this run makes the next one
        if attempt >= job.max_attempts:
            raise CharllmError(
                f"the {kind} job failed {attempt} times; last: job {found.job_id} ended {st.state.value} in "
                f"{found.workdir}\n{runner.job_tail(found, 4000)}"
            )
        log.warning("%s job %s ended %s; trying again as attempt %d", kind, found.job_id, st.state.value, attempt + 1)
        attempt += 1
    handle = _submit_setup(runner, kind, spec)
    log.info("%s job %s submitted (key %s) in %s", kind, handle.job_id, key, handle.workdir)
    return {"skipped": False, "key": key, "job_id": handle.job_id, "handle": handle.as_dict()}


def _status(runner: CampaignRunner, job_id: str) -> JobStatus:
    return runner.backend.statuses([job_id])[job_id]


def _submit_setup(runner: CampaignRunner, kind: str, spec: JobSpec) -> JobHandle:
    """Submit a setup job, waiting out transport outages and submit-limit refusals."""
    n = 0
    while True:
        try:
            return runner.patience().call(lambda: runner.backend.submit(spec), f"submitting the {kind} job")
        except SubmitLimitError as err:
            delay = runner.submit_limit_delay(n)
            log.warning("%s; submitting again in %.0f s", err, delay)
            runner.sleep(delay)
            n += 1


def setup_after_end(runner: CampaignRunner, kind: str, handle: JobHandle, status: JobStatus) -> dict[str, Any]:
    """Judge an ended setup job with the one state table (:func:`charllm.outcomes.judge`).

    Only ``ok`` counts as done (an out-of-memory environment job is a failure); a lost job
    (node failure, pre-emption, forgotten) is submitted again as the next attempt, within the
    job's attempt budget; anything else raises with the job's log tail.
    """
    job = setup_job(runner, kind)
    attempt = handle.identity.attempt
    verdict = judge(status, attempt, job.max_attempts)
    if verdict.outcome is Outcome.OK:
        return {"action": str(Action.FINISHED), "job_id": handle.job_id, "state": status.state.value}
    tail = runner.job_tail(handle, 4000)
    if verdict.action is Action.RESUBMIT:
        log.warning("%s job %s ended %s: submitting attempt %d", kind, handle.job_id, status.state.value, attempt + 1)
        spec, _ = job.make(attempt + 1)
        new = _submit_setup(runner, kind, spec)
        return {"action": str(Action.RESUBMIT), "job_id": new.job_id, "handle": new.as_dict()}
    raise CharllmError(
        f"{kind} job {handle.job_id} ended {status.state.value} (exit code {status.exit_code}); see {handle.workdir}\n"
        f"{tail}"
    )


def wait_setup_job(runner: CampaignRunner, kind: str, handle: JobHandle) -> dict[str, Any]:
    """Wait (synchronously) for a setup job and its resubmissions until it completed; raises if it failed."""
    job = setup_job(runner, kind)
    while True:
        st = runner.wait_for(handle, kind, job.wait_s)
        log.info("%s", runner.job_tail(handle, 4000).replace("--- job ", f"--- {kind} job "))
        step = setup_after_end(runner, kind, handle, st)
        if step["action"] == Action.FINISHED:
            return {"skipped": False, "job_id": handle.job_id, "handle": handle.as_dict(), "state": st.state.value}
        handle = JobHandle.from_dict(step["handle"])


def ensure_environment(runner: CampaignRunner) -> dict[str, Any]:
    """Local: verify. Cluster: skip if built, else find or submit the environment job (returns its handle)."""
    if runner.backend.capabilities.runs_here:
        proc = subprocess.run([sys.executable, "-c", _SMOKE], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise CharllmError(f"the local training environment does not import: {proc.stderr[-2000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        log.info("local training environment OK: %s", info)
        return {"backend": "local", "python": sys.executable, "skipped": True, **info}
    step = setup_step(runner, "environment")
    step["lock_hash"] = step["key"]
    return step


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
    python = sys.executable if runner.backend.capabilities.runs_here else default_python(cluster)
    env = templates()
    script = env.get_template("dataprep.sbatch.j2").render(
        ident=ident,
        cluster=cluster,
        key=ds.key,
        tokenizer=ds.tokenizer,
        out_sh=out_word,
        python_sh=q(python) if runner.backend.capabilities.runs_here else shell_path(python),
        corpus_words=words,
    )
    return JobSpec(ident, script, files, time_limit_s=_DATA_TIME_LIMIT_S), key


def ensure_dataset(runner: CampaignRunner) -> dict[str, Any]:
    """Prepare the campaign's dataset: nothing for ``synthetic``; the dataset job for ``indexed``.

    The dataset job (``python -m charllm.setup.dataprep``, itself idempotent) is submitted through
    ``runner.backend`` (local or Slurm, same interface) under the identity
    ``charllm-data/data<key>`` and skipped when a job with the same key completed before.
    Unlike the install stage (a deferrable sensor), this waits **synchronously**, polling
    every ``runner.poll_interval_s`` and holding its worker: the job is short (tokenizing a
    corpus once). Its life is the one of every setup job (:func:`setup_step`,
    :func:`setup_after_end`); the job's output tail goes into the log; a failed job raises
    :class:`CharllmError` with its stdout and stderr tails.
    """
    ds = runner.lc.campaign.dataset
    if ds.kind == "synthetic":
        log.info("dataset: synthetic, generated by each job from the cell's seed; nothing to prepare")
        return {"kind": "synthetic"}
    out_dir = dataset_dir_of(runner)
    step = setup_step(runner, "dataset")
    if step["skipped"]:
        return {"kind": "indexed", "dir": out_dir, **step}
    waited = wait_setup_job(runner, "dataset", JobHandle.from_dict(step["handle"]))
    return {"kind": "indexed", "key": step["key"], "dir": out_dir, **waited}


def dataset_dir_of(runner: CampaignRunner) -> str:
    """The prepared dataset's directory as the jobs see it (a shell word)."""
    from charllm.render import dataset_dir_word

    return dataset_dir_word(runner.lc.campaign.dataset.resolved(), runner.data_home)

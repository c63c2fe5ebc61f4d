"""Render job scripts (sbatch) from the templates in ``include/templates``.

Rendering is separate from submitting: a dry run writes the scripts and stops. Every
free-text value goes through the ``q`` filter (shlex.quote), comments included; every
``#SBATCH`` value through ``word`` (a plain word or an error); names were already checked
against the one safe-name pattern (:data:`charllm.shell.NAME_RE`) by the campaign models.
Whatever slips past those, the environment's ``finalize`` refuses: no rendered value may hold
a control character (a newline would end a comment or an ``#SBATCH`` line and start a command).
"""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path
from typing import Any

import jinja2

from charllm.backends.base import JobIdentity, JobSpec, parse_time_limit
from charllm.campaign import Cell, ClusterProfile, cell_refusals, path_under
from charllm.errors import ConfigError
from charllm.paths import include_dir
from charllm.shell import CONTROL_RE, q

# an #SBATCH value: one plain word (names, counts, time limits, gres, memory)
_WORD_RE = re.compile(r"\A[A-Za-z0-9_.:,+=@%/\-]{1,256}\Z")


@jinja2.pass_context
def _finalize(ctx: jinja2.runtime.Context, value: Any) -> Any:
    """Every ``{{ ... }}`` of every template passes here: a control character is refused, not written."""
    text = value if isinstance(value, str) else str(value)
    bad = CONTROL_RE.search(text)
    if bad:
        raise ConfigError(
            f"template {ctx.name}",
            "rendered value",
            f"{text[:120]!r} holds control character {bad.group()!r}: refused (it could end a comment or an "
            "#SBATCH line and start a command)",
        )
    return value


def word(value: object) -> str:
    """An ``#SBATCH`` directive value: a plain word, or ConfigError (never quoted: sbatch reads it raw)."""
    text = str(value)
    if not _WORD_RE.match(text):
        raise ConfigError("job script", "#SBATCH", f"{text[:120]!r} is not a plain word for an #SBATCH line")
    return text


def templates() -> jinja2.Environment:
    """The job-script templates of ``include/templates``; ``| q`` quotes a value for the shell, ``| word``
    checks an ``#SBATCH`` value; no rendered value may hold a control character (``finalize``).

    One environment per templates folder, kept (building one cost ~30 ms a script)."""
    return _templates(str(include_dir() / "templates"))


@functools.lru_cache(maxsize=8)
def _templates(folder: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        finalize=_finalize,
    )
    env.filters["q"] = q
    env.filters["word"] = word
    return env


def default_python(cluster: ClusterProfile) -> str:
    """The training environment's interpreter on the cluster (this one for local runs)."""
    if cluster.env_dir:
        return f"{cluster.env_dir.rstrip('/')}/bin/python"
    return sys.executable


def nemo_env_dir(cluster: ClusterProfile) -> str:
    """engine nemo's environment beside the training one (``<env_dir>-nemo``: its megatron-core differs)."""
    return f"{(cluster.env_dir or 'charllm-env').rstrip('/')}-nemo"


def shell_path(path: str) -> str:
    """A path as one shell word; a relative path is taken from the user's home (``$HOME``)."""
    if path.startswith("/"):
        return q(path)
    return '"$HOME"/' + q(path.removeprefix("~/"))


def dataset_dir_word(dataset: dict[str, Any], data_home: Path | None = None) -> str:
    """The prepared dataset's directory (``<path>/<key>``) as one shell word.

    A relative ``path`` is taken from ``data_home`` when given (the local backend: the
    results home), else from the login home on the cluster (``$HOME``), like ``env_dir``.
    """
    base = str(dataset.get("path") or "charllm-data")
    key = str(dataset["key"])
    if not re.fullmatch(r"[0-9a-f]{16}", key) or ".." in base.split("/"):
        raise ConfigError("dataset", "path", f"{base!r}/{key!r}: not a data root and a dataset key")
    if data_home is not None and not base.startswith("/"):
        if not base.startswith("~"):
            path_under(data_home, base)  # relative: under the results home, proven
        base = str(Path(base).expanduser()) if base.startswith("~") else str(data_home / base)
        if not base.startswith("/"):
            base = str(Path(base).absolute())
    return shell_path(f"{base.rstrip('/')}/{key}")


def check_runnable(cell: Cell, cluster: ClusterProfile) -> None:
    """Raise ConfigError (campaign, cell, every reason) unless :mod:`charllm.capabilities` lets ``cell`` run."""
    refused = cell_refusals(cell, cluster)
    if refused:
        reasons = "; ".join(str(r) for r in refused)
        raise ConfigError(f"campaign {cell.campaign}", f"cell {cell.name}", f"cannot run on {cluster.name}: {reasons}")


def render_script(
    cell: Cell,
    cluster: ClusterProfile,
    ident: JobIdentity,
    python: str | None = None,
    data_home: Path | None = None,
) -> str:
    """The job script of ``cell`` on ``cluster``; a cell the capability table refuses raises ConfigError."""
    check_runnable(cell, cluster)
    tasks_per_node = cell.world_size if cell.nodes == 1 else cluster.gpus_per_node
    gres = cluster.gres_per_node
    if gres is None and cluster.gpu_type != "cpu":
        gres = f"gpu:{min(cell.world_size, cluster.gpus_per_node)}"
    launcher = cluster.launcher
    if launcher == "torchrun" and cell.world_size == 1:
        launcher = "python"
    container = cluster.nemo_container if cell.engine == "nemo" else None
    if container:  # pyxis starts one container task per rank: srun launches
        launcher = "srun"
    elif cell.engine == "nemo" and python is None and cluster.env_dir:
        python = f"{nemo_env_dir(cluster)}/bin/python"  # the install stage's NeMo environment
    return (
        templates()
        .get_template("job.sbatch.j2")
        .render(
            cell=cell,
            cluster=cluster,
            ident=ident,
            env=cluster.env,
            gres=gres,
            tasks_per_node=tasks_per_node if launcher == "srun" else (1 if cell.nodes > 1 else tasks_per_node),
            launcher=launcher,
            python_sh="python" if container else shell_path(python or default_python(cluster)),
            container=container,
            charllm_src_sh=shell_path(f"{(cluster.env_dir or 'charllm-env').rstrip('/')}/charllm-src"),
            dataset_dir_sh=dataset_dir_word(cell.dataset, data_home) if cell.dataset.get("kind") == "indexed" else None,
        )
    )


def job_spec(
    cell: Cell,
    cluster: ClusterProfile,
    ident: JobIdentity,
    python: str | None = None,
    data_home: Path | None = None,
) -> JobSpec:
    script = render_script(cell, cluster, ident, python, data_home)
    cell_json = json.dumps(cell.job_config(ident.repeat), indent=2, sort_keys=True)
    from charllm import paths
    from charllm.energy.control import plan_job_file

    plan = plan_job_file(cell, data_home if data_home is not None else paths.home())  # frequency_plan.json, if any
    return JobSpec(
        identity=ident,
        script=script,
        files={"cell.json": cell_json + "\n", **plan},
        time_limit_s=parse_time_limit(cluster.time_limit),
    )


def write_dry_run(spec: JobSpec, dest: Path, root: Path | None = None) -> Path:
    """Write a job's script and files into ``dest`` (dry run); returns the script path.

    Every file is proven to land inside ``dest``, and ``dest`` inside ``root`` when given.
    """
    if root is not None and not dest.resolve().is_relative_to(root.resolve()):
        raise ConfigError(str(root), str(dest), f"the dry-run folder {dest} leaves its root {root}")
    for name in ("job.sbatch", *spec.files):
        path_under(dest, name)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "job.sbatch").write_text(spec.script)
    for name, text in spec.files.items():
        (dest / name).write_text(text)
    return dest / "job.sbatch"

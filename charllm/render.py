"""Render job scripts (sbatch) from the templates in ``include/templates``.

Rendering is separate from submitting: a dry run writes the scripts and stops. Every
free-text value goes through the ``q`` filter (shlex.quote); names were already checked
against a safe alphabet by the campaign models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jinja2

from charllm.backends.base import JobIdentity, JobSpec, parse_time_limit
from charllm.campaign import Cell, ClusterProfile, cell_refusals
from charllm.errors import ConfigError
from charllm.paths import include_dir
from charllm.shell import q


def templates() -> jinja2.Environment:
    """The job-script templates of ``include/templates``; ``| q`` quotes a value for the shell."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(include_dir() / "templates")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["q"] = q
    return env


def default_python(cluster: ClusterProfile) -> str:
    """The training environment's interpreter on the cluster (this one for local runs)."""
    if cluster.env_dir:
        return f"{cluster.env_dir.rstrip('/')}/bin/python"
    return sys.executable


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
    if data_home is not None and not base.startswith("/"):
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
            python_sh=shell_path(python or default_python(cluster)),
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
    return JobSpec(
        identity=ident,
        script=script,
        files={"cell.json": cell_json + "\n"},
        time_limit_s=parse_time_limit(cluster.time_limit),
    )


def write_dry_run(spec: JobSpec, dest: Path) -> Path:
    """Write a job's script and files into ``dest`` (dry run); returns the script path."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "job.sbatch").write_text(spec.script)
    for name, text in spec.files.items():
        (dest / name).write_text(text)
    return dest / "job.sbatch"

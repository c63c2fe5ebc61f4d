"""Every GPU cell recorded in the repository, as (job cell, outcome, metrics, step times).

The models are checked (and their coefficients were fitted) against these: ``tests/data/gpu/*``
(cell.json + result.json + steps.csv), the small campaign's results store
(``docs/gpu/small-campaign/results.tgz``), the megatron engine's runs
(``docs/gpu/validate-h200-megatron-complete-runs.tar.gz``) and the issue-14 H200 sweeps
(``docs/gpu/predict-h200-run*.json``, which also hold layer profiles; run1 and run2 an OOM sweep),
the in-job check (``docs/gpu/predict-h200-job.json``: ``profile: layers`` and ``window: adaptive``)
and the long-window cells on one H200 (``docs/gpu/window-long/runs-{a,b}.tgz``: 11 fixed windows of
46-69 s and one job that measured with ``window: adaptive``).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Recorded:
    """One recorded cell."""

    source: str  # file (and member) it came from
    cell: dict[str, Any]  # the job's cell (cell.json)
    outcome: str  # ok | oom | failed
    metrics: dict[str, float] = field(default_factory=dict)
    step_times_s: tuple[float, ...] = ()  # measured steps, in order
    profile: dict[str, Any] | None = None  # a layer profile taken in the same process
    params: str | None = None  # the job's weights (``provenance.engine.params``) where recorded

    @property
    def name(self) -> str:
        return str(self.cell.get("name") or self.cell.get("cell_id"))


def _steps_from_csv(text: str) -> tuple[float, ...]:
    out = []
    lines = text.strip().splitlines()
    if not lines:
        return ()
    head = lines[0].split(",")
    i_phase, i_dur = head.index("phase"), head.index("duration_s")
    for line in lines[1:]:
        parts = line.split(",")
        if parts[i_phase] == "measure":
            out.append(float(parts[i_dur]))
    return tuple(out)


def _from_dir(d: Path) -> Recorded:
    cell = json.loads((d / "cell.json").read_text())
    res = json.loads((d / "result.json").read_text())
    steps = _steps_from_csv((d / "steps.csv").read_text()) if (d / "steps.csv").exists() else ()
    return Recorded(str(d.relative_to(REPO)), cell, str(res["outcome"]), dict(res.get("metrics") or {}), steps)


def _from_tar(path: Path, prefix_cell: str = "cell.json") -> list[Recorded]:
    out: list[Recorded] = []
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> str | None:
            m = members.get(name)
            if m is None:
                return None
            f = tar.extractfile(m)
            return f.read().decode() if f is not None else None

        for name in sorted(members):
            if not name.endswith("/result.json"):
                continue
            base = name[: -len("result.json")]
            res = json.loads(read(name) or "{}")
            cell_text = read(base + "cell.json") or read(base.rsplit("out/", 1)[0] + "cell.json")
            if cell_text is None:
                cell = (res.get("provenance") or {}).get("cell")
                if cell is None:
                    continue
            else:
                cell = json.loads(cell_text)
            steps_text = read(base + "steps.csv")
            steps = _steps_from_csv(steps_text) if steps_text else ()
            out.append(
                Recorded(
                    f"{path.relative_to(REPO)}:{name}",
                    cell,
                    str(res.get("outcome")),
                    dict(res.get("metrics") or {}),
                    steps,
                    params=((res.get("provenance") or {}).get("engine") or {}).get("params"),
                )
            )
    return out


def _from_predict_run(path: Path) -> list[Recorded]:
    raw = json.loads(path.read_text())
    out = []
    for row in raw.get("sweep", []) + raw.get("llama", []):
        prof = row["profile"]
        cell = {
            "name": row["name"],
            "model": prof["model"],
            "parallel": {"tp": 1, "pp": 1, "dp": 1, "cp": 1, "ep": 1, "fsdp": False},
            "micro_batch": row["micro_batch"],
            "global_batch": row["global_batch"],
            "seq_len": row["seq_len"],
            "opt": {"recompute": row["recompute"], "compile": False},
            "engine": "torch",
            "precision": "bf16",
            "gpu_type": "h200",
            "world_size": 1,
        }
        metrics = {
            "max_memory_allocated_bytes": float(row["max_memory_allocated_bytes"]),
            "step_time_median_s": float(row["step_time_median_s"]),
        }
        out.append(
            Recorded(f"{path.relative_to(REPO)}:{row['name']}", cell, "ok", metrics, tuple(row["step_times_s"]), prof)
        )
    return out


def _from_predict_job(path: Path) -> list[Recorded]:
    """The in-job check (``python -m charllm.train`` with profile: layers, window: adaptive)."""
    job = json.loads(path.read_text()).get("job")
    if not job or job.get("outcome") != "ok" or not job.get("profile"):
        return []
    prof = job["profile"]
    cell = {
        "name": "job-profile-adaptive",
        "model": prof["model"],
        "parallel": {"tp": 1, "pp": 1, "dp": 1, "cp": 1, "ep": 1, "fsdp": False},
        "micro_batch": prof["micro_batch"],
        "global_batch": prof["micro_batch"] * prof["grad_accum"],
        "seq_len": prof["seq_len"],
        "opt": {"recompute": False, "compile": False, "window": "adaptive"},
        "engine": "torch",
        "precision": "bf16",
        "gpu_type": "h200",
        "world_size": 1,
    }
    steps = _steps_from_csv(job["steps_csv"])
    return [Recorded(f"{path.relative_to(REPO)}:job", cell, "ok", dict(job["metrics"]), steps, prof)]


def oom_sweeps() -> list[tuple[str, list[dict[str, Any]]]]:
    """The micro-batch OOM sweeps of the H200 runs that have one: (file, rows) (run3 has none)."""
    out = []
    for p in sorted((REPO / "docs" / "gpu").glob("predict-h200-run*.json")):
        rows = json.loads(p.read_text()).get("oom", [])
        if rows:
            out.append((str(p.relative_to(REPO)), rows))
    return out


def all_recorded() -> list[Recorded]:
    """Every recorded GPU cell (ok and oom) of the repository."""
    out: list[Recorded] = []
    data = REPO / "tests" / "data" / "gpu"
    for d in sorted(data.iterdir()) if data.is_dir() else []:
        if (d / "cell.json").exists() and (d / "result.json").exists():
            out.append(_from_dir(d))
    for tar in (
        REPO / "docs" / "gpu" / "small-campaign" / "results.tgz",
        REPO / "docs" / "gpu" / "validate-h200-megatron-complete-runs.tar.gz",
        REPO / "docs" / "gpu" / "window-long" / "runs-a.tgz",
        REPO / "docs" / "gpu" / "window-long" / "runs-b.tgz",
    ):
        if tar.exists():
            out.extend(_from_tar(tar))
    for p in sorted((REPO / "docs" / "gpu").glob("predict-h200-run*.json")):
        out.extend(_from_predict_run(p))
    job = REPO / "docs" / "gpu" / "predict-h200-job.json"
    if job.exists():
        out.extend(_from_predict_job(job))
    return out

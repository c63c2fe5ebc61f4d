"""Extract the measured steps and energy series of every recorded GPU cell into ``logs.json``.

Run from the repository root: ``.venv/bin/python tests/data/gpu/window-replay/extract.py``.
It reads the archives and directories listed in ``SOURCES`` (nothing else), keeps per cell the
measured steps (start, end) and, per rank, the telemetry samples from 1 s before the first
measured step to 1 s after the last (time, ``power_w``, NVML ``energy_total_j``), and writes them
with times relative to the first measured step's start and the counter relative to its first
kept sample. Cells without measured steps (OOM) are listed under ``excluded``; jobs that measured
with ``window: adaptive`` themselves (no fixed-window reference) under ``measured_adaptively``.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[4]
OUT = Path(__file__).resolve().parent / "logs.json"
MARGIN_S = 1.0

# (archive or directory, how its cells are laid out)
SOURCES = (
    "tests/data/gpu",
    "docs/gpu/small-campaign/results.tgz",
    "docs/gpu/validate-h200-megatron-complete-runs.tar.gz",
    "docs/gpu/nemo/h200-nemo-vs-megatron-runs.tar.gz",
    "docs/gpu/kwai-remat-1gpu-run/charllm-home.tgz",
    "docs/gpu/window-long/runs-a.tgz",  # long fixed windows (46-69 s) on one H200, and one adaptive job
    "docs/gpu/window-long/runs-b.tgz",
)


def _cell(source: str, base: str, files: dict[str, bytes]) -> dict | None:
    res = json.loads(files[base + "result.json"])
    steps_raw = files.get(base + "steps.csv")
    if steps_raw is None:
        return {"source": f"{source}:{base}", "outcome": res.get("outcome"), "why": "no steps.csv (no measured step)"}
    steps = pd.read_csv(io.BytesIO(steps_raw))
    m = steps[steps["phase"] == "measure"]
    if m.empty:
        return {"source": f"{source}:{base}", "outcome": res.get("outcome"), "why": "no measured step"}
    t0 = float(m["start_unix_s"].iloc[0])
    t1 = float(m["end_unix_s"].iloc[-1])
    ranks = []
    for name in sorted(k for k in files if k.startswith(base + "telemetry/") and k.endswith(".parquet")):
        tel = pd.read_parquet(io.BytesIO(files[name])).sort_values("unix_s")
        tel = tel[(tel["unix_s"] >= t0 - MARGIN_S) & (tel["unix_s"] <= t1 + MARGIN_S)]
        e = tel["energy_total_j"].to_numpy(float)
        ranks.append(
            {
                "file": name[len(base) :],
                "t_s": [round(x - t0, 4) for x in tel["unix_s"]],
                "power_w": [round(float(x), 3) for x in tel["power_w"]],
                "energy_j": [round(float(x - e[0]), 3) for x in e],
            }
        )
    metrics = res.get("metrics") or {}
    window = (res.get("provenance") or {}).get("measure_window")
    cell_key = next((k for k in (base + "cell.json", base.rsplit("out/", 1)[0] + "cell.json") if k in files), None)
    cell = json.loads(files[cell_key]) if cell_key else {}
    return {
        "source": f"{source}:{base}".rstrip("/"),
        "outcome": res.get("outcome"),
        "name": cell.get("name") or base.strip("/").split("/")[-1],
        "cell_id": cell.get("cell_id"),
        "engine": cell.get("engine"),
        "gpu_type": cell.get("gpu_type"),
        "steps_cap": cell.get("steps"),
        "t0_unix_s": t0,
        "steps": [
            [round(a - t0, 6), round(b - t0, 6)] for a, b in zip(m["start_unix_s"], m["end_unix_s"], strict=True)
        ],
        "ranks": ranks,
        "recorded": {
            k: metrics[k]
            for k in ("measured_steps", "step_time_median_s", "energy_per_step_j", "energy_j")
            if k in metrics
        },
        **({"measure_window": window} if window and window.get("mode") == "adaptive" else {}),
    }


def _files_of(src: Path) -> dict[str, bytes]:
    if src.is_dir():
        return {str(p.relative_to(src)): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}
    out = {}
    with tarfile.open(src) as tar:
        for mem in tar.getmembers():
            if mem.isfile() and (mem.name.startswith("results/") or "/" in mem.name):
                f = tar.extractfile(mem)
                if f is not None and (mem.name.endswith((".json", ".csv", ".parquet"))):
                    out[mem.name] = f.read()
    return out


def main() -> None:
    cells: list[dict] = []
    excluded: list[dict] = []
    measured_adaptively: list[dict] = []
    for rel in SOURCES:
        files = _files_of(REPO / rel)
        for name in sorted(files):
            if not name.endswith("result.json") or name.startswith("tables/"):
                continue
            base = name[: -len("result.json")]
            c = _cell(rel, base, files)
            if c is None:
                continue
            if "measure_window" in c:  # measured with window: adaptive: no fixed-window reference
                c["why"] = "measured with window: adaptive (no fixed-window reference)"
                measured_adaptively.append(c)
            else:
                (excluded if "why" in c else cells).append(c)
    # the Perseus stage profile (run2): each stage's iterations and the raw NVML counter series
    prof = REPO / "docs" / "gpu" / "perseus-stage-profile-h200"
    series = pd.read_csv(prof / "run2" / "energy_series.csv").sort_values("unix_s")
    for stage in (0, 1):
        raw = json.loads((prof / "run2" / f"instruction_steps-stage{stage}.json").read_text())
        t0 = float(raw["steps"][0]["start"])
        t1 = float(raw["steps"][-1]["end"])
        sel = series[(series["unix_s"] >= t0 - MARGIN_S) & (series["unix_s"] <= t1 + MARGIN_S)]
        e = sel["energy_total_j"].to_numpy(float)
        cells.append(
            {
                "source": f"docs/gpu/perseus-stage-profile-h200/run2/instruction_steps-stage{stage}.json",
                "outcome": "ok",
                "name": f"perseus-stage{stage}-of-2",
                "cell_id": None,
                "engine": "perseus",
                "gpu_type": "h200",
                "steps_cap": len(raw["steps"]),
                "t0_unix_s": t0,
                "steps": [[round(x["start"] - t0, 6), round(x["end"] - t0, 6)] for x in raw["steps"]],
                "ranks": [
                    {
                        "file": "energy_series.csv",
                        "t_s": [round(x - t0, 4) for x in sel["unix_s"]],
                        "energy_j": [round(float(x - e[0]), 3) for x in e],
                    }
                ],
                "recorded": {
                    "measured_steps": len(raw["steps"]),
                    "window_rel_s": [round(w - t0, 6) for w in raw["window"]],
                    "counter_window_j": raw["counter_at_ends_j"][1] - raw["counter_at_ends_j"][0],
                },
            }
        )
    # logs with per-step durations but no timestamps and no energy series: step time only
    durations_only = []
    for stage in (0, 1):  # Perseus run 1: iteration spans from its instruction log, no raw counter series
        ins = pd.read_csv(prof / f"instructions-stage{stage}.csv")
        g = ins.groupby("step")
        durations_only.append(
            {
                "source": f"docs/gpu/perseus-stage-profile-h200/instructions-stage{stage}.csv",
                "durations_s": [round(float(x), 6) for x in (g["end"].max() - g["start"].min())],
                "why": "no raw energy counter series (run 1; only per-instruction energies)",
            }
        )
    for p in sorted((REPO / "docs" / "gpu").glob("predict-h200-run*.json")):
        raw = json.loads(p.read_text())
        for row in raw.get("sweep", []) + raw.get("llama", []):
            durations_only.append(
                {
                    "source": f"{p.relative_to(REPO)}:{row['name']}",
                    "durations_s": row["step_times_s"],
                    "why": "no energy series",
                }
            )
    job = json.loads((REPO / "docs" / "gpu" / "predict-h200-job.json").read_text())["job"]
    jsteps = pd.read_csv(io.StringIO(job["steps_csv"]))
    measured_adaptively.append(
        {
            "source": "docs/gpu/predict-h200-job.json:job",
            "durations_s": [float(x) for x in jsteps[jsteps["phase"] == "measure"]["duration_s"]],
            "measure_window": job["measure_window"],
            "why": "measured with window: adaptive (no fixed-window reference); no energy series",
        }
    )
    OUT.write_text(
        json.dumps(
            {
                "cells": cells,
                "durations_only": durations_only,
                "measured_adaptively": measured_adaptively,
                "excluded": excluded,
            },
            separators=(",", ":"),
        )
        + "\n"
    )
    print("durations only:", len(durations_only))
    for c in cells:
        print(c["source"], len(c["steps"]), [len(r["t_s"]) for r in c["ranks"]])
    for c in excluded:
        print("excluded", c["source"], c["why"])
    print(OUT, OUT.stat().st_size, "bytes")


if __name__ == "__main__":
    main()

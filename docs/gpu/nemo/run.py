"""engine: nemo next to engine: megatron on the GPT-3 1.3B reference cell, one lent H200.

Run from the repository root on the device machine (issue 16), after the wheels of
``.whl/nemo`` (NeMo 2.7.3 and what the machine lacks) and ``.whl/base`` (megatron-core
0.16.1, zeus 0.16.0) were installed to a --target folder on PYTHONPATH (run.sh does it):

1. import probe: ``nemo.collections.llm``, ``nemo.lightning``, megatron-core, zeus (versions);
2. the reference cell (gpt3-1.3b, micro batch 8, global batch 32, seq 2048, bf16, adaptive
   warm-up then 6 measured steps) through ``python -m charllm.train`` with engine megatron,
   then the same cell with engine nemo;
3. a table: step time, tokens/s, MFU, energy per step, average power, telemetry rows, loss.

Writes $OUT/summary.txt and $OUT/runs.tar.gz (every job's cell, log, result, steps, telemetry).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
OUT = Path(os.environ.get("OUT", "out"))
WORK = Path("/tmp/nemo-vs-megatron")
LINES: list[str] = []


def log(msg: str) -> None:
    print(msg, flush=True)
    LINES.append(msg)


def cell(engine: str) -> dict:
    from charllm import modelcat

    return {
        "campaign": "nemo-vs-megatron",
        "cell_id": f"ref-{engine}",
        "name": f"ref-gpt3-1.3b-{engine}",
        "repeat": 0,
        "seed": 1234,
        "model": modelcat.get("gpt3-1.3b").as_dict(),
        "parallel": {"tp": 1, "pp": 1, "dp": 1, "cp": 1, "ep": 1, "fsdp": False},
        "micro_batch": 8,
        "global_batch": 32,
        "seq_len": 2048,
        "opt": {"recompute": False, "overlap": False, "compile": False, "profile": False},
        "steps": 6,
        "warmup": {
            "min_steps": 3,
            "max_steps": 8,
            "step_time_cv": 0.02,
            "temp_slope_c_per_s": 1.0,
            "temp_window_s": 5.0,
        },
        "engine": engine,
        "precision": "bf16",
        "dataset": {"kind": "synthetic", "path": None},
        "telemetry": {"hz": 20},
        "gpu_type": "h200",
        "world_size": 1,
    }


def run_job(c: dict, timeout_s: float) -> tuple[int, dict | None]:
    out = WORK / c["engine"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "cell.json").write_text(json.dumps(c, indent=1))
    cmd = [sys.executable, "-m", "charllm.train", "--cell", str(out / "cell.json"), "--out", str(out)]
    # engine nemo: megatron-core 0.15.3 (NeMo 2.7.3's) ahead of engine megatron's 0.16.1
    first = os.environ.get("CHARLLM_NEMO_PYTHONPATH", "") if c["engine"] == "nemo" else ""
    path = ":".join(p for p in (first, str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"TIMEOUT after {timeout_s}s\n{e.stdout or ''}{e.stderr or ''}"
    (out / "job.log").write_text(text if isinstance(text, str) else str(text))
    log(f"job {c['name']}: rc {rc} in {time.time() - t0:.0f} s")
    res = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else None
    if res is None or res.get("outcome") != "ok":
        log("---- log tail ----\n" + str(text)[-4000:])
    return rc, res


def probe() -> bool:
    code = (
        "import json, torch, lightning, megatron.core as mc, nemo\n"
        "from nemo.collections import llm\nfrom nemo import lightning as nl\n"
        "zv = None\ntry:\n    import zeus; zv = zeus.__version__\nexcept Exception as e:\n    zv = repr(e)\n"
        "print(json.dumps({'nemo': nemo.__version__, 'megatron_core': mc.__version__, "
        "'lightning': lightning.__version__, 'torch': torch.__version__, 'zeus': zv, "
        "'llm': hasattr(llm, 'GPTModel') and hasattr(llm, 'MockDataModule'), 'nl': hasattr(nl, 'MegatronStrategy')}))"
    )
    t0 = time.time()
    path = ":".join(p for p in (os.environ.get("CHARLLM_NEMO_PYTHONPATH", ""), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    log(f"import probe: rc {p.returncode} in {time.time() - t0:.0f} s: {p.stdout.strip().splitlines()[-1:]}")
    if p.returncode:
        log(p.stderr[-4000:])
    return p.returncode == 0


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    log(
        f"nvidia-smi: {subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,power.limit,temperature.gpu', '--format=csv,noheader'], capture_output=True, text=True).stdout.strip()}"
    )
    ok = probe()
    results = {}
    if ok:
        for engine in ("megatron", "nemo"):
            _, results[engine] = run_job(cell(engine), timeout_s=200 if engine == "nemo" else 150)
    keys = ("step_time_median_s", "step_time_p10_s", "step_time_p90_s", "tokens_per_s", "mfu", "energy_per_step_j",
            "avg_power_w", "samples_per_s_per_mj", "zeus_gpu_energy_j", "telemetry_samples", "loss_first", "loss_last",
            "max_memory_allocated_bytes", "measured_steps")  # fmt: skip
    log(f"{'metric':32s} {'megatron':>16s} {'nemo':>16s}")
    for k in keys:
        vals = [((results.get(e) or {}).get("metrics") or {}).get(k) for e in ("megatron", "nemo")]
        log(f"{k:32s} " + " ".join(f"{v:16.5g}" if isinstance(v, (int, float)) else f"{v!s:>16s}" for v in vals))
    m = [((results.get(e) or {}).get("metrics") or {}).get("step_time_median_s") for e in ("megatron", "nemo")]
    if all(isinstance(v, float) for v in m):
        log(f"step time nemo / megatron: {m[1] / m[0]:.4f} (within 10 %: {abs(m[1] / m[0] - 1) <= 0.10})")
    for e in ("megatron", "nemo"):
        r = results.get(e) or {}
        log(f"{e} engine: {json.dumps((r.get('provenance') or {}).get('engine'))}")
    (OUT / "summary.txt").write_text("\n".join(LINES) + "\n")
    if WORK.exists():
        with tarfile.open(OUT / "runs.tar.gz", "w:gz") as tar:
            tar.add(WORK, arcname="nemo-vs-megatron")
    return 0


if __name__ == "__main__":
    sys.exit(main())

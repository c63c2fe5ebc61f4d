"""Issue 14 on one GPU: layer profiles, a micro-batch x recompute step-time sweep, an OOM sweep.

One process, the torch engine (``charllm.train.engine_torch.TorchEngine``) built per
configuration, eager (no ``torch.compile``: a compile per shape would cost more device time
than the runs), bf16, one GPU. For every configuration: a few warm-up steps, the peak
allocated memory, then one memory-probing profiled step and ``--profile-steps`` steps under
:mod:`charllm.train.layer_profile`, each followed by ``--steps / --profile-steps`` measured
optimizer steps (wall time, device synchronised after each, as the job's loop does):
interleaved, so the profile and the measurement see the same host.
The OOM sweep raises the micro batch (global batch = micro batch) until the first step runs
out of memory. Everything goes to ``OUT/predict-gpu.json`` (profiles embedded: the device
tool brings back at most 8 files);
the CPU-side comparison with the models is ``benchmarks/predict_check.py``.

    python3 benchmarks/predict_gpu.py --out $OUT            # on the device (H200)
    python3 benchmarks/predict_gpu.py --out /tmp/x --cpu    # a tiny smoke run on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from charllm import modelcat
from charllm.train.cell import CellSpec
from charllm.train.dist import detect, init_process_group
from charllm.train.engine_torch import TorchEngine
from charllm.train.layer_profile import LayerProfiler
from charllm.train.oom import classify_exception


def cell_dict(shape: modelcat.ModelShape, mb: int, gb: int, seq: int, recompute: bool, gpu: str, prec: str) -> dict:
    return {
        "campaign": "predict-gpu",
        "cell_id": f"{shape.name}-mb{mb}-gb{gb}-rc{int(recompute)}",
        "name": f"{shape.name}-mb{mb}-gb{gb}-rc{int(recompute)}",
        "seed": 1234,
        "model": shape.as_dict(),
        "parallel": {"tp": 1, "pp": 1, "dp": 1, "cp": 1, "ep": 1, "fsdp": False},
        "micro_batch": mb,
        "global_batch": gb,
        "seq_len": seq,
        "opt": {"recompute": recompute, "overlap": False, "compile": False},
        "steps": 1,
        "engine": "torch",
        "precision": prec,
        "gpu_type": gpu,
        "world_size": 1,
    }


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_config(raw: dict, denv: Any, device: torch.device, warmup: int, steps: int, prof_steps: int, out: Path) -> dict:
    cell = CellSpec.from_dict(raw)
    free()
    t0 = time.time()
    engine = TorchEngine(cell, denv, device)
    build_s = time.time() - t0
    for s in range(warmup):
        engine.step(s)
        engine.sync()
    # the peak before the profiler's memory probe resets it (the warm-up steps are full steps)
    mem = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
    # measured and profiled steps interleaved, so both see the same host (an eager launch-bound
    # step's time wanders by several per cent over seconds on these machines); the profiler's
    # first step probes memory and is not timed
    profiler = LayerProfiler(engine)
    durs = []
    step = warmup
    for k in range(prof_steps + 1):
        profiler.probe_memory = k == 0
        with profiler:
            profiler.begin_step()
            engine.step(step)
            profiler.end_step()
            engine.sync()
        step += 1
        if k == 0:
            continue
        for _ in range(max(1, steps // max(1, prof_steps))):
            t = time.perf_counter()
            engine.step(step)
            engine.sync()
            durs.append(time.perf_counter() - t)
            step += 1
    med = statistics.median(durs)
    prof = profiler.result(med, mem)
    row = {
        "name": cell.name,
        "model": cell.model.name,
        "micro_batch": cell.micro_batch,
        "global_batch": cell.global_batch,
        "seq_len": cell.seq_len,
        "recompute": cell.opt.recompute,
        "build_s": round(build_s, 2),
        "step_times_s": durs,
        "step_time_median_s": med,
        "max_memory_allocated_bytes": mem,
        "profile": prof.to_dict(),
        "profile_step_s": prof.profiled_step_s(),
        "profile_over_measured": prof.profiled_step_s() / med,
        # the profiled steps' own time (device clock, start to end): the same steps as the layers
        "profiled_steps_s": prof.provenance.get("profiled_step_s", 0.0),
    }
    own = row["profiled_steps_s"]
    row["step_time_mean_s"] = statistics.fmean(durs)
    print(
        f"{cell.name:<36} step {med:.4f} s (mean {row['step_time_mean_s']:.4f}, n {len(durs)})  profile sum {prof.profiled_step_s():.4f} s "
        f"({row['profile_over_measured']:.3f}; profiled steps {own:.4f} s, "
        f"{prof.profiled_step_s() / own if own else float('nan'):.3f})  overhead {prof.step_overhead_s * 1e3:.1f} ms  "
        f"peak {mem / 2**30:.2f} GiB  build {build_s:.1f} s",
        flush=True,
    )
    del engine
    free()
    return row


def oom_sweep(shape: modelcat.ModelShape, mbs: list[int], seq: int, denv: Any, device: torch.device, gpu: str) -> list:
    rows = []
    for mb in mbs:
        free()
        cell = CellSpec.from_dict(cell_dict(shape, mb, mb, seq, False, gpu, "bf16"))
        engine = None
        try:
            engine = TorchEngine(cell, denv, device)
            t = time.perf_counter()
            engine.step(0)
            engine.sync()
            rows.append(
                {
                    "micro_batch": mb,
                    "outcome": "ok",
                    "step_s": time.perf_counter() - t,
                    "max_memory_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
                }
            )
        except Exception as exc:  # the OOM is the point; anything else is reported too
            kind, detail = classify_exception(exc)
            rows.append({"micro_batch": mb, "outcome": kind, "detail": str(detail)[:300]})
        print(f"oom sweep {shape.name} mb {mb}: {rows[-1]['outcome']}", flush=True)
        del engine
        free()
        if rows[-1]["outcome"] != "ok":
            break
    return rows


def job_check(out: Path, cpu: bool) -> dict:
    """``profile: layers`` and ``window: adaptive`` through the job itself (``python -m charllm.train``)."""
    import shutil
    import subprocess

    shape = modelcat.get("tiny") if cpu else modelcat.get("gpt3-1.3b")
    cell = cell_dict(shape, 2 if cpu else 8, 4 if cpu else 16, 64 if cpu else 2048, False, "cpu" if cpu else "h200",
                     "fp32" if cpu else "bf16")  # fmt: skip
    cell["opt"].update({"profile_mode": "layers", "profile_steps": 2, "window": "adaptive"})
    cell["steps"] = 30
    cell["warmup"] = {"min_steps": 3, "max_steps": 10}
    cell["name"] = cell["cell_id"] = "job-profile-adaptive"
    work = Path("/tmp/charllm-predict-job")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "cell.json").write_text(json.dumps(cell))
    t = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "charllm.train", "--cell", str(work / "cell.json"), "--out", str(work / "out")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    (out / "job-log.txt").write_text(p.stdout[-20000:] + "\n--- stderr\n" + p.stderr[-8000:])
    res = json.loads((work / "out" / "result.json").read_text())
    profs = sorted((work / "out" / "profiles").glob("*.json"))
    steps = (work / "out" / "steps.csv").read_text()
    summary = {
        "rc": p.returncode,
        "wall_s": time.time() - t,
        "outcome": res["outcome"],
        "metrics": res.get("metrics", {}),
        "measure_window": res.get("provenance", {}).get("measure_window"),
        "steps_csv": steps,
        "profile": json.loads(profs[0].read_text()) if profs else None,
    }
    print(f"job: rc {p.returncode} {res['outcome']} window {summary['measure_window']}", flush=True)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true", help="tiny smoke run on CPU")
    ap.add_argument("--sections", default="sweep,llama,oom", help="sweep,llama,oom,job")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per configuration")
    ap.add_argument("--profile-steps", type=int, default=2, help="profiled steps per configuration")
    ap.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    denv = detect({})
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_process_group(denv, device)
    gpu, prec = ("cpu", "fp32") if args.cpu else ("h200", "bf16")
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "started_unix_s": time.time(),
        "sweep": [],
        "llama": [],
        "oom": [],
    }
    sections = set(args.sections.split(","))
    if args.cpu:
        shape, seq, mbs, gb = modelcat.get("tiny"), 64, [1, 2], 4
        warm, steps, pst = 1, args.steps, args.profile_steps
    else:
        shape, seq, mbs, gb = modelcat.get("gpt3-1.3b"), 2048, [1, 2, 4, 8], 8
        warm, steps, pst = 3, args.steps, args.profile_steps
    only = {x for x in args.only.split(",") if x}
    if "sweep" in sections:
        for rc in (False, True):
            for mb in mbs:
                raw = cell_dict(shape, mb, gb, seq, rc, gpu, prec)
                if not only or raw["name"] in only:
                    res["sweep"].append(run_config(raw, denv, device, warm, steps, pst, out))
    if "llama" in sections:
        lshape = modelcat.get("tiny-llama") if args.cpu else modelcat.get("llama3-8b", 2)
        lseq = 64 if args.cpu else 8192
        for mb in (1, 2):
            res["llama"].append(
                run_config(cell_dict(lshape, mb, 2, lseq, False, gpu, prec), denv, device, warm, steps, pst, out)
            )
    if "oom" in sections and not args.cpu:
        res["oom"] = oom_sweep(shape, [16, 20, 24, 28, 32, 40], seq, denv, device, gpu)
    if "job" in sections:
        res["job"] = job_check(out, args.cpu)
    res["finished_unix_s"] = time.time()
    (out / "predict-gpu.json").write_text(json.dumps(res, indent=1) + "\n")
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

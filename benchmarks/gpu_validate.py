"""Validate the training job and its telemetry on one GPU (H100/H200), in one go.

    python3 benchmarks/gpu_validate.py --out DIR [--sections ref,overhead,replay,oom,modes]

Sections (each guarded, each with a time budget; a summary table is printed last):

- ``ref``: the reference cell, GPT-3 1.3B (24 x 2048, 16 heads), seq 2048, micro batch 8,
  bf16, torch.compile, global batch 32 (4 micro batches per step), through the real entry
  point ``python -m charllm.train``; reports MFU (target >= 0.60), the sampled-power energy
  against the NVML energy counter over the measured window (target within 1 %), and the
  achieved sampling rate (target >= 95 % of 20 Hz). Also writes a kernel breakdown.
- ``overhead``: the same model in-process (global batch 8), step times in alternating blocks
  with and without the 20 Hz sampler thread (order ABBA...); ratio of medians (target
  <= 1.005). A ZeusMonitor window (if zeus imports) over the last block cross-checks energy.
- ``replay``: a short GPT-3 125M run through the entry point, kept as replay test data.
- ``oom``: the 1.3B cell with micro batch 64: expects exit status 42 and an ``oom`` result.
- ``modes``: one-GPU smoke runs of the other code paths (FSDP2 + recompute, llama RoPE/GQA).
- ``scale``: with 2+ GPUs, DDP and FSDP weak scaling (dp=N vs dp=1, same per-GPU batch).

Everything lands under DIR (``validate.txt``, ``runs.tar.gz``), small enough to carry back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from charllm import modelcat  # noqa: E402

T_START = time.time()
LINES: list[str] = []
SUMMARY: list[tuple[str, str, str, str]] = []  # (check, value, target, verdict)


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LINES.append(msg)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def cell(
    model: str,
    *,
    mb: int,
    gb: int,
    seq: int,
    steps: int,
    warmup: dict,
    compile_: bool = True,
    profile: bool = False,
    recompute: bool = False,
    fsdp: bool = False,
    dp: int = 1,
    overlap: bool = False,
    precision: str = "bf16",
    layers: int | None = None,
    gpu_type: str = "h100",
    name: str = "",
    opt_extra: dict | None = None,
    engine: str = "torch",
) -> dict:
    shape = modelcat.get(model, layers)
    return {
        "campaign": "gpu-validate",
        "cell_id": f"val-{name or model}",
        "name": name or model,
        "repeat": 0,
        "seed": 1234,
        "model": shape.as_dict(),
        "parallel": {"tp": 1, "pp": 1, "dp": dp, "cp": 1, "ep": 1, "fsdp": fsdp},
        "micro_batch": mb,
        "global_batch": gb,
        "seq_len": seq,
        "opt": {
            "recompute": recompute,
            "overlap": overlap,
            "compile": compile_,
            "profile": profile,
            **(opt_extra or {}),
        },
        "steps": steps,
        "warmup": warmup,
        "engine": engine,
        "precision": precision,
        "dataset": {"kind": "synthetic", "path": None},
        "telemetry": {"hz": 20},
        "gpu_type": gpu_type,
        "world_size": dp,
    }


def run_job(c: dict, out: Path, timeout_s: float, nproc: int = 1) -> tuple[int, dict | None, str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cell.json").write_text(json.dumps(c, indent=1))
    if nproc == 1:
        cmd = [sys.executable, "-m", "charllm.train", "--cell", str(out / "cell.json"), "--out", str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "-m", "charllm.train", "--cell", str(out / "cell.json"), "--out", str(out)]  # fmt: skip
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    # NVLink multicast stays off on shared hosts (device README); keep it so in child processes
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        env.setdefault(k, v)
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"TIMEOUT after {timeout_s}s\n{e.stdout or ''}{e.stderr or ''}"
    (out / "job.log").write_text(text if isinstance(text, str) else str(text))
    log(f"  job {c['name']}: rc {rc} in {time.time() - t0:.0f} s")
    res = None
    if (out / "result.json").exists():
        res = json.loads((out / "result.json").read_text())
    return rc, res, text


def probe(args: argparse.Namespace) -> None:
    import torch

    log("== environment")
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
        f"gpus {torch.cuda.device_count()}: {torch.cuda.get_device_name(0)}")  # fmt: skip
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,power.limit,clocks.max.sm,temperature.gpu",
                              "--format=csv"], capture_output=True, text=True, timeout=30).stdout  # fmt: skip
        log(smi.strip())
    except (OSError, subprocess.SubprocessError) as e:
        log(f"nvidia-smi: {e}")
    from charllm.telemetry.nvml_source import NvmlSource, cuda_uuid_of, driver_versions

    log(f"driver: {driver_versions()}")
    src = NvmlSource(uuid=cuda_uuid_of(0))
    log(f"NVML source: power from {src.power_source}; unsupported fields: {src.unsupported}")
    t0 = time.perf_counter()
    n = 200
    for _ in range(n):
        row = src.read()
    log(f"one NVML read of all fields: {(time.perf_counter() - t0) / n * 1e3:.3f} ms; sample: "
        + ", ".join(f"{k}={v:.1f}" for k, v in row.items()))  # fmt: skip
    # which NVML call costs what (one read of all fields took ~5 ms on an H100)
    n_fields = [f[1] for f in src._fields]
    for label, fn in [("field batch " + ",".join(f[0] for f in src._fields),
                       lambda: src.nvml.nvmlDeviceGetFieldValues(src.handle, n_fields))] + [
            (",".join(cols), f) for cols, f in src._calls]:  # fmt: skip
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        log(f"  {(time.perf_counter() - t0) / 50 * 1e3:7.3f} ms  {label}")
    for col, fid in [(f[0], f[1]) for f in src._fields]:
        t0 = time.perf_counter()
        for _ in range(20):
            src.nvml.nvmlDeviceGetFieldValues(src.handle, [fid])
        log(f"  {(time.perf_counter() - t0) / 20 * 1e3:7.3f} ms  field {col} alone")
    args.gpu_name = torch.cuda.get_device_name(0)
    args.gpu_type = "h200" if "H200" in args.gpu_name else "h100"


def sec_ref(args: argparse.Namespace) -> None:
    log("== ref: GPT-3 1.3B, seq 2048, mb 8, gb 32, bf16, compiled, through python -m charllm.train")
    c = cell("gpt3-1.3b", mb=8, gb=32, seq=2048, steps=10, profile=True, gpu_type=args.gpu_type, name="ref-gpt3-1.3b",
             warmup={"min_steps": 8, "max_steps": 45, "step_time_cv": 0.01, "temp_slope_c_per_s": 0.05,
                     "cv_window_steps": 5, "temp_window_s": 10.0})  # fmt: skip
    rc, res, text = run_job(c, args.work / "ref", timeout_s=330)
    if res is None or res["outcome"] != "ok":
        log(text[-3000:])
        SUMMARY.append(("ref run", f"rc {rc}", "ok", "FAIL"))
        return
    m = res["metrics"]
    for k in ("step_time_median_s", "step_time_p10_s", "step_time_p90_s", "tokens_per_s", "mfu", "energy_gpu_j",
              "energy_mem_j", "energy_counter_j", "energy_counter_over_sampled", "energy_per_step_j",
              "energy_per_token_j", "efficiency_samples_per_s_mj", "avg_power_w", "peak_power_w", "avg_gpu_temp_c",
              "peak_gpu_temp_c", "avg_sm_clock_mhz", "sampling_rate_min_hz", "telemetry_samples", "nvml_errors",
              "max_memory_allocated_bytes", "max_memory_reserved_bytes", "warmup_steps", "warmup_converged"):  # fmt: skip
        log(f"  {k:32s} {m.get(k)}")
    thr = {k: v for k, v in m.items() if k.startswith("throttle_") and v}
    log(f"  throttle (s): {thr}")
    log(f"  warmup: {json.dumps(res['provenance']['warmup'])}")
    log(
        f"  zeus window in the job ({res['provenance']['telemetry'].get('zeus')}): {m.get('zeus_window_s')} s, "
        f"gpu {m.get('zeus_gpu_energy_j')} J, cpu {m.get('zeus_cpu_energy_j')} J, zeus/sampled {m.get('zeus_over_sampled')}"
    )
    zr = m.get("zeus_over_sampled", float("nan"))
    SUMMARY.append(
        ("job's Zeus window / sampled integral (ref)", f"{zr:.4f}", "within 1 %", verdict(abs(zr - 1) <= 0.01))
    )
    mfu = m.get("mfu", 0.0)
    SUMMARY.append(("MFU gpt3-1.3b (compiled, bf16)", f"{mfu:.3f}", ">= 0.60", verdict(mfu >= 0.60)))
    ratio = m.get("energy_counter_over_sampled", float("nan"))
    SUMMARY.append(("energy: NVML counter / sampled power integral", f"{ratio:.4f}", "within 1 %",
                    verdict(abs(ratio - 1) <= 0.01)))  # fmt: skip
    rate = m.get("sampling_rate_min_hz", 0.0)
    SUMMARY.append(("sampling rate (min over GPUs), 20 Hz target", f"{rate:.2f} Hz", ">= 19 Hz", verdict(rate >= 19.0)))
    kfile = args.work / "ref" / "kernels_rank0.csv"
    if kfile.exists():
        log("  kernel breakdown (3 profiled steps):\n" + kfile.read_text())


def sec_overhead(args: argparse.Namespace) -> None:
    import torch

    from charllm.telemetry import NodeSource, Sampler, combine, gpu_window_summary
    from charllm.telemetry.nvml_source import NvmlSource, cuda_uuid_of
    from charllm.train.cell import CellSpec
    from charllm.train.dist import DistEnv, init_process_group
    from charllm.train.engine_torch import TorchEngine

    log("== overhead: step time with / without the 20 Hz sampler, same process, alternating blocks")
    spec = CellSpec.from_dict(cell("gpt3-1.3b", mb=8, gb=8, seq=2048, steps=1, gpu_type=args.gpu_type,
                                   warmup={"min_steps": 0, "max_steps": 1}))  # fmt: skip
    denv = DistEnv(0, 1, 0, "single")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    init_process_group(denv, dev)
    eng = TorchEngine(spec, denv, dev)
    step = 0

    def steps(n: int) -> list[float]:
        nonlocal step
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            eng.step(step)
            eng.sync()
            out.append(time.perf_counter() - t0)
            step += 1
        return out

    t0 = time.time()
    steps(12)  # compile + warm
    log(f"  compile + 12 warm steps: {time.time() - t0:.0f} s")
    steps(40)  # towards thermal steady state, so drift within the comparison is small
    uuid = cuda_uuid_of(0)
    on_t: list[float] = []
    off_t: list[float] = []
    blocks = []
    # ABBA quads of short blocks: each quad's ratio cancels a linear drift (temperature,
    # clocks under the power cap) between its blocks; the median over quads is the estimate
    order = ["on", "off", "off", "on"] * 8
    frames = []
    for mode in order:
        if mode == "on":
            s = Sampler([NvmlSource(uuid=uuid), NodeSource()], 20.0, {"host": "x", "rank": 0, "local_rank": 0}).start()
            ts = steps(6)
            s.stop()
            frames.append((s, ts))
            on_t += ts
        else:
            ts = steps(6)
            off_t += ts
        blocks.append((mode, statistics.median(ts)))
    med_on, med_off = statistics.median(on_t), statistics.median(off_t)
    quads = []
    for i in range(0, len(blocks), 4):
        q = blocks[i : i + 4]
        on_ = sum(v for m_, v in q if m_ == "on")
        off_ = sum(v for m_, v in q if m_ == "off")
        quads.append(on_ / off_)
    ratio = statistics.median(quads)
    log("  block medians (s): " + ", ".join(f"{m}:{v:.4f}" for m, v in blocks))
    log("  ABBA quad ratios: " + ", ".join(f"{q:.4f}" for q in quads))
    log(f"  median quad ratio {ratio:.4f} (min {min(quads):.4f}, max {max(quads):.4f}); ratio of step medians "
        f"{med_on / med_off:.4f} (on {med_on:.5f} s, off {med_off:.5f} s); "
        f"mean on {statistics.fmean(on_t):.5f}, off {statistics.fmean(off_t):.5f}")  # fmt: skip
    SUMMARY.append(("telemetry overhead: step time with/without sampler", f"{ratio:.4f}", "<= 1.005",
                    verdict(ratio <= 1.005)))  # fmt: skip
    # energy + rate over every "on" block
    sums = []
    for s, _ in frames:
        df = s.frame()
        t0_, t1_ = df["unix_s"].iloc[1], df["unix_s"].iloc[-2]
        sums.append(gpu_window_summary(df, t0_, t1_))
    c = combine(sums)
    log(f"  'on' blocks: sampled {c['energy_gpu_j']:.1f} J, counter {c['energy_counter_j']:.1f} J, "
        f"ratio {c['energy_counter_j'] / c['energy_gpu_j']:.4f}; min rate {c['sampling_rate_min_hz']:.2f} Hz; "
        f"nvml errors {c.get('nvml_errors')}")  # fmt: skip
    # Zeus cross-check over one more block with our sampler on
    try:
        from zeus.monitor import ZeusMonitor

        zm = ZeusMonitor(gpu_indices=[0])
        s = Sampler([NvmlSource(uuid=uuid), NodeSource()], 20.0, {"host": "x", "rank": 0, "local_rank": 0}).start()
        time.sleep(0.3)
        zm.begin_window("block")
        w0 = time.time()
        steps(20)
        meas = zm.end_window("block")
        w1 = time.time()
        time.sleep(0.3)
        s.stop()
        ours = gpu_window_summary(s.frame(), w0, w1)
        z = meas.gpu_energy[0]
        log(f"  Zeus {meas.time:.3f} s {z:.1f} J; ours sampled {ours['energy_gpu_j']:.1f} J "
            f"counter {ours['energy_counter_j']:.1f} J; zeus/sampled {z / ours['energy_gpu_j']:.4f}")  # fmt: skip
        SUMMARY.append(("energy: Zeus ZeusMonitor / our sampled integral", f"{z / ours['energy_gpu_j']:.4f}",
                        "within 1 %", verdict(abs(z / ours["energy_gpu_j"] - 1) <= 0.01)))  # fmt: skip
    except ImportError as e:
        log(f"  zeus not importable here ({e}); cross-check skipped")
    import torch.distributed as dist

    dist.destroy_process_group()
    torch.cuda.empty_cache()


def sec_replay(args: argparse.Namespace) -> None:
    log("== replay: GPT-3 125M short run kept as replay test data")
    c = cell("gpt3-125m", mb=8, gb=16, seq=1024, steps=20, compile_=False, profile=True, gpu_type=args.gpu_type,
             name="replay-gpt3-125m", warmup={"min_steps": 3, "max_steps": 15, "step_time_cv": 0.05,
                                             "temp_slope_c_per_s": 0.5, "temp_window_s": 2.0})  # fmt: skip
    rc, res, text = run_job(c, args.work / "replay", timeout_s=150)
    ok = res is not None and res["outcome"] == "ok"
    if not ok:
        log(text[-3000:])
    else:
        m = res["metrics"]
        log(f"  mfu {m.get('mfu')}, samples {m.get('telemetry_samples')}, energy ratio "
            f"{m.get('energy_counter_over_sampled')}")  # fmt: skip
        log(f"  zeus window in the job ({res['provenance']['telemetry'].get('zeus')}): "
            f"{m.get('zeus_window_s')} s, gpu {m.get('zeus_gpu_energy_j')} J, cpu {m.get('zeus_cpu_energy_j')} J; "
            f"sampled gpu {m.get('energy_gpu_j')} J, counter {m.get('energy_counter_j')} J; zeus/sampled "
            f"{m.get('zeus_over_sampled')}")  # fmt: skip
        zr = m.get("zeus_over_sampled", float("nan"))
        SUMMARY.append(("job's Zeus window / sampled integral (125M)", f"{zr:.4f}", "within 5 %",
                        verdict(abs(zr - 1) <= 0.05)))  # fmt: skip
    SUMMARY.append(("replay-data run (125M) through the entry point", f"rc {rc}", "ok", verdict(ok)))


def sec_oom(args: argparse.Namespace) -> None:
    log("== oom: 1.3B with micro batch 64 must end with status 42 and outcome oom")
    c = cell("gpt3-1.3b", mb=64, gb=64, seq=2048, steps=2, compile_=False, gpu_type=args.gpu_type, name="oom-mb64",
             warmup={"min_steps": 0, "max_steps": 1})  # fmt: skip
    rc, res, text = run_job(c, args.work / "oom", timeout_s=120)
    ok = rc == 42 and res is not None and res["outcome"] == "oom"
    if res:
        log(f"  result: {json.dumps(res.get('oom'))}")
    if not ok:
        log(text[-2000:])
    SUMMARY.append(("OOM cell -> exit 42 + outcome oom", f"rc {rc}, {res and res['outcome']}", "42, oom", verdict(ok)))


def sec_modes(args: argparse.Namespace) -> None:
    log("== modes: one-GPU smoke runs of FSDP2+recompute (gpt3) and llama RoPE/GQA (compiled)")
    w = {"min_steps": 2, "max_steps": 4, "step_time_cv": 0.5, "temp_slope_c_per_s": 10.0}
    runs = [
        cell("gpt3-350m", mb=4, gb=8, seq=2048, steps=5, compile_=True, recompute=True, fsdp=True,
             gpu_type=args.gpu_type, name="fsdp-recompute-350m", warmup=w),
        cell("llama3-8b", layers=2, mb=2, gb=4, seq=4096, steps=5, compile_=True, gpu_type=args.gpu_type,
             name="llama3-8b-L2", warmup=w),
    ]  # fmt: skip
    _smoke(args, runs, timeout_s=150, label="mode")


def _smoke(args: argparse.Namespace, runs: list[dict], timeout_s: float, label: str) -> None:
    """Run each cell through the entry point; one line each, and a summary row (ok = the job finished ok)."""
    for c in runs:
        rc, res, text = run_job(c, args.work / c["name"], timeout_s=timeout_s)
        ok = res is not None and res["outcome"] == "ok"
        if ok:
            m = res["metrics"]
            log(f"  {c['name']}: step {m['step_time_median_s']:.4f} s, mfu {m.get('mfu', 0):.4f}, hfu {m.get('hfu')}, "
                f"loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}, {m.get('avg_power_w', 0):.0f} W, "
                f"mem {m.get('max_memory_allocated_bytes', 0) / 2**30:.1f} GiB, engine {res['provenance']['engine']}")  # fmt: skip
        else:
            log(text[-3000:])
        SUMMARY.append((f"{label} {c['name']}", f"rc {rc}" + (f", mfu {res['metrics'].get('mfu', 0):.4f}" if ok else ""),
                        "ok", verdict(ok)))  # fmt: skip


SCALE_W = {"min_steps": 4, "max_steps": 8, "step_time_cv": 0.01, "temp_slope_c_per_s": 1.0, "temp_window_s": 5.0}


def _short(args: argparse.Namespace, name: str, nproc: int = 1, gb_per_gpu: int = 32, **kw: object) -> dict | None:
    c = cell("gpt3-1.3b", mb=8, gb=gb_per_gpu * nproc, seq=2048, steps=8, dp=nproc, gpu_type=args.gpu_type,
             name=name, warmup=SCALE_W, **kw)  # fmt: skip
    rc, res, text = run_job(c, args.work / name, timeout_s=240, nproc=nproc)
    if res is None or res["outcome"] != "ok":
        log(text[-2500:])
        SUMMARY.append((name, f"rc {rc}", "ok", "FAIL"))
        return None
    m = res["metrics"]
    log(f"  {name}: step {m['step_time_median_s']:.4f} s, {m['tokens_per_s']:,.0f} tok/s, mfu {m.get('mfu', 0):.4f}, "
        f"{m.get('avg_power_w', 0):.0f} W avg, sm {m.get('avg_sm_clock_mhz', 0):.0f} MHz, "
        f"mem {m.get('max_memory_allocated_bytes', 0) / 2**30:.1f} GiB")  # fmt: skip
    return m


VARIANTS: dict[str, dict] = {
    "var-compile": {},
    "var-compile-fsdp1": {"fsdp": True},
    "var-compile-noloss": {"compile_loss": False},
    "var-max-autotune": {"compile_mode": "max-autotune-no-cudagraphs"},
    "var-flash": {"attn_backend": "flash"},
    "var-cudnn": {"attn_backend": "cudnn"},
    "var-fsdp-zero2": {"fsdp": True, "fsdp_reshard_after_forward": False},
    "var-cudnn-fsdp-zero2": {"fsdp": True, "fsdp_reshard_after_forward": False, "attn_backend": "cudnn"},
    "var-cudnn-fsdp-zero2-autotune": {
        "fsdp": True,
        "fsdp_reshard_after_forward": False,
        "attn_backend": "cudnn",
        "compile_mode": "max-autotune-no-cudagraphs",
    },
}


def sec_variants(args: argparse.Namespace) -> None:
    """MFU of the 1.3B reference under engine options (one GPU, gb 32, 8 measured steps)."""
    log(f"== variants: GPT-3 1.3B mb 8 gb 32 bf16 on one GPU: {args.variant_names}")
    for name in args.variant_names.split(","):
        if args.deadline_s - (time.time() - T_START) < 70:
            log(f"  {name}: skipped (time)")
            continue
        kw = dict(VARIANTS[name])
        fsdp = bool(kw.pop("fsdp", False))
        m = _short(args, name, fsdp=fsdp, opt_extra=kw)
        if m is not None:
            args.variants[name] = m
            SUMMARY.append((f"MFU {name}", f"{m.get('mfu', 0):.4f}", ">= 0.60", verdict(m.get("mfu", 0) >= 0.60)))


def sec_attn(args: argparse.Namespace) -> None:
    """SDPA forward+backward per backend at the reference cell's attention shape."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, s, d = 8, 16, 2048, 128
    log(f"== attn: causal SDPA fwd+bwd, bf16, (b, heads, seq, head_dim) = ({b}, {h}, {s}, {d})")
    flops = 4 * b * h * s * s * d / 2 * 3.5  # causal fwd (QK^T, PV) + bwd at 2.5x fwd
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    ref = None
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):  # fmt: skip
        try:
            with sdpa_kernel([be]):
                for _ in range(3):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    out.backward(torch.ones_like(out))
                torch.cuda.synchronize()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                n = 20
                for _ in range(n):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    out.backward(torch.ones_like(out))
                e1.record()
                torch.cuda.synchronize()
            ms = e0.elapsed_time(e1) / n
            o = out.detach().float()
            ref = o if ref is None else ref
            rel = float((o - ref).norm() / ref.norm())
            log(f"  {name:10s} {ms:7.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s  rel diff to flash {rel:.2e}")
        except RuntimeError as e:
            log(f"  {name:10s} unavailable: {str(e).splitlines()[0][:160]}")
        q.grad = k.grad = v.grad = None


def _gpus_or_skip(section: str) -> int:
    """The GPUs of this machine; 0 (the skip logged) where a multi-GPU section has only one."""
    import torch

    n = torch.cuda.device_count()
    if n < 2:
        log(f"== {section}: skipped (one GPU)")
        return 0
    return n


def _weak_scaling_row(label: str, row: str, n: int, m: dict, m1: dict) -> None:
    """Log and summarise the weak-scaling efficiency of ``m`` (``n`` GPUs) against ``m1`` (one GPU)."""
    eff = m["tokens_per_s"] / (n * m1["tokens_per_s"])
    log(f"  {label}: {m['tokens_per_s']:,.0f} tok/s vs {n} x {m1['tokens_per_s']:,.0f}: efficiency {eff:.4f}")
    SUMMARY.append((row, f"{eff:.4f}", ">= 0.98", verdict(eff >= 0.98)))


def sec_scale(args: argparse.Namespace) -> None:
    n = _gpus_or_skip("scale")
    if not n:
        return
    log(f"== scale: weak scaling on {n} GPUs (same per-GPU batch: mb 8, 4 micro batches), GPT-3 1.3B, compiled")
    for label, fsdp, overlap, base in (("ddp", False, True, "var-compile"), ("fsdp", True, False, "var-compile-fsdp1")):
        m1 = args.variants.get(base) or _short(args, base, fsdp=fsdp)
        if m1 is None:
            continue
        args.variants[base] = m1
        m = _short(args, f"scale-{label}{n}", nproc=n, fsdp=fsdp, overlap=overlap)
        if m is None:
            continue
        _weak_scaling_row(label, f"weak scaling {label} x{n} (vs same config x1)", n, m, m1)


def sec_scale_ablate(args: argparse.Namespace) -> None:
    """Weak scaling x2 under gradient-sync options, each against the same config on one GPU."""
    n = _gpus_or_skip("scale_ablate")
    if not n:
        return
    log(f"== scale_ablate: weak scaling x{n} under gradient-sync options (GPT-3 1.3B, mb 8, 4 micro batches)")
    configs = [
        ("ddp-overlap-b25", "var-compile", {"overlap": True}),
        ("ddp-after-backward", "var-compile", {"overlap": False}),
        ("ddp-overlap-b200", "var-compile", {"overlap": True, "opt_extra": {"ddp_bucket_mb": 200}}),
        ("fsdp-zero2", "var-fsdp-zero2", {"fsdp": True, "opt_extra": {"fsdp_reshard_after_forward": False}}),
        ("fsdp-zero3", "var-compile-fsdp1", {"fsdp": True}),
    ]
    for label, base, kw in configs:
        if args.deadline_s - (time.time() - T_START) < 100:
            log(f"  {label}: skipped (time)")
            continue
        if base not in args.variants:
            bkw = {k: v for k, v in kw.items() if k != "overlap"}
            m1 = _short(args, base, **bkw)
            if m1 is None:
                continue
            args.variants[base] = m1
        m1 = args.variants[base]
        m = _short(args, f"scale-{label}-x{n}", nproc=n, **kw)
        if m is None:
            continue
        _weak_scaling_row(label, f"weak scaling {label} x{n}", n, m, m1)


def sec_multi(args: argparse.Namespace) -> None:
    """Tensor and pipeline parallelism over NCCL on 2 GPUs (the CPU tests cover them on gloo)."""
    n = _gpus_or_skip("multi")
    if not n:
        return
    log("== multi: TP2 (llama3-8b, 2 layers, compiled) and PP2 (gpt3-1.3b, 8 layers, 1F1B, profiled) over NCCL")
    w = {"min_steps": 2, "max_steps": 4, "step_time_cv": 0.5, "temp_slope_c_per_s": 10.0}
    runs = [
        cell("llama3-8b", layers=2, mb=2, gb=4, seq=4096, steps=5, gpu_type=args.gpu_type, name="tp2-llama3-8b-L2",
             warmup=w),
        cell("gpt3-1.3b", layers=8, mb=4, gb=16, seq=2048, steps=5, profile=True, gpu_type=args.gpu_type,
             name="pp2-gpt3-1.3b-L8", warmup=w),
    ]  # fmt: skip
    runs[0]["parallel"].update(tp=2, dp=1)
    runs[1]["parallel"].update(pp=2, dp=1)
    for c in runs:
        c["world_size"] = 2
        rc, res, text = run_job(c, args.work / c["name"], timeout_s=180, nproc=2)
        ok = res is not None and res["outcome"] == "ok"
        if ok:
            m = res["metrics"]
            log(f"  {c['name']}: step {m['step_time_median_s']:.4f} s, mfu {m.get('mfu', 0):.3f}, loss "
                f"{m['loss_first']:.3f} -> {m['loss_last']:.3f}, nvlink tx {m.get('nvlink_tx_bytes', 0) / 1e9:.2f} GB, "
                f"engine {res['provenance']['engine']}")  # fmt: skip
            for r in range(2):
                k = args.work / c["name"] / f"kernels_rank{r}.csv"
                if k.exists():
                    log(f"  kernels rank {r}:\n" + k.read_text())
        else:
            log(text[-3000:])
        SUMMARY.append((f"NCCL {c['name']}", f"rc {rc}", "ok", verdict(ok)))


# the megatron section's variants: name -> (model, layers, mb, gb, seq, opt fields). The seed's codes:
# 00000 = nothing, 10000 = "cc" overlap, 01000 = full recompute (docs/optimisation-codes.md)
MEGATRON_VARIANTS: dict[str, tuple[str, int | None, int, int, int, dict]] = {
    "meg-1.3b-00000": ("gpt3-1.3b", None, 8, 32, 2048, {}),
    "meg-1.3b-10000-cc": ("gpt3-1.3b", None, 8, 32, 2048, {"overlap": True}),
    "meg-1.3b-01000-full-recompute": ("gpt3-1.3b", None, 8, 32, 2048, {"recompute": True}),
    "meg-1.3b-selective-recompute": (
        "gpt3-1.3b", None, 8, 32, 2048, {"recompute": True, "recompute_granularity": "selective"}),
    "meg-mixtral-8x7b-L2-ep1": ("mixtral-8x7b", 2, 1, 8, 4096, {}),
}  # fmt: skip
# more code paths on one GPU, by name (--megatron-variants): FSDP2 on a one-rank mesh, RoPE/GQA
# dense, MoE with full recompute
MEGATRON_EXTRA_VARIANTS: dict[str, tuple[str, int | None, int, int, int, dict]] = {
    "meg-1.3b-fsdp1": ("gpt3-1.3b", None, 8, 32, 2048, {"fsdp": True}),
    "meg-llama3-8b-L2": ("llama3-8b", 2, 2, 8, 4096, {}),
    "meg-mixtral-8x7b-L2-ep1-full-recompute": ("mixtral-8x7b", 2, 1, 8, 4096, {"recompute": True}),
}  # fmt: skip
MEGATRON_MFU_TARGET = 0.50  # the 1.3B cell, plain (00000) and with overlap (10000)


def sec_megatron(args: argparse.Namespace) -> None:
    """The megatron-core engine on one GPU: bf16 params + distributed optimizer, overlap, recompute, MoE proxy.

    Each variant runs through ``python -m charllm.train`` (Megatron's GPTModel, DDP with the
    distributed optimizer, the no-pipelining schedule; local layer spec with SDPA attention
    where Transformer Engine is absent). One summary row per variant with its MFU (and HFU
    with recompute); the 1.3B variants without recompute are held to MFU >= 0.50.
    """
    try:
        import megatron.core  # noqa: F401
    except ImportError as e:
        log(f"== megatron: skipped, megatron-core not importable ({e})")
        SUMMARY.append(("megatron engine", "not installed", "", "n/a"))
        return
    names = [n for n in args.megatron_variants.split(",") if n]
    log(f"== megatron: {names} through python -m charllm.train (one GPU, bf16)")
    w = {"min_steps": 3, "max_steps": 8, "step_time_cv": 0.02, "temp_slope_c_per_s": 1.0, "temp_window_s": 5.0}
    for name in names:
        if args.deadline_s - (time.time() - T_START) < 80:
            log(f"  {name}: skipped (time)")
            SUMMARY.append((f"megatron {name}", "skipped (time)", "", "n/a"))
            continue
        model, layers, mb, gb, seq, opt = {**MEGATRON_VARIANTS, **MEGATRON_EXTRA_VARIANTS}[name]
        opt = dict(opt)
        recompute = bool(opt.pop("recompute", False))
        c = cell(model, layers=layers, mb=mb, gb=gb, seq=seq, steps=6, compile_=False, recompute=recompute,
                 overlap=bool(opt.pop("overlap", False)), fsdp=bool(opt.pop("fsdp", False)), engine="megatron",
                 gpu_type=args.gpu_type, name=name, warmup=w, opt_extra=opt)  # fmt: skip
        rc, res, text = run_job(c, args.work / name, timeout_s=300)
        ok = res is not None and res["outcome"] == "ok"
        if not ok:
            log(text[-3000:])
            SUMMARY.append((f"megatron {name}", f"rc {rc}, {res and res['outcome']}", "ok", "FAIL"))
            continue
        m, eng = res["metrics"], res["provenance"]["engine"]
        mfu, hfu = m.get("mfu", 0.0), m.get("hfu")
        log(f"  {name}: step {m['step_time_median_s']:.4f} s, {m['tokens_per_s']:,.0f} tok/s, mfu {mfu:.4f}, "
            f"hfu {hfu}, loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}, {m.get('avg_power_w', 0):.0f} W, "
            f"mem {m.get('max_memory_allocated_bytes', 0) / 2**30:.1f} GiB")  # fmt: skip
        log(f"    engine: {json.dumps(eng)}")
        gated = name.startswith("meg-1.3b-") and not recompute
        value = f"mfu {mfu:.4f}" + (f" hfu {hfu:.4f}" if recompute and hfu else "")
        target = f">= {MEGATRON_MFU_TARGET}" if gated else "runs"
        SUMMARY.append((f"megatron {name}", value, target, verdict(mfu >= MEGATRON_MFU_TARGET if gated else True)))


SECTIONS = {"ref": sec_ref, "overhead": sec_overhead, "replay": sec_replay, "oom": sec_oom, "modes": sec_modes,
            "variants": sec_variants, "attn": sec_attn, "megatron": sec_megatron, "scale": sec_scale, "scale_ablate": sec_scale_ablate,
            "multi": sec_multi}  # fmt: skip
# the least a section needs (s); it is skipped when less than this is left of --deadline-s
MIN_S = {
    "multi": 60,
    "ref": 200,
    "overhead": 100,
    "replay": 40,
    "oom": 30,
    "modes": 90,
    "variants": 70,
    "attn": 20,
    "megatron": 100,
    "scale": 150,
    "scale_ablate": 150,
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="ref,overhead,replay,oom,modes")
    ap.add_argument("--deadline-s", type=float, default=560.0)
    ap.add_argument("--megatron-variants", default=",".join(MEGATRON_VARIANTS),
                    help="comma list of MEGATRON_VARIANTS (default: all) or MEGATRON_EXTRA_VARIANTS names "
                    "for the megatron section")  # fmt: skip
    ap.add_argument("--variants", dest="variant_names", default="var-compile,var-compile-fsdp1,var-compile-noloss,"
                    "var-max-autotune", help="comma list of VARIANTS names for the variants section")  # fmt: skip
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.variants = {}
    args.work = Path("/tmp/charllm-validate")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    probe(args)
    for name in args.sections.split(","):
        left = args.deadline_s - (time.time() - T_START)
        if left < MIN_S[name]:
            log(f"== {name}: skipped, {left:.0f} s left")
            SUMMARY.append((name, "skipped", "", "n/a"))
            continue
        t0 = time.time()
        try:
            SECTIONS[name](args)
        except Exception:
            log(traceback.format_exc())
            SUMMARY.append((name, "exception", "", "FAIL"))
        log(f"   ({name}: {time.time() - t0:.0f} s)")
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        for p in sorted(args.work.rglob("*")):
            if p.is_file() and p.stat().st_size < 8 << 20:
                tar.add(p, arcname=str(p.relative_to(args.work)))
    log("")
    log(f"== summary ({args.gpu_name}, {time.time() - T_START:.0f} s)")
    log(f"| {'check':52s} | {'value':16s} | {'target':10s} | verdict |")
    log(f"|{'-' * 54}|{'-' * 18}|{'-' * 12}|---------|")
    for check, value, target, v in SUMMARY:
        log(f"| {check:52s} | {value:16s} | {target:10s} | {v:7s} |")
    (out / "validate.txt").write_text("\n".join(LINES) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

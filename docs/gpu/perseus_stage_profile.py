"""The single-GPU Perseus stage profiler at the GPU's current clock (clocks untouched, gpu_control deny).

For each pipeline stage of a model split ``--stages`` ways (stage s = its layers, the embedding
on the first, the head and loss on the last), run iterations of the stage's own 1F1B order of
``--micro-batches`` forwards and backwards on the one GPU for at least ``--window-s`` seconds,
with a host pause of ``--gap-ms`` after each instruction standing in for point-to-point waits.
Every instruction is timed with CUDA events (``charllm.energy.recorder``); a thread samples
NVML's cumulative energy counter every 10 ms; :mod:`charllm.energy.attribution` gives each
instruction its energy and the gaps their idle energy. Checks, per stage window:

- sum of instruction energy + idle energy against the counter's own difference over the window
  (read directly at its ends, not interpolated): within 3 %;
- the stage's time per iteration (its forwards + backwards): CV < 2 %.

Writes ``perseus-stage-profile.json`` (every number), ``stage_profile.csv`` (Zeus's schema at
the current clock), ``instructions-stage<s>.csv`` with ``instruction_steps-stage<s>.json`` (the
timelines) and ``energy_series.csv`` (every counter sample) into ``--out``.

    python docs/gpu/perseus_stage_profile.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from charllm import modelcat
from charllm.energy.attribution import (
    EnergySeries,
    idle_energy,
    instruction_energy,
    stage_profile,
    write_stage_profile,
    write_timeline,
)
from charllm.energy.planner import onef1b_order
from charllm.energy.recorder import InstructionRecorder
from charllm.train.model import Transformer, loss_fn, split_layers


class FakeCounter:
    """--cpu-smoke only: a 100 W counter updated every 100 ms, to exercise the code without a GPU."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.joules: list[float] = []
        self._t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def read(self) -> tuple[float, float]:
        t = time.time()
        return t, 100.0 * ((t - self._t0) // 0.1) * 0.1

    def sm_clock(self) -> int:
        return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            t, e = self.read()
            self.times.append(t)
            self.joules.append(e)
            time.sleep(0.01)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Counter:
    """NVML's cumulative energy counter (J) of one GPU, sampled by a thread every ``period_s``."""

    def __init__(self, index: int, period_s: float = 0.01) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nv, self.h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        self.period_s = period_s
        self.times: list[float] = []
        self.joules: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def read(self) -> tuple[float, float]:
        t = time.time()
        return t, self.nv.nvmlDeviceGetTotalEnergyConsumption(self.h) / 1e3

    def sm_clock(self) -> int:
        return int(self.nv.nvmlDeviceGetClockInfo(self.h, self.nv.NVML_CLOCK_SM))

    def _loop(self) -> None:
        while not self._stop.is_set():
            t, e = self.read()
            if not self.times or t > self.times[-1]:
                self.times.append(t)
                self.joules.append(e)
            time.sleep(self.period_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_stage(args: argparse.Namespace, s: int, counter: Counter | FakeCounter, out: Path) -> dict:
    shape = modelcat.get(args.model, args.proxy_layers)
    layers = split_layers(shape.n_layers, args.stages)[s]
    first, last = s == 0, s == args.stages - 1
    dev = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    autocast = None if args.cpu_smoke else torch.bfloat16
    model = Transformer(shape, args.seq, layers, first=first, last=last, autocast_dtype=autocast)
    model.to(dev)
    model.init_weights(1234 + s)
    model.train()
    mb, seq, m = args.micro_batch, args.seq, args.micro_batches
    gen = torch.Generator(device=dev).manual_seed(s)
    if first:
        inputs = [torch.randint(0, shape.vocab_size, (mb, seq), device=dev, generator=gen) for _ in range(m)]
    else:
        inputs = [torch.randn(mb, seq, shape.hidden, device=dev, generator=gen) for _ in range(m)]
    targets = [torch.randint(0, shape.vocab_size, (mb, seq), device=dev, generator=gen) for _ in range(m)]
    grad_out = torch.full((mb, seq, shape.hidden), 1e-4, device=dev)
    rec = InstructionRecorder(dev, s)
    order = onef1b_order(args.stages, m, s)
    gap = args.gap_ms / 1e3

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def iteration(step: int) -> None:
        outs: dict[int, torch.Tensor] = {}
        rec.begin_step(step)
        for ins, i in order:
            if ins == "forward":
                with rec.instruction("forward", i):
                    x = inputs[i] if first else inputs[i].detach().requires_grad_(True)
                    y = model(x)
                    outs[i] = loss_fn(y, targets[i]) / m if last else y
            else:
                with rec.instruction("backward", i):
                    y = outs.pop(i)
                    if last:
                        y.backward()
                    else:
                        y.backward(grad_out)
            time.sleep(gap)  # a point-to-point wait: the GPU idles
        rec.end_step()

    for w in range(args.warmup_iters):
        iteration(-1 - w)
    rec.rows.clear()
    rec.steps.clear()
    sync()
    time.sleep(0.25)
    t0, e0 = counter.read()
    n = 0
    while time.time() - t0 < args.window_s:
        iteration(n)
        n += 1
    sync()
    time.sleep(0.25)
    t1, e1 = counter.read()
    time.sleep(0.3)  # let the sampler pass t1
    series = EnergySeries(counter.times, counter.joules)
    energies = instruction_energy(series, rec.rows)
    idle = idle_energy(series, rec.rows, t0, t1)
    direct = e1 - e0
    attributed = sum(energies) + idle
    per_iter = [sum(r.duration for r in rec.rows if r.step == k) for k in range(n)]
    cv = statistics.pstdev(per_iter) / statistics.mean(per_iter)
    clock = counter.sm_clock()
    write_timeline(rec.rows, out / f"instructions-stage{s}.csv", energies)
    steps = {"stage": s, "window": [t0, t1], "counter_at_ends_j": [e0, e1], "steps": rec.steps}
    (out / f"instruction_steps-stage{s}.json").write_text(json.dumps(steps) + "\n")
    by: dict[str, list[float]] = {"forward": [], "backward": []}
    for r in rec.rows:
        by[r.instruction].append(r.duration)
    res = {
        "stage": s,
        "layers": [layers.start, layers.stop],
        "iterations": n,
        "window_s": t1 - t0,
        "instructions": len(rec.rows),
        "instruction_energy_j": sum(energies),
        "idle_energy_j": idle,
        "attributed_j": attributed,
        "counter_j": direct,
        "attributed_over_counter": attributed / direct,
        "mean_power_w": direct / (t1 - t0),
        "busy_fraction": sum(r.duration for r in rec.rows) / (t1 - t0),
        "stage_time_per_iteration_s": statistics.mean(per_iter),
        "stage_time_cv": cv,
        "forward_cv": statistics.pstdev(by["forward"]) / statistics.mean(by["forward"]),
        "backward_cv": statistics.pstdev(by["backward"]) / statistics.mean(by["backward"]),
        "sm_clock_mhz_end": clock,
    }
    samples = [(s, clock, r, e) for r, e in zip(rec.rows, energies, strict=True)]
    res["profile"] = [
        {
            "instruction": p.instruction,
            "frequency": p.frequency,
            "time": p.time,
            "energy": p.energy,
            "window_s": p.window_s,
        }
        for p in stage_profile(samples)
    ]
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the stage's model is freed when this function returns
    return {"result": res, "samples": samples}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt3-1.3b")
    ap.add_argument("--proxy-layers", type=int, default=None)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--window-s", type=float, default=12.0)
    ap.add_argument("--gap-ms", type=float, default=3.0)
    ap.add_argument("--warmup-iters", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: a fake 100 W counter (exercises the code only)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    counter = FakeCounter() if args.cpu_smoke else Counter(0)
    clock_before = counter.sm_clock()
    counter.start()
    stages, samples = [], []
    try:
        for s in range(args.stages):
            got = run_stage(args, s, counter, args.out)
            stages.append(got["result"])
            samples += got["samples"]
            r = got["result"]
            print(
                f"stage {s}: {r['iterations']} iterations in {r['window_s']:.2f} s; instructions "
                f"{r['instruction_energy_j']:.1f} J + idle {r['idle_energy_j']:.1f} J = {r['attributed_j']:.1f} J; "
                f"counter {r['counter_j']:.1f} J (ratio {r['attributed_over_counter']:.4f}); "
                f"stage time/iter {r['stage_time_per_iteration_s'] * 1e3:.2f} ms CV {r['stage_time_cv'] * 100:.2f} %; "
                f"{r['mean_power_w']:.0f} W, busy {r['busy_fraction'] * 100:.1f} %, SM {r['sm_clock_mhz_end']} MHz",
                flush=True,
            )
    finally:
        counter.stop()
    write_stage_profile(stage_profile(samples), args.out / "stage_profile.csv")
    with (args.out / "energy_series.csv").open("w") as fh:  # the raw counter samples, for replay tests
        fh.write("unix_s,energy_total_j\n")
        fh.writelines(f"{t!r},{e!r}\n" for t, e in zip(counter.times, counter.joules, strict=True))
    ok = all(abs(r["attributed_over_counter"] - 1) <= 0.03 and r["stage_time_cv"] < 0.02 for r in stages)
    summary = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "gpu": "cpu-smoke" if args.cpu_smoke else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "sm_clock_mhz_before": clock_before,
        "clocks_changed": False,
        "energy_samples": len(counter.times),
        "stages": stages,
        "checks": {"energy_within_3pct": [abs(r["attributed_over_counter"] - 1) <= 0.03 for r in stages],
                   "stage_time_cv_below_2pct": [r["stage_time_cv"] < 0.02 for r in stages], "pass": ok},
    }  # fmt: skip
    (args.out / "perseus-stage-profile.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("PASS" if ok else "FAIL", json.dumps(summary["checks"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Megatron-Kwai rematerialisation on one GPU: memory vs alpha per recompute mode, kwai vs full.

Reads the cells of ``include/campaigns/kwai-remat-1gpu.yaml`` as the job reads them (a JSON list
of ``Cell.job_config(0)``, written by ``--write-cells`` where pydantic is installed) and drives
the torch engine (:class:`charllm.train.engine_torch.TorchEngine`) in one process, so the sweep
pays one CUDA start-up instead of one per cell:

1. **sweep**: one engine built from the campaign's first cell with offload; for each cell
   (recompute mode x alpha) the model's recompute mode and the offloader's alpha are switched
   in place, the peak-memory counter reset, ``--sweep-steps`` optimizer steps run, and
   ``torch.cuda.max_memory_allocated`` read (Kwai's Figure 7 quantity: the AdamW state exists
   from the first step on), with the offloaded bytes and the NVML PCIe TX/RX byte counters
   (``NVML_FI_DEV_PCIE_COUNT_TX_BYTES``) over those steps. An out-of-memory error is that
   cell's result; the engine is rebuilt after it.
2. **compare**: fresh engines from the same seed for ``full`` at alpha 0 and ``kwai`` at its
   smallest alpha that fitted in the sweep, ``--compare-steps`` steps each: tokens/s (median
   step after the first three) and the loss curves.

Checks (printed, and in ``summary.json``): a least-squares line of peak memory against alpha
per mode (R^2 over the alphas that fitted, >= 3 needed); kwai/full tokens/s >= 1.10; the
largest relative loss difference over the steps <= 1 %; PCIe TX bytes / offloaded bytes
>= 0.9 for every swept cell with alpha > 0.

Usage (device): ``python3 benchmarks/kwai_remat_gpu.py --cells docs/gpu/kwai-remat-1gpu/cells.json --out OUT``

Options for a short device lease (``docs/gpu/kwai-remat-1gpu-run/``): ``--plan none:0.8,kwai:0.4,...``
runs only those cells, in that order (the others are rows ``not run``); ``--keep-pool`` keeps the
pinned host buffers across modes (reused by size: the largest mode's pool serves the others, so
the host memory is registered once); ``--warm-steps N`` runs N unmeasured steps after each engine
build (the AdamW state exists before the first measured step, so one measured step per cell
suffices); ``--deadline-unix T`` starts no cell after T - 8 s; ``--skip-compare``; ``sweep.json``
is rewritten after every cell. ``--device cpu`` (gloo, no NVML) dry-runs the script on a tiny cell.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_cells(campaign: str, out: str) -> None:
    from charllm.campaign import load_campaign

    lc = load_campaign(campaign)
    Path(out).write_text(json.dumps([c.job_config(0) for c in lc.cells], indent=1) + "\n")
    print(f"{len(lc.cells)} cells -> {out}")


def mode_of(raw: dict[str, Any]) -> str:
    return str(raw["opt"].get("recompute_granularity", "full")) if raw["opt"].get("recompute") else "none"


def r2(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """(slope, intercept, R^2) of the least-squares line."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx if sxx else 0.0
    icpt = my - slope * mx
    ss_res = sum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, icpt, (1 - ss_res / ss_tot) if ss_tot else 1.0


class Bench:
    def __init__(self, cells: list[dict[str, Any]], out: Path, device: str = "cuda") -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.cells, self.out = torch, cells, out
        self.cuda = device == "cuda"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        self.engine: Any = None
        self.keep_pool, self.warm_steps = False, 0
        import threading

        self.lock, self.stop = threading.Lock(), threading.Event()
        self.tx = self.rx = 0.0
        if not self.cuda:  # a CPU dry run: gloo, no NVML, memory counters read as 0
            dist.init_process_group("gloo", rank=0, world_size=1)
            self.device = torch.device("cpu")
            return
        from charllm.telemetry.nvml_source import NvmlSource

        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
        self.device = torch.device("cuda", 0)
        torch.cuda.set_device(self.device)
        self.nvml = NvmlSource(index=0)
        threading.Thread(target=self._sample, name="pcie", daemon=True).start()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> tuple[int, int]:
        """(max_memory_allocated, max_memory_reserved) since the last reset; 0 on CPU."""
        if not self.cuda:
            return 0, 0
        return int(self.torch.cuda.max_memory_allocated(self.device)), int(
            self.torch.cuda.max_memory_reserved(self.device)
        )

    def pcie(self) -> tuple[float, float]:
        """Bytes the GPU sent (TX) and received (RX) over PCIe since the start, unwrapped.

        NVML's PCIe byte counters are 32-bit and wrap at 2**32 (4.3 GB: several times a step at
        25 GB offloaded per step). A thread reads them every 5 ms (at most ~0.3 GB moves in
        between on PCIe 5 x16) and adds each difference modulo 2**32.
        """
        with self.lock:
            return self.tx, self.rx

    def _sample(self) -> None:
        mod = 2.0**32
        last: tuple[float, float] | None = None
        while not self.stop.is_set():
            row = self.nvml.read()
            cur = (
                float(row.get("pcie_tx_total_bytes", float("nan"))),
                float(row.get("pcie_rx_total_bytes", float("nan"))),
            )
            if last is not None:
                with self.lock:
                    self.tx += (cur[0] - last[0]) % mod
                    self.rx += (cur[1] - last[1]) % mod
            last = cur
            time.sleep(0.005)

    def build(self, raw: dict[str, Any]) -> Any:
        from charllm.train.cell import CellSpec
        from charllm.train.engine_torch import TorchEngine

        self.drop()
        cell = CellSpec.from_dict(raw)
        cell.check_engine("cuda")
        self.torch.manual_seed(cell.seed)
        t = time.time()
        self.engine = TorchEngine(cell, None, self.device)  # type: ignore[arg-type]
        print(f"built {cell.name} in {time.time() - t:.1f} s", flush=True)
        return self.engine

    def drop(self) -> None:
        self.engine = None
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def steps(self, n: int, first: int = 0) -> dict[str, Any]:
        """Run n steps; returns losses, step times, offloaded bytes and PCIe counter deltas per step."""
        eng = self.engine
        losses, times, off, pcie = [], [], [], []
        for i in range(n):
            tx0, rx0 = self.pcie()
            t0 = time.perf_counter()
            loss = eng.step(first + i)
            self.sync()
            times.append(time.perf_counter() - t0)
            tx1, rx1 = self.pcie()
            losses.append(float(loss))
            pcie.append((tx1 - tx0, rx1 - rx0))
            off.append(eng.offload_steps[-1] if eng.offload_steps else (0, 0))
        return {"losses": losses, "step_s": times, "offload": off, "pcie": pcie}

    def sweep(
        self, n_steps: int, plan: list[tuple[str, float]] | None = None, deadline: float | None = None
    ) -> list[dict[str, Any]]:
        torch = self.torch
        rows: list[dict[str, Any]] = []
        base = next(c for c in self.cells if c["opt"].get("offload_alpha"))
        step = 0
        # per mode, alphas from 1 down: once one runs out of memory, the smaller ones would too
        order = sorted(self.cells, key=lambda c: (mode_of(c), -float(c["opt"].get("offload_alpha", 0.0))))
        if plan is not None:  # the named cells in the named order; the others are rows "not run"
            by_key = {(mode_of(c), float(c["opt"].get("offload_alpha", 0.0))): c for c in self.cells}
            missing = [k for k in plan if k not in by_key]
            if missing:
                raise SystemExit(f"--plan names cells the campaign lacks: {missing}")
            order = [by_key[k] for k in plan] + [c for c in order if c not in [by_key[k] for k in plan]]
        planned = None if plan is None else {id(c) for c in order[: len(plan)]}
        oom_alpha: dict[str, float] = {}
        for raw in order:
            mode = mode_of(raw)
            alpha = float(raw["opt"].get("offload_alpha", 0.0))
            row0 = {"cell": raw["name"], "cell_id": raw["cell_id"], "recompute": mode, "alpha": alpha}
            if mode in oom_alpha and alpha <= oom_alpha[mode]:
                rows.append(
                    {**row0, "outcome": "oom", "error": "not run: a larger alpha of this mode ran out of memory"}
                )
                continue
            if planned is not None and id(raw) not in planned:
                rows.append({**row0, "outcome": "not_run", "error": "not run: not in --plan"})
                continue
            if deadline is not None and time.time() > deadline - 8:
                rows.append({**row0, "outcome": "not_run", "error": "not run: the device lease's deadline"})
                continue
            fresh = self.engine is None
            if fresh:
                self.build(base)
                step = 0
            eng = self.engine
            if mode != getattr(self, "last_mode", None):
                if not self.keep_pool:
                    eng.offloader.pool.clear()  # the previous mode's host buffers (other sizes)
                self.last_mode = mode
            eng.stage_model.recompute_mode = mode
            eng.stage_model.recompute = mode != "none"
            eng.offloader.alpha = alpha
            row: dict[str, Any] = dict(row0)
            try:
                if fresh and self.warm_steps:  # AdamW state and the host pool exist before the measured step
                    t = time.time()
                    self.steps(self.warm_steps, step)
                    step += self.warm_steps
                    row["warm_steps_s"] = time.time() - t
                self.reset_peak()
                r = self.steps(n_steps, step)
                step += n_steps
                mem_a, mem_r = self.peak()
                row.update(outcome="ok", max_memory_allocated_bytes=mem_a, max_memory_reserved_bytes=mem_r, **r)
                # the last step: offloaded bytes vs what crossed the bus (TX: device to host)
                o_out, o_in = r["offload"][-1]
                tx, rx = r["pcie"][-1]
                row["pcie_tx_over_offload"] = tx / o_out if o_out else None
                row["pcie_rx_over_fetch"] = rx / o_in if o_in else None
            except torch.OutOfMemoryError as err:
                row.update(outcome="oom", error=str(err).splitlines()[0][:300])
                oom_alpha[mode] = max(alpha, oom_alpha.get(mode, alpha))
            if row["outcome"] == "oom":
                eng = None
                self.drop()  # outside the except block: its traceback no longer holds the tensors
            print(
                json.dumps({k: v for k, v in row.items() if k not in ("losses", "step_s", "offload", "pcie")}),
                flush=True,
            )
            rows.append(row)
            (self.out / "sweep.json").write_text(json.dumps(rows, indent=1))
        self.drop()
        return rows

    def run_cell(self, raw: dict[str, Any], n: int) -> dict[str, Any]:
        torch = self.torch
        self.build(raw)
        self.reset_peak()
        bad: dict[str, Any] | None
        try:
            r = self.steps(n)
        except torch.OutOfMemoryError as err:
            bad = {"cell": raw["name"], "outcome": "oom", "error": str(err).splitlines()[0][:300]}
        else:
            bad = None
        if bad is not None:
            self.drop()
            return bad
        tokens = raw["global_batch"] * raw["seq_len"]
        med = statistics.median(r["step_s"][3:] or r["step_s"])
        out = {
            "cell": raw["name"],
            "outcome": "ok",
            "tokens_per_s": tokens / med,
            "step_time_median_s": med,
            "max_memory_allocated_bytes": self.peak()[0],
            **r,
        }
        self.drop()
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep-steps", type=int, default=2)
    ap.add_argument("--compare-steps", type=int, default=20)
    ap.add_argument("--write-cells", metavar="CAMPAIGN", help="write --cells from a campaign file and exit")
    ap.add_argument("--plan", help="comma-separated mode:alpha cells to run, in this order (default: all)")
    ap.add_argument("--keep-pool", action="store_true", help="keep the pinned host pool across modes")
    ap.add_argument("--warm-steps", type=int, default=0, help="unmeasured steps after each engine build")
    ap.add_argument("--deadline-unix", type=float, help="start no cell after this time minus 8 s")
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = ap.parse_args()
    if args.write_cells:
        write_cells(args.write_cells, args.cells)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = json.loads(Path(args.cells).read_text())
    plan = None
    if args.plan:
        plan = []
        for tok in args.plan.split(","):
            mode, _, a = tok.partition(":")
            plan.append((mode.strip(), float(a)))
    b = Bench(cells, out, args.device)
    b.keep_pool, b.warm_steps = args.keep_pool, args.warm_steps
    t0 = time.time()
    rows = b.sweep(args.sweep_steps, plan, args.deadline_unix)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    print(f"sweep: {len(rows)} cells in {time.time() - t0:.0f} s", flush=True)

    summary: dict[str, Any] = {"fits": {}, "checks": {}}
    for mode in ("none", "selective", "kwai", "full"):
        ok = [r for r in rows if r["recompute"] == mode and r["outcome"] == "ok"]
        if len(ok) >= 3:
            s, i, rr = r2([r["alpha"] for r in ok], [r["max_memory_allocated_bytes"] / 1e9 for r in ok])
            summary["fits"][mode] = {"slope_gb_per_alpha": s, "intercept_gb": i, "r2": rr, "points": len(ok)}
        else:
            summary["fits"][mode] = {"points": len(ok), "r2": None}
    ratios = [r["pcie_tx_over_offload"] for r in rows if r.get("pcie_tx_over_offload") is not None]
    summary["checks"]["pcie_tx_over_offload_min"] = min(ratios) if ratios else None

    def pick(mode: str, alpha: float | None) -> dict[str, Any] | None:
        for raw in cells:
            if mode_of(raw) == mode and (alpha is None or float(raw["opt"].get("offload_alpha", 0.0)) == alpha):
                return raw  # type: ignore[no-any-return]
        return None

    none0 = next((r for r in rows if r["recompute"] == "none" and r["alpha"] == 0.0), None)
    kw = sorted((r for r in rows if r["recompute"] == "kwai" and r["outcome"] == "ok"), key=lambda r: r["alpha"])
    summary["operating_point"] = {"none_alpha0": none0["outcome"] if none0 else None}
    full_raw = pick("full", 0.0)
    if kw and full_raw is not None and not args.skip_compare:
        a_star = kw[0]["alpha"]
        kw_raw = pick("kwai", a_star)
        full = b.run_cell(full_raw, args.compare_steps)
        kwai = b.run_cell(kw_raw, args.compare_steps) if kw_raw else {"outcome": "missing"}
        (out / "compare.json").write_text(json.dumps({"full": full, "kwai": kwai}, indent=1))
        summary["operating_point"].update(full=full["outcome"], kwai_alpha=a_star, kwai=kwai["outcome"])
        if full["outcome"] == kwai["outcome"] == "ok":
            speed = kwai["tokens_per_s"] / full["tokens_per_s"]
            dl = max(abs(a - b) / abs(b) for a, b in zip(kwai["losses"], full["losses"], strict=True))
            summary["checks"].update(
                kwai_over_full_tokens_per_s=speed,
                full_tokens_per_s=full["tokens_per_s"],
                kwai_tokens_per_s=kwai["tokens_per_s"],
                max_rel_loss_diff=dl,
                full_max_memory_allocated_bytes=full["max_memory_allocated_bytes"],
                kwai_max_memory_allocated_bytes=kwai["max_memory_allocated_bytes"],
            )
    summary["elapsed_s"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

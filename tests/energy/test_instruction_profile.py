"""``profile: instructions`` through the real job over gloo: PP2 (custom partition) and PP4, 1F1B.

Each rank's ``instructions-<rank>.csv`` must hold exactly m forwards and m backwards per step
in 1F1B order (torch.distributed.pipelining's Schedule1F1B), no two overlapping, and the
instructions plus the point-to-point posts and waits (and the stage's gradient scaling after its
last backward) must cover >= 95 % of each step's schedule window after the first.
Also: the skipped path of the job (a clock request where the gate denies it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charllm.energy.attribution import check_no_overlap, read_timeline
from charllm.energy.planner import onef1b_order
from tests.train.conftest import launch, make_cell

M = 8  # micro batches per step
MODEL = {
    "name": "tiny4", "family": "gpt3", "n_layers": 4, "hidden": 256, "n_heads": 4, "ffn_hidden": 1024,
    "vocab_size": 512, "n_kv_heads": 0, "num_experts": 0, "top_k": 0, "max_seq_len": 256,
}  # fmt: skip


def _covered(intervals: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Length of the union of intervals clipped to [t0, t1]."""
    total, cursor = 0.0, t0
    for a, b in sorted(intervals):
        a, b = max(a, cursor), min(b, t1)
        if b > a:
            total += b - a
            cursor = b
    return total


@pytest.mark.multiproc
@pytest.mark.parametrize(("pp", "partition"), [(2, "custom:0,1,4"), (4, "")])
def test_pipeline_instruction_timeline(tmp_path: Path, pp: int, partition: str) -> None:
    cell = make_cell(
        model=MODEL,
        parallel={"pp": pp, "pp_partition": partition},
        micro_batch=1,
        global_batch=M,
        seq_len=64,
        steps=2,
        opt={"profile_mode": "instructions"},
        warmup={"min_steps": 0, "max_steps": 0},
    )
    out = tmp_path / f"pp{pp}"
    proc = launch(cell, out, nproc=pp, timeout_s=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "result.json").read_text())["outcome"] == "ok"
    for rank in range(pp):
        rows = read_timeline(out / f"instructions-{rank}.csv")
        meta = json.loads((out / f"instruction_steps-{rank}.json").read_text())
        assert meta["stage"] == rank and meta["pp_partition"] == partition
        steps = meta["steps"]
        assert len(steps) >= 2
        check_no_overlap(rows)
        worst = 1.0
        for st in steps:
            first = st is steps[0]  # the pipeline's first step exchanges shapes and builds buffers
            mine = sorted((r for r in rows if r.step == st["step"]), key=lambda r: r.start)
            order = [(r.instruction, r.micro_batch) for r in mine]
            assert order == onef1b_order(pp, M, rank), f"rank {rank} step {st['step']}: {order}"
            busy = [(r.start, r.end) for r in mine]
            waits = [tuple(w) for w in st["waits"] + st["reduce"]]  # P2P posts/waits, gradient scaling
            span = st["end"] - st["start"]
            cover = _covered(busy + waits, st["start"], st["end"]) / span
            print(f"  rank {rank} step {st['step']}: cover {cover:.3f} span {span:.4f}" + (" (first)" if first else ""))
            if not first:
                worst = min(worst, cover)
            assert all(st["start"] <= r.start and r.end <= st["end"] for r in mine)
        busy_s = sum(r.duration for r in rows if r.step == steps[-1]["step"])
        print(
            f"pp{pp} rank {rank}: {len(steps)} steps x {M}F+{M}B in 1F1B order; last step "
            f"{steps[-1]['end'] - steps[-1]['start']:.4f} s, busy {busy_s:.4f} s; worst busy+wait cover {worst:.3f}"
        )
        assert worst >= 0.95


def test_denied_clock_request_ends_skipped(tmp_path: Path) -> None:
    """The job itself (in process: it returns before any process group or GPU is touched)."""
    from charllm.train.run import run

    cell = make_cell(gpu_control={"clocks": "deny", "power_limit": "deny", "request": {"gpu_clock_mhz": 1200}})
    (tmp_path / "cell.json").write_text(json.dumps(cell))
    rc = run(tmp_path / "cell.json", tmp_path, env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert rc == 0
    res = json.loads((tmp_path / "result.json").read_text())
    print(res)
    assert res["outcome"] == "skipped" and "gpu_control.clocks is deny" in res["error"]
    assert not (tmp_path / "steps.csv").exists()  # nothing ran

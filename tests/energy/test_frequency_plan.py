"""Frequency plans in the job (fake NVML only: never a real GPU's clocks).

A PP2 gloo run on CPU with a plan: each rank's fake NVML records exactly one clock lock per
instruction, at the plan's frequency, in 1F1B order, then one reset at the end. A second run
whose fake fails rank 0's 5th lock: rank 0 (exception) resets its clock, and rank 1, stopped
by torchrun with SIGTERM while blocked on its dead peer, resets its clock too. Also: how a cell
names a plan (a path under the results home, never outside), and ``deny`` (skipped, no setter).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from charllm.energy import control, freqplan
from charllm.energy.attribution import read_timeline
from charllm.energy.planner import onef1b_order
from charllm.errors import ConfigError
from tests.train.conftest import REPO, child_env, free_port, make_cell

M = 4
PP = 2
MODEL = {
    "name": "tiny2", "family": "gpt3", "n_layers": 2, "hidden": 64, "n_heads": 2, "ffn_hidden": 128,
    "vocab_size": 128, "n_kv_heads": 0, "num_experts": 0, "top_k": 0, "max_seq_len": 64,
}  # fmt: skip
_MASTER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}  # never dialled: the job skips first
SETTERS = ("nvmlDeviceSetGpuLockedClocks", "nvmlDeviceResetGpuLockedClocks", "nvmlDeviceSetPowerManagementLimit")


def _mhz(stage: int, ins: str, mb: int) -> int:
    return 1005 + 100 * stage + 10 * mb + (5 if ins == "backward" else 0)  # every instruction its own clock


def _write_plans(home: Path) -> str:
    """A plans.jsonl as ``charllm energy-plan`` writes it: a slow point, then the fastest."""
    d = home / "energy-plan" / "tiny-pp2"
    d.mkdir(parents=True)
    slow = [[s, i, mb, 900] for s in range(PP) for i in ("forward", "backward") for mb in range(M)]
    fast = [[s, i, mb, _mhz(s, i, mb)] for s in range(PP) for i in ("forward", "backward") for mb in range(M)]
    (d / "plans.jsonl").write_text(
        json.dumps({"time": 2.0, "energy": 10.0, "plan": slow}) + "\n"
        + json.dumps({"time": 1.0, "energy": 12.0, "plan": fast}) + "\n"
    )  # fmt: skip
    return "energy-plan/tiny-pp2/plans.jsonl"


def test_plan_reference_resolution(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ref = _write_plans(home)
    plan = freqplan.resolve(ref, home, PP, M)  # default: the last (minimum-time) point
    assert plan.table[(1, "backward", 3)] == _mhz(1, "backward", 3) and plan.time_s == 1.0
    assert set(freqplan.resolve(ref + "@0", home, PP, M).table.values()) == {900}
    for bad in ("../x.jsonl", "/etc/x.jsonl", "a/../../x.jsonl", "plans.json", "a b.jsonl", "a//b.jsonl"):
        with pytest.raises(ConfigError, match="frequency_plan"):
            freqplan.resolve(bad, home, PP, M)
    (home / "out.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")  # a symlink out of the home
    with pytest.raises(ConfigError, match="leaves its folder"):
        freqplan.resolve("out.jsonl", home, PP, M)
    with pytest.raises(ConfigError, match="does not match the cell"):
        freqplan.resolve(ref, home, PP, M + 1)
    with pytest.raises(ConfigError, match="has 2 frontier points"):
        freqplan.resolve(ref + "@2", home, PP, M)
    (home / "bad.jsonl").write_text(json.dumps({"plan": [[0, "forward", 0, 99999]]}) + "\n")
    with pytest.raises(ConfigError, match=r"plan\[0\]"):
        freqplan.resolve("bad.jsonl", home, 1, 1)

    # what render ships beside cell.json: nothing where the gate denies clocks (the job skips first)
    def cell(clocks: str) -> Any:
        gc = {"clocks": clocks, "power_limit": "deny", "request": {"frequency_plan": ref}}
        return types.SimpleNamespace(gpu_control=gc, parallel=types.SimpleNamespace(pp=PP), grad_accum=M)

    assert control.plan_job_file(cell("deny"), home) == {}
    shipped = json.loads(control.plan_job_file(cell("nvml"), home)[freqplan.JOB_FILE])
    assert shipped["source"] == ref and len(shipped["plan"]) == 2 * PP * M

    # the campaign schema: typed and bounded at load time
    from charllm.campaign import Point

    assert Point.model_validate({"frequency_plan": ref + "@3"}).frequency_plan == ref + "@3"
    with pytest.raises(ValueError, match="frequency_plan"):
        Point.model_validate({"frequency_plan": "../../etc/plans.jsonl"})


def test_denied_plan_skips_without_setter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from charllm.train.run import run
    from tests.energy.fake_nvml import FakeNvml

    fake = FakeNvml(log="")
    monkeypatch.setitem(sys.modules, "pynvml", fake)  # any NVML call would be recorded
    req = {"frequency_plan": "energy-plan/x/plans.jsonl"}
    cell = make_cell(parallel={"pp": 2}, gpu_control={"clocks": "deny", "power_limit": "deny", "request": req})
    (tmp_path / "cell.json").write_text(json.dumps(cell))
    assert (
        run(tmp_path / "cell.json", tmp_path, env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", **_MASTER}) == 0
    )
    res = json.loads((tmp_path / "result.json").read_text())
    print(res)
    assert res["outcome"] == "skipped" and "gpu_control.clocks is deny" in res["error"]
    assert fake.calls == []


def _launch(
    out: Path, ref: str, home: Path, fail: str = "", hang: str = ""
) -> tuple[subprocess.CompletedProcess[str], list[Any]]:
    out.mkdir(parents=True)
    req = {"frequency_plan": ref}
    cell = make_cell(
        model=MODEL,
        parallel={"pp": PP},
        micro_batch=1,
        global_batch=M,
        seq_len=32,
        steps=2,
        warmup={"min_steps": 0, "max_steps": 0},
        gpu_control={"clocks": "nvml", "power_limit": "deny", "request": req},
    )
    (out / "cell.json").write_text(json.dumps(cell))
    plan = freqplan.resolve(ref, home, PP, M)  # what charllm.render.job_spec ships
    (out / freqplan.JOB_FILE).write_text(json.dumps(plan.to_json()))
    fake = out / "fake"
    fake.mkdir()  # a pynvml module that is the recording fake, first on the children's path
    (fake / "pynvml.py").write_text(
        "from tests.energy.fake_nvml import FakeNvml\n_f = FakeNvml()\n"
        "def __getattr__(name):\n    return getattr(_f, name)\n"
    )
    log = out / "nvml.jsonl"
    env = child_env(
        PYTHONPATH=f"{fake}:{REPO}",
        CHARLLM_FAKE_NVML_LOG=str(log),
        CHARLLM_FAKE_NVML_FAIL=fail,
        CHARLLM_FAKE_NVML_HANG=hang,
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(PP),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "charllm.train", "--cell", str(out / "cell.json"), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def _of(calls: list[Any], gpu: int) -> list[Any]:
    return [c for c in calls if c[0] in (*SETTERS, "raise", "hang") and c[1] == gpu]


@pytest.mark.multiproc
def test_pp2_plan_one_lock_per_instruction_then_restore(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ref = _write_plans(home)
    out = tmp_path / "ok"
    proc, calls = _launch(out, ref, home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "result.json").read_text())["outcome"] == "ok"
    for rank in range(PP):  # LOCAL_RANK = rank = NVML index = stage here
        mine = _of(calls, rank)
        rows = sorted(read_timeline(out / f"instructions-{rank}.csv"), key=lambda r: r.start)
        steps = sorted({r.step for r in rows})
        want = [_mhz(rank, i, mb) for _ in steps for i, mb in onef1b_order(PP, M, rank)]
        assert [(r.instruction, r.micro_batch) for r in rows] == [x for _ in steps for x in onef1b_order(PP, M, rank)]
        locks = [c[2] for c in mine if c[0] == "nvmlDeviceSetGpuLockedClocks"]
        print(f"rank {rank}: {len(steps)} steps, {len(rows)} instructions, locks {locks}, then {mine[-1]}")
        assert all(c[2] == c[3] for c in mine if c[0] == "nvmlDeviceSetGpuLockedClocks")
        assert locks == want and len(locks) == len(rows) == 2 * M * len(steps)
        assert mine[-1] == ["nvmlDeviceResetGpuLockedClocks", rank] and mine[:-1] == [
            ["nvmlDeviceSetGpuLockedClocks", rank, f, f] for f in want
        ]


@pytest.mark.multiproc
def test_pp2_plan_restores_on_exception_and_sigterm(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ref = _write_plans(home)
    out = tmp_path / "fail"
    # rank 1 hangs in its 3rd lock (F1: a stuck rank); rank 0's 4th lock (F2) raises: rank 0 fails, and
    # torchrun stops rank 1 with SIGTERM
    proc, calls = _launch(out, ref, home, fail="0:4", hang="1:3")
    print(proc.stderr[-1500:])
    assert proc.returncode != 0
    res = json.loads((out / "result.json").read_text())
    assert res["outcome"] == "failed" and "fake NVML: clock lock 4" in res["error"]
    r0, r1 = _of(calls, 0), _of(calls, 1)
    print("rank 0:", r0, "\nrank 1:", r1)
    order0, order1 = onef1b_order(PP, M, 0), onef1b_order(PP, M, 1)
    lock = "nvmlDeviceSetGpuLockedClocks"
    want0 = [[lock, 0, f, f] for f in (_mhz(0, i, mb) for i, mb in order0[:3])]
    assert r0 == [*want0, ["raise", 0, 4], ["nvmlDeviceResetGpuLockedClocks", 0]]  # the exception path
    want1 = [[lock, 1, f, f] for f in (_mhz(1, i, mb) for i, mb in order1[:2])]
    assert r1 == [*want1, ["hang", 1, 3], ["nvmlDeviceResetGpuLockedClocks", 1]]  # SIGTERM
    assert "signal 15: restoring GPU settings" in proc.stdout + proc.stderr

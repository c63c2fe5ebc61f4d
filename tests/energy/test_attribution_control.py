"""Energy attribution on a synthetic cumulative series; the GPU-control gate and controller (fake NVML)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from charllm.energy.attribution import (
    EnergySeries,
    Instruction,
    idle_energy,
    instruction_energy,
    read_stage_profile,
    stage_profile,
    write_stage_profile,
)
from charllm.energy.control import ControlDenied, ControlRequest, Gate, GpuController, apply_request, skip_reason
from tests.energy.fake_nvml import FakeNvml

REPO = Path(__file__).resolve().parents[2]


def _power(k: int) -> float:
    """Power (W) held during the k-th 0.1 s interval: steps up and down like a pipeline stage."""
    return 300.0 + 200.0 * (k % 7 < 3) + 1.5 * k


def _energy(t: float) -> float:
    """The exact integral of the piecewise-constant power from 0 to t (closed form, no interpolation)."""
    k = int(t // 0.1)
    return sum(_power(i) * 0.1 for i in range(k)) + _power(k) * (t - k * 0.1)


def test_attribution_exact_on_synthetic_series() -> None:
    # counter readings every 0.1 s (NVML's update period); instruction edges fall between readings
    times = [i * 0.1 for i in range(121)]
    series = EnergySeries(times, [_energy(t) for t in times])
    rows = [
        Instruction(0, 0, "forward", 0.137, 0.5031),
        Instruction(0, 1, "forward", 0.5031, 1.3549),
        Instruction(0, 0, "backward", 1.6002, 3.2177),
        Instruction(0, 1, "backward", 3.2511, 7.0093),
    ]
    got = instruction_energy(series, rows)
    for r, e in zip(rows, got, strict=True):
        want = _energy(r.end) - _energy(r.start)
        print(f"{r.instruction} mb{r.micro_batch}: {e:.12f} J (exact {want:.12f})")
        assert abs(e - want) < 1e-9
    idle = idle_energy(series, rows, 0.0, 12.0)
    want_idle = (
        (_energy(0.137) - _energy(0.0))
        + (_energy(1.6002) - _energy(1.3549))
        + (_energy(3.2511) - _energy(3.2177))
        + (_energy(12.0) - _energy(7.0093))
    )
    print(f"idle {idle:.12f} J (exact {want_idle:.12f}); total {sum(got) + idle:.9f} J = counter {_energy(12.0):.9f} J")
    assert abs(idle - want_idle) < 1e-9
    assert abs(sum(got) + idle - (_energy(12.0) - _energy(0.0))) < 1e-9
    with pytest.raises(ValueError, match="outside the energy series"):
        series.between(0.0, 13.0)
    with pytest.raises(ValueError, match="starts at"):
        idle_energy(series, [*rows, Instruction(0, 2, "forward", 3.0, 3.3)], 0.0, 12.0)
    with pytest.raises(ValueError, match="cannot decrease"):
        EnergySeries([0.0, 1.0], [5.0, 4.0])

    # stage_profile.csv in Zeus's schema, round trip; short windows listed
    prof = stage_profile([(0, 1410, r, e) for r, e in zip(rows, got, strict=True)])
    out = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"sp-{os.getpid()}" / "stage_profile.csv"
    meta = write_stage_profile(prof, out)
    assert out.read_text().splitlines()[0] == "stage,instruction,frequency,time,energy"
    back = read_stage_profile(out)
    assert math.isclose(back[(0, "backward")][1410][1], (got[2] + got[3]) / 2, rel_tol=1e-12)
    short = meta["short_windows"]
    assert isinstance(short, list) and len(short) == 2  # 1.2 s and 5.4 s of samples: under 10 s
    print(meta["short_windows"])


def test_gate_deny_makes_no_setter_call_and_skips() -> None:
    nv = FakeNvml()
    gate = Gate()  # deny, deny
    req = ControlRequest(gpu_clock_mhz=1200, power_limit_w=500)
    reason = skip_reason(gate, req)
    print("skip reason:", reason)
    assert reason is not None and "gpu_control.clocks is deny" in reason and "power_limit is deny" in reason
    ctl = GpuController(gate, (0,), nvml=nv)
    with ctl, pytest.raises(ControlDenied):
        apply_request(ctl, req)
    assert nv.setter_calls() == [] and nv.calls == []
    assert skip_reason(Gate(clocks="nvml"), ControlRequest(gpu_clock_mhz=1200)) is None
    assert "does not drive" in str(skip_reason(Gate(clocks="zeusd"), ControlRequest(frequency_plan="p")))
    assert skip_reason(gate, ControlRequest()) is None
    with pytest.raises(ValueError, match="gpu_control.clocks"):
        Gate(clocks="root")


def test_controller_locks_per_instruction_and_restores() -> None:
    nv = FakeNvml(power_limit_mw=700_000)
    gate = Gate(clocks="nvml", power_limit="nvml")
    with GpuController(gate, (0, 1), nvml=nv) as ctl:
        apply_request(ctl, ControlRequest(gpu_clock_mhz=1410, power_limit_w=450))
        before = ctl.instruction_hook({("forward", 0): 1200, ("backward", 0): 1410, ("forward", 1): 1200})
        for ins, mb in (("forward", 0), ("forward", 1), ("backward", 0)):
            before(ins, mb)
        assert nv.locked == {0: (1410, 1410), 1: (1410, 1410)} and nv.power_limit_mw[0] == 450_000
    calls = nv.setter_calls()
    print(*calls, sep="\n")
    locks = [c[2] for c in calls if c[0] == "nvmlDeviceSetGpuLockedClocks" and c[1] == 0]
    assert locks == [1410, 1200, 1200, 1410]  # the global lock, then exactly one lock per instruction
    with pytest.raises(KeyError, match="no clock for backward of micro batch 1"), GpuController(gate, (0,), nvml=nv):
        ctl.instruction_hook({})("backward", 1)
    assert nv.locked == {0: None, 1: None} and nv.power_limit_mw == {0: 700_000, 1: 700_000}
    assert calls[-1][0] == "nvmlDeviceSetPowerManagementLimit"

    # an exception inside the block restores too
    nv2 = FakeNvml()
    with pytest.raises(RuntimeError, match="boom"), GpuController(gate, (0,), nvml=nv2) as ctl2:
        ctl2.lock_clocks(900)
        raise RuntimeError("boom")
    assert nv2.locked[0] is None and nv2.setter_calls()[-1] == ("nvmlDeviceResetGpuLockedClocks", 0)


def test_controller_restores_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "nvml.jsonl"
    child = textwrap.dedent(
        """
        import time
        from charllm.energy.control import Gate, GpuController
        from tests.energy.fake_nvml import FakeNvml
        ctl = GpuController(Gate(clocks="nvml", power_limit="nvml"), (0,), nvml=FakeNvml())
        ctl.install()
        ctl.set_power_limit(400)
        ctl.lock_clocks(1005)
        print("locked", flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "CHARLLM_FAKE_NVML_LOG": str(log), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    print("exit", rc, *calls, sep="\n")
    assert rc == 128 + signal.SIGTERM
    names = [c[0] for c in calls]
    assert names[-2:] == ["nvmlDeviceResetGpuLockedClocks", "nvmlDeviceSetPowerManagementLimit"]
    assert calls[-1] == ["nvmlDeviceSetPowerManagementLimit", 0, 700_000]


def test_controller_restores_on_sigterm_while_blocked_in_c(tmp_path: Path) -> None:
    """A rank blocked in C++ (here a TCPStore wait for a key nobody sets, as a collective on a stuck peer)
    runs no Python signal handler: the controller's watchdog thread restores and ends the process."""
    log = tmp_path / "nvml.jsonl"
    child = textwrap.dedent(
        """
        import datetime
        from torch.distributed import TCPStore
        from charllm.energy.control import Gate, GpuController
        from tests.energy.fake_nvml import FakeNvml
        store = TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=60))
        ctl = GpuController(Gate(clocks="nvml"), (0,), nvml=FakeNvml(), log=print, grace_s=0.5)
        ctl.install()
        ctl.lock_clocks(1005)
        print("locked", flush=True)
        store.get("never-set")
        print("store returned", flush=True)
        """
    )
    env = {**os.environ, "CHARLLM_FAKE_NVML_LOG": str(log), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
    rest = proc.stdout.read()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    print("exit", rc, f"after {time.monotonic() - t0:.2f} s", rest, *calls, sep="\n")
    assert rc == 128 + signal.SIGTERM
    assert "(watchdog)" in rest and "store returned" not in rest
    assert calls[-1] == ["nvmlDeviceResetGpuLockedClocks", 0]

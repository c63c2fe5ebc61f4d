"""The Zeus window over the measured steps: upstream ZeusMonitor for real (no GPU here: time only)."""

from __future__ import annotations

import math
import sys
import time

import pytest

from charllm.telemetry.errors import MonitorError
from charllm.telemetry.zeus_window import ZeusWindow, combine_zeus


def test_on_measures_a_window_with_the_real_zeus_monitor() -> None:
    win, note = ZeusWindow.create("on", None, node_leader=True)
    assert win is not None and note.startswith("zeus 0.16")
    assert win.end() == {}  # never begun: nothing to report
    win.begin()
    time.sleep(0.3)
    out = win.end()
    assert 0.25 < out["zeus_window_s"] < 1.0
    assert math.isnan(out["zeus_gpu_energy_j"])  # no GPU on this machine
    # CPU/DRAM energy needs readable RAPL counters, which these machines do not expose
    assert math.isnan(out["zeus_cpu_energy_j"]) or out["zeus_cpu_energy_j"] >= 0


def test_auto_skips_zeus_where_it_has_no_counter_to_read(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from charllm.telemetry import zeus_window

    assert not zeus_window.rapl_readable(tmp_path)  # no intel-rapl:* here
    (tmp_path / "intel-rapl:0").mkdir()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("123\n")
    assert zeus_window.rapl_readable(tmp_path)
    monkeypatch.setattr(zeus_window, "rapl_readable", lambda: False)
    win, note = ZeusWindow.create("auto", None, node_leader=True)
    assert win is None and note.startswith("skipped: no GPU and no readable RAPL")
    # a CPU rank that is not its node's leader reads no RAPL either
    monkeypatch.setattr(zeus_window, "rapl_readable", lambda: True)
    assert ZeusWindow.create("auto", None, node_leader=False)[0] is None


def test_off_and_missing_zeus(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ZeusWindow.create("off", 0, True) == (None, "off")
    monkeypatch.setitem(sys.modules, "zeus", None)  # as on a node without the package
    win, note = ZeusWindow.create("auto", 0, True)
    assert win is None and note.startswith("zeus not installed")
    with pytest.raises(MonitorError, match="pip install zeus"):
        ZeusWindow.create("on", 0, True)
    with pytest.raises(MonitorError, match="telemetry.zeus must be one of"):
        ZeusWindow.create("sometimes", 0, True)


def test_combine_sums_ranks_and_compares_with_the_sampled_energy() -> None:
    nan = math.nan
    ranks = [
        {"zeus_window_s": 10.0, "zeus_gpu_energy_j": 6000.0, "zeus_cpu_energy_j": 900.0, "zeus_dram_energy_j": nan},
        {"zeus_window_s": 10.2, "zeus_gpu_energy_j": 6100.0, "zeus_cpu_energy_j": nan, "zeus_dram_energy_j": nan},
        {},  # a rank without Zeus
    ]
    out = combine_zeus(ranks, sampled_gpu_energy_j=12000.0)
    assert out["zeus_window_s"] == 10.2
    assert out["zeus_gpu_energy_j"] == 12100.0 and out["zeus_cpu_energy_j"] == 900.0
    assert math.isnan(out["zeus_dram_energy_j"])
    assert out["zeus_over_sampled"] == pytest.approx(12100.0 / 12000.0)
    assert combine_zeus([{}, {}], 1.0) == {}
    assert "zeus_over_sampled" not in combine_zeus(ranks[:1], None)

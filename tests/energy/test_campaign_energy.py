"""The Perseus knobs in campaigns: pp_partition, profile, gpu_control (gate) and its axes; energy-plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charllm import cli
from charllm.campaign import load_campaign
from charllm.capabilities import stage_starts
from charllm.energy.control import job_skip_reason
from charllm.errors import ConfigError
from tests import campaign_files
from tests.campaign_files import GOOD

PP2 = """\
name: p
cluster: local-cpu
model: {name: gpt3-1.3b, proxy_layers: 4}
steps: 3
sweep:
  pp: [2]
  micro_batch: [1]
  global_batch: [8]
"""


def test_defaults_keep_every_hash(include_tmp: Path) -> None:
    base = load_campaign(campaign_files.write(include_tmp, GOOD))
    same = load_campaign(campaign_files.write(include_tmp, GOOD + "profile: none\n", "b.yaml"))
    assert [c.cell_id for c in base.cells] == [c.cell_id for c in same.cells]
    uni = load_campaign(campaign_files.write(include_tmp, PP2 + "  pp_partition: [uniform]\n", "u.yaml"))
    plain = load_campaign(campaign_files.write(include_tmp, PP2, "v.yaml"))
    assert [c.cell_id for c in uni.cells] == [c.cell_id for c in plain.cells]
    assert all(c.gpu_control is None and "profile_mode" not in c.opt for c in plain.cells)
    prof = load_campaign(campaign_files.write(include_tmp, PP2 + "profile: instructions\n", "w.yaml"))
    assert prof.cells[0].opt["profile_mode"] == "instructions" and prof.cells[0].cell_id != plain.cells[0].cell_id


def test_pp_partition(include_tmp: Path) -> None:
    assert stage_starts("custom:0,8,14,20,26", 26, 4) == [0, 8, 14, 20]
    assert stage_starts("uniform", 26, 4) == [0, 7, 14, 20]
    lc = load_campaign(campaign_files.write(include_tmp, PP2 + '  pp_partition: [uniform, "custom:0,1,4"]\n'))
    names = sorted(c.name for c in lc.cells)
    print(names)
    assert len(lc.cells) == 2 and any(n.endswith("-pc0_1_4") for n in names)
    custom = next(c for c in lc.cells if c.parallel.pp_partition)
    assert custom.parallel.pp_partition == "custom:0,1,4" and custom.view().pp_partition == "custom:0,1,4"
    # an odd layer count runs with a custom partition: the divisibility rule is replaced
    odd = PP2.replace("proxy_layers: 4", "proxy_layers: 5")
    with pytest.raises(ConfigError, match="does not divide"):
        load_campaign(campaign_files.write(include_tmp, odd, "odd.yaml"))
    assert load_campaign(campaign_files.write(include_tmp, odd + '  pp_partition: ["custom:0,2,5"]\n', "o2.yaml"))
    bad = {
        '"custom:0,0,4"': "must increase",
        '"custom:0,1,2,4"': "names 3 stages",
        '"custom:1,2,4"': "begin at layer 0",
        '"custom:0,2,6"': "model has 4 layers",
    }
    for value, why in bad.items():
        with pytest.raises(ConfigError, match=why) as err:
            load_campaign(campaign_files.write(include_tmp, PP2 + f"  pp_partition: [{value}]\n", "bad.yaml"))
        print(err.value)
        assert "pp_partition" in str(err.value) and "bad.yaml" in str(err.value)
    with pytest.raises(ConfigError, match=r"sweep\.pp_partition\[0\]"):
        load_campaign(campaign_files.write(include_tmp, PP2 + '  pp_partition: ["custom:a,b"]\n', "bad2.yaml"))
    with pytest.raises(ConfigError, match="custom partitions run in engine: torch") as err:
        text = PP2 + '  pp_partition: ["custom:0,1,4"]\nengine: megatron\n'
        load_campaign(campaign_files.write(include_tmp, text, "m.yaml"))
    print(err.value)


def test_gpu_control_gate_and_skipped_plan(include_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = PP2 + "  gpu_clock_mhz: [1200]\ninclude:\n  - {power_limit_w: 400}\n"
    p = campaign_files.write(include_tmp, text)
    lc = load_campaign(p)
    assert lc.cluster.gpu_control.clocks == "deny" and lc.cluster.gpu_control.power_limit == "deny"
    assert len(lc.cells) == 2
    for c in lc.cells:
        assert c.gpu_control is not None and c.gpu_control["clocks"] == "deny"
        why = job_skip_reason({"gpu_control": c.gpu_control})
        assert why is not None and "deny" in why
        assert c.job_config(0)["gpu_control"] == c.gpu_control  # the job reads it from its cell
    assert cli.main(["plan", str(p)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert out.count("will be skipped") == 2 and "gpu_control.clocks is deny" in out
    # allowed on a cluster that says so: a different cell (the gate is hashed), nothing to skip
    cluster = (include_tmp / "clusters" / "local-cpu.yaml").read_text() + "gpu_control: {clocks: nvml}\n"
    (include_tmp / "clusters" / "nvml-cpu.yaml").write_text(cluster.replace("name: local-cpu", "name: nvml-cpu"))
    ok = load_campaign(campaign_files.write(include_tmp, text.replace("local-cpu", "nvml-cpu"), "n.yaml"))
    clock = next(c for c in ok.cells if "f1200" in c.name)
    assert job_skip_reason({"gpu_control": clock.gpu_control}) is None
    assert clock.cell_id not in {c.cell_id for c in lc.cells}
    (include_tmp / "clusters" / "bad-cpu.yaml").write_text(cluster.replace("clocks: nvml", "clocks: root"))
    with pytest.raises(ConfigError, match=r"gpu_control\.clocks"):
        load_campaign(campaign_files.write(include_tmp, text.replace("local-cpu", "bad-cpu"), "x.yaml"))
    with pytest.raises(ConfigError, match="gpu_clock_mhz"):
        load_campaign(campaign_files.write(include_tmp, PP2 + "  gpu_clock_mhz: [50]\n", "y.yaml"))


def test_energy_plan_cli(include_tmp: Path, tmp_path: Path) -> None:
    pytest.importorskip("lowtime", reason="lowtime (the 'energy' extra) is not installed")
    src = Path(__file__).resolve().parents[1] / "data" / "perseus-sosp24" / "gpt3-175b+a100_sxm_bf16.csv"
    lines = src.read_text().splitlines()
    small = tmp_path / "stage_profile.csv"  # stages 0 and 1 of the published profile
    small.write_text("\n".join([lines[0], *(ln for ln in lines[1:] if ln.split(",")[0] in ("0", "1"))]) + "\n")
    camp = campaign_files.write(include_tmp, PP2)
    out = tmp_path / "plan"
    rc = cli.main(["energy-plan", str(camp), "*", "--profile", str(small), "--micro-batches", "4",
                   "--p2p-w", "83.64", "--out", str(out)])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    print(summary)
    assert summary["min_iteration_time_s"] == pytest.approx(summary["all_max"]["time_s"], abs=1e-9)
    assert 0 < summary["intrinsic_saving_pct"] < 30 and 0 < summary["intrinsic_saving_compute_pct"] < 30
    assert (out / "frontier.csv").read_text().startswith("time,energy,energy_profiled\n")
    assert (out / "frontier.png").stat().st_size > 0 and (out / "timeline.png").stat().st_size > 0
    plans = [json.loads(line) for line in (out / "plans.jsonl").read_text().splitlines()]
    assert len(plans) == summary["frontier_points"] > 10
    times = [p["time"] for p in plans]
    assert times == sorted(times, reverse=True) and len(set(times)) == len(times)  # one time unit per point
    assert plans[-1]["energy"] > plans[0]["energy"]  # the fastest plan costs more than the slowest
    assert summary["energy_at_min_time_profiled_j"] < summary["all_max"]["energy_j"]  # slack slowed: saved
    freqs: dict[tuple[int, str], set[int]] = {}
    for p in plans:
        assert len(p["plan"]) == 2 * 2 * 4  # every instruction of every stage has a frequency
        for s, ins, _mb, f in p["plan"]:
            freqs.setdefault((s, ins), set()).add(f)
    assert all(f in {int(ln.split(",")[2]) for ln in lines[1:]} for fs in freqs.values() for f in fs)


def test_denied_cell_is_recorded_skipped_and_not_rerun(charllm_home: Path, include_tmp: Path) -> None:
    """Through the runner and the local backend: the job ends skipped, the catalog keeps it as a result."""
    import time

    from charllm.catalog import Catalog
    from charllm.runner import CampaignRunner

    p = campaign_files.write(include_tmp, GOOD.replace("  dp: [1, 2]\n", "  dp: [1]\n") + "  gpu_clock_mhz: [1200]\n")
    runner = CampaignRunner.from_file(p, catalog=Catalog())
    items = runner.plan("*")
    assert len(items) == 2
    item = items[0]
    handle = runner.submit_or_reattach(item["cell_id"], 0, "r1").handle
    assert handle is not None
    deadline = time.monotonic() + 120
    while True:
        st = runner.backend.statuses([handle.job_id])[handle.job_id]
        if st.state.is_terminal:
            break
        assert time.monotonic() < deadline, "job did not end"
        time.sleep(0.2)
    summary = runner.finish(handle, st)
    print(summary)
    assert summary["outcome"] == "skipped"
    rows = runner.catalog.attempts(cell_id=item["cell_id"])
    assert [r.outcome for r in rows] == ["skipped"] and len(rows) == 1
    # a result: the next plan does not offer it again (never retried)
    assert item["cell_id"] not in [i["cell_id"] for i in runner.plan("*")]
    import pandas as pd

    cells = pd.read_parquet(runner.aggregate()["cells_table"]).set_index("cell_id")
    assert cells.loc[item["cell_id"], "outcome"] == "skipped"


def test_instruction_profile_needs_a_torch_pipeline(include_tmp: Path) -> None:
    """What the recorder cannot time is refused at plan time, naming the field."""
    flat = PP2.replace("  pp: [2]\n", "  pp: [1]\n") + "profile: instructions\n"
    with pytest.raises(ConfigError, match="needs pp > 1") as err:
        load_campaign(campaign_files.write(include_tmp, flat, "flat.yaml"))
    print(err.value)
    assert ".profile" in str(err.value)
    with pytest.raises(ConfigError, match="instruction recorder"):
        load_campaign(campaign_files.write(include_tmp, PP2 + "profile: instructions\nengine: megatron\n", "meg.yaml"))
    assert load_campaign(campaign_files.write(include_tmp, PP2 + "profile: instructions\n", "ok.yaml")).cells

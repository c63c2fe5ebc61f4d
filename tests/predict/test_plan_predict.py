"""``charllm plan --predict`` and the campaign's ``prune`` on a paper campaign (pure arithmetic, no cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from charllm.campaign import load_campaign
from charllm.cli import main
from charllm.errors import ConfigError
from charllm.predict.plan import predict_campaign, pruned, totals

REPO = Path(__file__).resolve().parents[2]
H200 = REPO / "include" / "campaigns" / "charllm-h200-opt.yaml"


def test_plan_predict_prints_cells_and_predicted_gpu_hours(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--predict", str(H200)]) == 0
    out = capsys.readouterr().out
    print(out[-1500:])
    assert "mem/rank GiB" in out and "kJ/step" in out
    assert "predicted GPU-hours:" in out and "at the job time limits 3392.0" in out
    assert "run (OOM)" in out  # marked, not skipped, with prune none


def test_prune_oom_skips_predicted_oom_cells_but_one_canary_per_model() -> None:
    lc = load_campaign(H200, check=False)
    none = predict_campaign(lc, prune="none")
    oom = predict_campaign(lc, prune="oom")
    dom = predict_campaign(lc, prune="dominated")
    ooms = [p for p in oom if p.mem.oom]
    assert ooms and all(p.action in ("skip", "canary") for p in ooms)
    canaries = [p for p in oom if p.action == "canary"]
    models = {p.cell.model["name"] for p in ooms}
    assert sorted(p.cell.model["name"] for p in canaries) == sorted(models)  # one per model
    for p in oom:
        if p.action == "skip":
            assert p.reason.startswith("predicted OOM:") and "GiB per rank" in p.reason
        else:
            assert p.gpu_hours > 0
    t_none, t_oom, t_dom = totals(none), totals(oom), totals(dom)
    print(t_none, t_oom, t_dom, sep="\n")
    assert t_dom["gpu_hours"] < t_oom["gpu_hours"] < t_none["gpu_hours"] < t_none["limit_hours"]
    assert {p.cell.cell_id for p in oom if p.action == "skip"} <= {p.cell.cell_id for p in dom if p.action == "skip"}
    # dominated keeps every optimisation code: at least one layout of each (model, code) still runs
    for model in {p.cell.model["name"] for p in dom}:
        for code in ("00000", "10000", "01000", "11000"):
            group = [p for p in dom if p.cell.model["name"] == model and p.cell.opt_code == code]
            assert any(p.action in ("run", "canary") for p in group), (model, code)


def test_campaign_prune_option_is_typed_and_used(tmp_path: Path) -> None:
    text = H200.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("repeats: 1\n", "repeats: 1\nprune: everything\n", 1))
    with pytest.raises(ConfigError, match="prune"):
        load_campaign(bad, clusters=REPO / "include" / "clusters", check=False)
    good = tmp_path / "good.yaml"
    good.write_text(text.replace("repeats: 1\n", "repeats: 1\nprune: oom\n", 1))
    lc = load_campaign(good, clusters=REPO / "include" / "clusters", check=False)
    skip = pruned(lc)
    assert skip and all(r.startswith("predicted OOM") for r in skip.values())
    # the option changes no cell's content hash
    assert [c.cell_id for c in lc.cells] == [c.cell_id for c in load_campaign(H200, check=False).cells]


def test_runner_leaves_pruned_cells_out_and_logs_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from charllm.catalog import Catalog
    from charllm.runner import CampaignRunner

    text = (
        H200.read_text()
        .replace("repeats: 1\n", "repeats: 1\nprune: oom\n", 1)
        .replace("backend: slurm", "backend: local")
    )
    path = tmp_path / "campaigns" / "pruned.yaml"
    path.parent.mkdir()
    path.write_text(text.replace("name: ppt_h200_opt", "name: ppt_h200_opt_pruned"))
    (tmp_path / "clusters").symlink_to(REPO / "include" / "clusters")
    runner = CampaignRunner.from_file(path, home=tmp_path / "home", catalog=Catalog(f"sqlite:///{tmp_path / 'c.db'}"))
    with caplog.at_level(logging.INFO, logger="charllm.runner"):
        items = runner.plan()
    skip = pruned(runner.lc)
    planned = {i["cell_id"] for i in items}
    print(f"{len(planned)} planned, {len(skip)} pruned")
    assert skip and not planned & set(skip)
    assert len(planned) == len(runner.lc.cells) - len(skip)
    assert sum("pruned, not run: predicted OOM" in r.getMessage() for r in caplog.records) == len(skip)


def test_plan_predict_reads_layer_profiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The H200 run's profiles price the profile campaign's GPT-3 cells; the Llama cells stay on the roofline."""
    import json

    from charllm.predict.profile import LayerProfile

    run = json.loads((REPO / "docs" / "gpu" / "predict-h200-run2.json").read_text())
    for row in run["sweep"]:
        if not row["recompute"]:
            LayerProfile.from_dict(row["profile"]).write(tmp_path)
    camp = REPO / "include" / "campaigns" / "profile-h200.yaml"
    assert main(["plan", "--predict", str(camp), "--profiles", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    print(out)
    rows = [line.split() for line in out.splitlines() if line.startswith(("gpt3", "llama3"))]
    assert len(rows) == 10
    assert all(r[7] == "profile" for r in rows if r[0].startswith("gpt3"))  # recompute derived from the profile
    assert all(r[7] == "roofline" for r in rows if r[0].startswith("llama3"))

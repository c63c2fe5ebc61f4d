"""The CharLLM-PPT campaign files: they validate, have the expected cells, and share cells by hash."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from charllm.campaign import dedupe, load_campaign
from charllm.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
CAMPAIGNS = REPO / "include" / "campaigns"

# campaign file -> (campaign name, cells, cluster)
EXPECTED = {
    "charllm-h200-opt.yaml": ("ppt_h200_opt", 60, "h200-4x8"),  # 15 layouts x 4 codes
    "charllm-fig4-parallelism.yaml": ("ppt_fig4_parallelism", 15, "h200-4x8"),  # 15 layouts at 01000
    "charllm-microbatch.yaml": ("ppt_microbatch", 59, "h200-4x8"),  # 15 layouts x 4 mbs - 1 impossible
    "charllm-h100-opt.yaml": ("ppt_h100_opt", 64, "h100-8x8"),  # 16 layouts x 4 codes
    "charllm-small.yaml": ("ppt_small", 11, "small-gpu"),  # + PP2, FSDP, Mixtral proxy DP2
    "charllm-small-megatron.yaml": ("ppt_small_megatron", 9, "small-gpu"),  # DP2/TP2/PP2 x 2 codes, FSDP, EP2 x 2
    "charllm-small-1gpu.yaml": ("ppt_small_1gpu", 8, "small-gpu"),  # 4 codes + mbs 1/4/8 + Llama proxy
}
PAPER = ("charllm-h200-opt.yaml", "charllm-fig4-parallelism.yaml", "charllm-microbatch.yaml", "charllm-h100-opt.yaml")


@pytest.fixture(scope="module")
def loaded():
    return {f: load_campaign(CAMPAIGNS / f) for f in EXPECTED}


@pytest.mark.parametrize("fname", list(EXPECTED))
def test_campaign_validates_with_expected_cells(loaded, fname):
    lc = loaded[fname]
    name, count, cluster = EXPECTED[fname]
    assert (lc.name, len(lc.cells), lc.cluster.name) == (name, count, cluster)
    assert len({c.cell_id for c in lc.cells}) == count
    assert len({c.name for c in lc.cells}) == count  # names are unambiguous within a campaign
    for c in lc.cells:
        assert c.precision == "bf16"
        assert c.world_size <= lc.cluster.total_gpus
    dag = (REPO / "dags" / f"campaign_{fname.removesuffix('.yaml').replace('-', '_')}.py").read_text()
    assert f'campaign_dag("{fname}")' in dag and "Airflow DAG" in dag


def test_paper_axes(loaded):
    seq = {"gpt3-175b": 2048, "llama3-70b": 8192, "mixtral-8x22b": 4096, "mixtral-8x7b": 4096}
    for f in PAPER:
        lc = loaded[f]
        gpus = lc.cluster.total_gpus
        for c in lc.cells:
            assert c.global_batch == 128 and c.seq_len == seq[c.model["name"]]
            assert c.opt["profile"] is True and c.engine == "megatron"
            if c.parallel.fsdp:
                assert (c.parallel.tp, c.parallel.pp, c.parallel.dp) == (8, 1, gpus // 8)
            elif c.model["name"] == "llama3-70b" and gpus == 64:
                assert c.parallel.tp * c.parallel.pp == 32  # TP8PP4 ... TP2PP16 with dp 2
            else:
                assert c.world_size == gpus
    codes = {c.opt_code for c in loaded["charllm-h200-opt.yaml"].cells}
    assert codes == {"00000", "10000", "01000", "11000"}
    assert {c.opt_code for c in loaded["charllm-fig4-parallelism.yaml"].cells} == {"01000"}
    mb = loaded["charllm-microbatch.yaml"]
    assert {c.micro_batch for c in mb.cells} == {1, 2, 4, 8} and {c.opt_code for c in mb.cells} == {"01000"}
    assert all(c.opt["recompute"] for c in mb.cells)
    h200_layouts = {
        (c.model["name"], c.parallel.tp, c.parallel.pp, c.parallel.ep, c.parallel.fsdp)
        for c in loaded["charllm-h200-opt.yaml"].cells
    }
    assert len(h200_layouts) == 15
    assert ("mixtral-8x7b", 2, 1, 4, False) in h200_layouts and ("gpt3-175b", 8, 1, 1, True) in h200_layouts


def test_fig4_cells_are_the_h200_opt_cells_at_01000(loaded):
    fig4 = {c.cell_id: c.name for c in loaded["charllm-fig4-parallelism.yaml"].cells}
    opt = {c.cell_id: c.name for c in loaded["charllm-h200-opt.yaml"].cells if c.opt_code == "01000"}
    assert fig4 == opt  # same ids and the same names
    mb1 = {c.cell_id for c in loaded["charllm-microbatch.yaml"].cells if c.micro_batch == 1}
    assert mb1 == set(fig4)


def test_dedupe_across_paper_campaigns(loaded):
    owners = dedupe([loaded[f] for f in PAPER])
    assert len(owners) == 60 + 44 + 64  # H200 opt; micro batch 2/4/8; H100 (fig 4 adds nothing)
    shared = {cid: names for cid, names in owners.items() if len(names) > 1}
    assert len(shared) == 15
    assert all(sorted(v) == ["ppt_fig4_parallelism", "ppt_h200_opt", "ppt_microbatch"] for v in shared.values())
    # H100 and H200 cells never collide: the GPU type is part of the hash
    h100 = {c.cell_id for c in loaded["charllm-h100-opt.yaml"].cells}
    assert all(owners[c] == ["ppt_h100_opt"] for c in h100)


@pytest.mark.parametrize(
    ("fname", "entry", "why"),
    [
        # the cells the campaign files leave out, with the reason the checks give
        (
            "charllm-h100-opt.yaml",
            {"model": "llama3-70b", "seq_len": 8192, "tp": 1, "pp": 32, "opt_code": "00000"},
            "does not divide llama3-70b's 80 layers",
        ),
        (
            "charllm-microbatch.yaml",
            {"model": "mixtral-8x7b", "seq_len": 4096, "tp": 1, "pp": 1, "ep": 8, "micro_batch": 8},
            "not divisible by micro_batch\\*dp = 8\\*32",
        ),
    ],
)
def test_dropped_cells_are_impossible(tmp_path, fname, entry, why):
    data = yaml.safe_load((CAMPAIGNS / fname).read_text())
    data["include"].append(entry)
    p = tmp_path / "campaigns" / fname
    p.parent.mkdir()
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=why):
        load_campaign(p, clusters=REPO / "include" / "clusters")


def test_small_campaign_fits_the_lent_machine(loaded):
    lc = loaded["charllm-small.yaml"]
    assert lc.campaign.backend == "local" and lc.cluster.total_gpus == 2 and lc.cluster.gpu_type == "h100"
    assert {c.model["name"] for c in lc.cells} == {"gpt3-1.3b-L4", "llama3-8b-L2", "mixtral-8x7b-L2"}
    assert {c.opt_code for c in lc.cells} == {"00000", "01000"}
    assert {c.micro_batch for c in lc.cells if c.model["name"] == "gpt3-1.3b-L4"} == {1, 2, 4}
    assert {(c.parallel.tp, c.parallel.pp, c.parallel.dp, c.parallel.fsdp) for c in lc.cells} == {
        (1, 1, 2, False),
        (2, 1, 1, False),
        (1, 2, 1, False),
        (1, 1, 2, True),
    }
    # every layout of two GPUs, through megatron-core too (expert parallelism only there)
    mg = loaded["charllm-small-megatron.yaml"]
    assert mg.campaign.engine == "megatron" and mg.cluster.name == "small-gpu"
    layouts = {(c.parallel.tp, c.parallel.pp, c.parallel.dp, c.parallel.ep, c.parallel.fsdp) for c in mg.cells}
    assert layouts == {
        (1, 1, 2, 1, False),
        (2, 1, 1, 1, False),
        (1, 2, 1, 1, False),
        (1, 1, 2, 1, True),
        (1, 1, 2, 2, False),
    }
    assert {c.opt_code for c in mg.cells} == {"00000", "10000"}


# -- a campaign that validates must run ---------------------------------------------------------------


@pytest.mark.parametrize("fname", PAPER)
def test_every_paper_cell_passes_the_capability_check(loaded, fname):
    from charllm.campaign import cell_refusals
    from charllm.capabilities import job_refusals
    from charllm.train.cell import CellSpec

    lc = loaded[fname]
    assert lc.campaign.engine == "megatron" and lc.cluster.gpu_type in ("h100", "h200")
    for c in lc.cells:
        assert cell_refusals(c, lc.cluster) == [], c.name
        spec = CellSpec.from_dict(c.job_config(0))  # the job's own checks
        assert job_refusals(spec, "cuda") == [], c.name
        spec.check_engine("cuda")


def test_plan_shows_every_paper_cell_runnable(loaded, charllm_home, capsys):
    from charllm.cli import main

    for fname in PAPER:
        assert main(["plan", str(CAMPAIGNS / fname)]) == 0
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert lines[0].split()[:5] == ["cell", "hash", "gpus", "runnable", "status"]
        names = {c.name for c in loaded[fname].cells}
        rows = [ln.split() for ln in lines[1:] if ln.split() and ln.split()[0] in names]
        assert len(rows) == len(names) and all(r[3] == "yes" and r[4:] == ["to", "run"] for r in rows)
        assert f"{EXPECTED[fname][1]} of {EXPECTED[fname][1]} cells runnable (engine megatron" in out
        assert "cannot run" not in out


def test_validate_reports_no_refused_paper_cell(capsys):
    from charllm.cli import main

    assert main(["validate", *(str(CAMPAIGNS / f) for f in PAPER)]) == 0
    out = capsys.readouterr().out
    assert out.count("all runnable") == 4 and out.rstrip().endswith(", 0 refused")


@pytest.mark.parametrize(
    ("fname", "entry", "cell", "field", "why"),
    [
        # tp 16 passes "a multiple of the KV heads" but no engine splits 8 KV heads 16 ways
        (
            "charllm-h100-opt.yaml",
            {"model": "llama3-70b", "seq_len": 8192, "tp": 16, "pp": 4, "opt_code": "00000"},
            "llama3-70b-tp16pp4dp1-mb1-gb128-s8192-00000",
            "tp",
            "tensor parallel size 16 does not divide llama3-70b's 8 KV heads",
        ),
        (
            "charllm-h200-opt.yaml",
            {"model": "gpt3-175b", "seq_len": 2048, "tp": 8, "pp": 2, "cp": 2, "opt_code": "00000"},
            "gpt3-175b-tp8pp2dp1cp2-mb1-gb128-s2048-00000",
            "cp",
            "engine 'megatron' does not support context parallelism",
        ),
        (
            "charllm-fig4-parallelism.yaml",
            {"model": "gpt3-175b", "seq_len": 2048, "tp": 8, "pp": 1, "ep": 2},
            "gpt3-175b-tp8pp1dp4ep2-mb1-gb128-s2048-01000",
            "ep",
            "expert parallel size 2 on dense model gpt3-175b",
        ),
        (
            "charllm-microbatch.yaml",
            {"model": "gpt3-175b", "seq_len": 2048, "tp": 8, "pp": 4, "pp_virtual": 5, "micro_batch": 1},
            "gpt3-175b-tp8pp4vp5dp1-mb1-gb128-s2048-01000",
            "pp_virtual",
            "pp\\*pp_virtual = 4\\*5 = 20 does not divide gpt3-175b's 96 layers",
        ),
    ],
)
def test_impossible_cell_is_refused_with_file_cell_and_reason(tmp_path, fname, entry, cell, field, why):
    data = yaml.safe_load((CAMPAIGNS / fname).read_text())
    data["include"].append(entry)
    where = f"include[{len(data['include']) - 1}]"
    p = tmp_path / "campaigns" / fname
    p.parent.mkdir()
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=why) as exc:
        load_campaign(p, clusters=REPO / "include" / "clusters")
    err = exc.value
    assert (err.source, err.field) == (str(p), f"{where}.{field}")
    assert str(err).startswith(f"{p}: {where}.{field}: cell {cell} cannot run: ")


def test_engine_settings_doc_is_current_and_every_paper_cell_runs() -> None:
    """docs/paper-engine-settings.md is what scripts/engine-settings prints for the four paper files today."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    files = [f"include/campaigns/charllm-{n}.yaml" for n in ("fig4-parallelism", "h200-opt", "microbatch", "h100-opt")]
    p = subprocess.run(
        [sys.executable, "scripts/engine-settings", *files], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.rstrip().endswith("168 unique cells, 0 refused.")
    assert p.stdout == (repo / "docs" / "paper-engine-settings.md").read_text(), (
        "docs/paper-engine-settings.md is stale: regenerate it with scripts/engine-settings"
    )


@pytest.mark.parametrize("path", sorted(CAMPAIGNS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_cell_passes_the_jobs_own_checks(path):
    """Every campaign file shipped: each cell passes the plan-time check and the job's own
    (CellSpec.check, check_engine, job_refusals) on the device its cluster has."""
    from charllm.campaign import cell_refusals
    from charllm.capabilities import job_refusals
    from charllm.train.cell import CellSpec

    lc = load_campaign(path)
    device = "cpu" if lc.cluster.gpu_type == "cpu" else "cuda"
    for c in lc.cells:
        assert cell_refusals(c, lc.cluster) == [], c.name
        spec = CellSpec.from_dict(c.job_config(0))
        assert job_refusals(spec, device) == [], c.name
        spec.check()
        spec.check_engine(device)
    print(f"{path.name}: {len(lc.cells)} cells accepted by the job on {device}")

"""Job scripts against golden files, and quoting of every free-text value."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from charllm.backends.base import JobIdentity
from charllm.campaign import Campaign, ClusterProfile, expand, load_campaign
from charllm.render import job_spec, render_script

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"


def _h200() -> ClusterProfile:
    return ClusterProfile.model_validate(yaml.safe_load((REPO / "include/clusters/h200-4x8.yaml").read_text()))


def _cases() -> dict[str, str]:
    lc = load_campaign(REPO / "include/campaigns/demo.yaml")
    dp1 = next(c for c in lc.cells if c.world_size == 1)
    dp2 = next(c for c in lc.cells if c.world_size == 2)
    cl = _h200()
    camp = Campaign.model_validate(
        {
            "name": "g",
            "cluster": cl.model_dump(),
            "model": "gpt3-175b",
            "sweep": {
                "gpus": [32],
                "tp": [4],
                "pp": [8],
                "dp": ["auto"],
                "micro_batch": [1],
                "global_batch": [128],
                "seq_len": [2048],
                "opt_code": ["01000"],
            },
        }
    )
    big = expand(camp, cl)[0]
    return {
        "demo-dp1.sbatch": render_script(
            dp1, lc.cluster, JobIdentity("demo", dp1.cell_id, 0, 1), "/opt/env/bin/python"
        ),
        "demo-dp2.sbatch": render_script(
            dp2, lc.cluster, JobIdentity("demo", dp2.cell_id, 0, 1), "/opt/env/bin/python"
        ),
        "h200-gpt3-175b.sbatch": render_script(big, cl, JobIdentity("g", big.cell_id, 2, 3)),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_render_matches_golden(name):
    text = _cases()[name]
    golden = GOLDEN / name
    if os.environ.get("CHARLLM_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"rendered {name} differs from {golden} (CHARLLM_UPDATE_GOLDEN=1 to refresh)"


def test_rendered_scripts_are_valid_bash():
    for name, text in _cases().items():
        proc = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
        assert proc.returncode == 0, (name, proc.stderr)


def test_hostile_env_values_and_paths_are_quoted(tmp_path):
    lc = load_campaign(REPO / "include/campaigns/demo.yaml")
    cell = lc.cells[0]
    marker = tmp_path / "pwned"
    hostile = f"a'; touch {marker}; echo '$(touch {marker})"
    cluster = lc.cluster.model_copy(update={"env": {"HOSTILE": hostile}})
    weird_python = str(tmp_path / "dir with space'; touch pwned" / "python")
    spec = job_spec(cell, cluster, JobIdentity("demo", cell.cell_id, 0, 1), weird_python)
    # run the environment part of the script only, and print what the shell saw
    env_part = spec.script.split("# -- launch")[0] + 'printf "%s" "$HOSTILE"\n'
    env_part = env_part.replace("set -euo pipefail", "set -u")
    out = subprocess.run(["bash", "-c", env_part], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.endswith(hostile)
    assert not marker.exists()
    assert "'" + weird_python.replace("'", "'\"'\"'") + "'" in spec.script


REFUSED = """\
name: refused
cluster: local-cpu
model: tiny-llama
engine: megatron
compile: true
sweep:
  dp: [1, 2]
  global_batch: [8]
"""


def test_render_refuses_a_cell_that_cannot_run(include_tmp):
    from charllm.errors import ConfigError

    p = include_tmp / "campaigns" / "refused.yaml"
    p.write_text(REFUSED)
    with pytest.raises(ConfigError, match="torch.compile"):
        load_campaign(p)  # the validator refuses it first
    lc = load_campaign(p, check=False)
    cell = lc.cells[0]
    with pytest.raises(ConfigError) as exc:
        render_script(cell, lc.cluster, JobIdentity(lc.name, cell.cell_id, 0, 1), "/opt/env/bin/python")
    msg = str(exc.value)
    assert msg.startswith(f"campaign refused: cell {cell.name}: cannot run on local-cpu: compile: engine 'megatron'")
    assert "torch.compile" in msg
    # a cluster too small for a runnable cell
    demo = load_campaign(REPO / "include/campaigns/demo.yaml")
    dp2 = next(c for c in demo.cells if c.world_size == 2)
    small = demo.cluster.model_copy(update={"gpus_per_node": 1, "nodes": 1})
    with pytest.raises(ConfigError, match="cell needs 2 GPUs, the cluster has 1"):
        job_spec(dp2, small, JobIdentity("demo", dp2.cell_id, 0, 1))


def test_plan_and_validate_show_unrunnable_cells(include_tmp, charllm_home, capsys):
    from charllm.cli import main

    p = include_tmp / "campaigns" / "refused.yaml"
    p.write_text(
        REFUSED.replace("model: tiny-llama", "model: tiny").replace("compile: true\n", "")
        + "include:\n  - {dp: 1, cp: 2}\n"
    )
    assert main(["plan", str(p)]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:5] == ["cell", "hash", "gpus", "runnable", "status"]
    rows = {ln.split()[0]: ln.split()[3] for ln in out.splitlines() if ln.startswith("tiny-")}
    assert rows == {
        "tiny-tp1pp1dp1-mb1-gb8-s64-00000": "yes",
        "tiny-tp1pp1dp2-mb1-gb8-s64-00000": "yes",
        "tiny-tp1pp1dp1cp2-mb1-gb8-s64-00000": "no",
    }
    assert "    cannot run: cp: engine 'megatron' does not support context parallelism" in out
    assert "2 of 3 cells runnable (engine megatron on local-cpu)" in out
    assert main(["validate", str(p)]) == 1
    out = capsys.readouterr().out
    assert f"ERROR {p}: 1 of 3 cells cannot run on local-cpu" in out and out.rstrip().endswith("1 refused")
    assert main(["render", str(p), str(include_tmp / "out")]) == 2  # the runner's strict load refuses the file
    assert "cannot run" in capsys.readouterr().err

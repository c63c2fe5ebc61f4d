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

"""engine: nemo on the cluster side: the install stage's NeMo layer and the container option.

The environment job installs requirements-nemo.lock (never into the Airflow venv) only for a
campaign with nemo cells, keyed by that lock, so every other campaign keeps its key and its
built environment; a cluster profile's ``nemo_container`` (typed, bounded) runs the nemo cells
in that image instead (pyxis ``srun --container-image``) and installs no NeMo.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from pydantic import ValidationError

from charllm.backends.base import JobIdentity
from charllm.campaign import ClusterProfile, load_campaign
from charllm.render import render_script
from charllm.setup import jobs

REPO = Path(__file__).resolve().parent.parent
SMALL = REPO / "include" / "campaigns" / "charllm-small-1gpu.yaml"


@pytest.fixture(scope="module")
def nemo_campaign(tmp_path_factory: pytest.TempPathFactory):
    doc = yaml.safe_load(SMALL.read_text())
    doc.update(name="ppt_small_nemo", engine="nemo")
    path = tmp_path_factory.mktemp("camp") / "small-nemo.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_campaign(path, clusters=REPO / "include" / "clusters")


def _runner(cluster: ClusterProfile, cells: list) -> SimpleNamespace:
    return SimpleNamespace(lc=SimpleNamespace(cluster=cluster, cells=cells))


def test_install_stage_adds_the_nemo_lock_only_for_nemo_campaigns(nemo_campaign) -> None:
    torch_lc = load_campaign(SMALL)
    cluster = torch_lc.cluster
    spec0, key0 = jobs.environment_job(_runner(cluster, torch_lc.cells))
    assert "requirements-nemo.lock" not in spec0.script and "requirements-nemo.lock" not in spec0.files
    spec1, key1 = jobs.environment_job(_runner(cluster, nemo_campaign.cells))
    assert key1 != key0, "the NeMo lock is part of the environment's key"
    assert spec1.files["requirements-nemo.lock"] == (REPO / "requirements-nemo.lock").read_text()
    assert "--no-deps -r requirements-nemo.lock" in spec1.script
    assert "from nemo.collections import llm" in spec1.script  # the smoke import
    env = (cluster.env_dir or "charllm-env").rstrip("/")
    assert f"{env}-nemo" in spec1.script and f"{env}-nemo" not in spec0.script  # its own environment
    lock = (REPO / "requirements-nemo.lock").read_text()
    assert "nemo-toolkit==2.7.3" in lock and "megatron-core==0.15.3" in lock  # NeMo 2.7.3 needs < 0.16
    # the same campaign again: the same key (skipped when built); a container image: no NeMo install
    assert jobs.environment_job(_runner(cluster, nemo_campaign.cells))[1] == key1
    boxed = cluster.model_copy(update={"nemo_container": "nvcr.io#nvidia/nemo:25.11"})
    spec2, key2 = jobs.environment_job(_runner(boxed, nemo_campaign.cells))
    assert key2 == jobs.environment_job(_runner(boxed, torch_lc.cells))[1]
    assert "requirements-nemo.lock" not in spec2.script
    print("keys: torch", key0, "nemo", key1, "nemo in a container", key2)


def test_nemo_container_is_typed_and_bounded() -> None:
    ok = ClusterProfile(name="c", gpu_type="h200", nemo_container="/shared/images/nemo-25.11.sqsh")
    assert ok.nemo_container == "/shared/images/nemo-25.11.sqsh"
    for bad in ("img;rm -rf ~", "a b", "$(id)", "x" * 513, ""):
        with pytest.raises(ValidationError, match="nemo_container"):
            ClusterProfile(name="c", gpu_type="h200", nemo_container=bad)


def test_nemo_cells_run_in_the_container(nemo_campaign) -> None:
    cell = nemo_campaign.cells[0]
    ident = JobIdentity("ppt_small_nemo", cell.cell_id, 0, 1)
    plain = render_script(cell, nemo_campaign.cluster.model_copy(update={"env_dir": "envs/charllm"}), ident)
    assert "--container-image" not in plain
    assert '"$HOME"/envs/charllm-nemo/bin/python -m charllm.train' in plain  # the install stage's NeMo environment
    boxed = nemo_campaign.cluster.model_copy(update={"nemo_container": "nvcr.io#nvidia/nemo:25.11"})
    script = render_script(cell, boxed, ident)
    line = next(ln for ln in script.splitlines() if "--container-image" in ln)
    assert line.startswith("srun --kill-on-bad-exit=1 --container-image='nvcr.io#nvidia/nemo:25.11' ")  # quoted
    assert "python -m charllm.train --cell cell.json --out out" in line
    assert "charllm-src" in script  # charllm's source from the environment job

"""Campaign validation: the good files, and one test per kind of bad input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from charllm.campaign import cell_hash, discover, load_campaign
from charllm.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
GOOD = """\
name: t
cluster: local-cpu
model: tiny
steps: 3
sweep:
  dp: [1, 2]
  micro_batch: [1, 2]
  global_batch: [8]
"""


def write(include: Path, text: str, name: str = "t.yaml") -> Path:
    p = include / "campaigns" / name
    p.write_text(textwrap.dedent(text))
    return p


def test_every_shipped_campaign_validates():
    paths = discover(REPO / "include" / "campaigns")
    assert paths, "no campaign files shipped"
    for p in paths:
        lc = load_campaign(p)
        assert lc.cells, p


def test_demo_expands_to_six_cells():
    lc = load_campaign(REPO / "include" / "campaigns" / "demo.yaml")
    assert len(lc.cells) == 6
    assert len({c.cell_id for c in lc.cells}) == 6
    assert {c.world_size for c in lc.cells} == {1, 2}


def test_cartesian_product_include_exclude(include_tmp):
    p = write(include_tmp, GOOD + "exclude:\n  - {dp: 2, micro_batch: 2}\ninclude:\n  - {dp: 1, micro_batch: 4}\n")
    lc = load_campaign(p)
    names = sorted(c.name for c in lc.cells)
    assert len(names) == 4
    assert not any("dp2-mb2" in n for n in names)
    assert any("dp1-mb4" in n for n in names)


def test_time_limit_rules_apply_per_cell(include_tmp):
    from charllm.backends.base import JobIdentity
    from charllm.render import job_spec

    p = write(include_tmp, GOOD + 'time_limits:\n  - {cells: "*-dp2-*", time_limit: "02:00:00"}\n')
    lc = load_campaign(p)
    for c in lc.cells:
        want = "02:00:00" if "-dp2-" in c.name else lc.cluster.time_limit
        assert lc.cluster_for(c).time_limit == want, c.name
        spec = job_spec(c, lc.cluster_for(c), JobIdentity(lc.name, c.cell_id, 0, 1))
        assert f"#SBATCH --time={want}" in spec.script
        assert spec.time_limit_s == (7200 if "-dp2-" in c.name else 600)
    # the limit is how a cell is run, not what it measures: the hash does not move
    plain = load_campaign(write(include_tmp, GOOD, "plain.yaml"))
    assert [c.cell_id for c in plain.cells] == [c.cell_id for c in lc.cells]


def test_bad_time_limit_rule_names_field(include_tmp):
    p = write(include_tmp, GOOD + 'time_limits:\n  - {cells: "*", time_limit: "soon"}\n')
    with pytest.raises(ConfigError) as err:
        load_campaign(p)
    assert "time_limits" in str(err.value) and str(p) in str(err.value)


def test_dp_auto_and_opt_code(include_tmp):
    p = write(
        include_tmp,
        """\
        name: t
        cluster: local-cpu
        model: tiny
        sweep:
          gpus: [2]
          tp: [1, 2]
          dp: [auto]
          opt_code: ["00000", "11000"]
          global_batch: [8]
        """,
    )
    cells = load_campaign(p).cells
    assert {(c.parallel.tp, c.parallel.dp) for c in cells} == {(1, 2), (2, 1)}
    both = [c for c in cells if c.opt_code == "11000"]
    assert all(c.opt["recompute"] and c.opt["overlap"] for c in both)


def test_hash_is_stable_across_key_order_and_campaign(include_tmp):
    a = write(include_tmp, GOOD, "a.yaml")
    reordered = "sweep:\n  global_batch: [8]\n  micro_batch: [1, 2]\n  dp: [1, 2]\nsteps: 3\nmodel: tiny\ncluster: local-cpu\nname: other\n"
    b = write(include_tmp, reordered, "b.yaml")
    ha = {c.name: c.cell_id for c in load_campaign(a).cells}
    hb = {c.name: c.cell_id for c in load_campaign(b).cells}
    assert ha == hb


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 4), ("precision", "fp32"), ("telemetry_hz", 10), ("seed", 7), ("engine", "megatron")],
)
def test_hash_changes_with_any_measured_value(include_tmp, field, value):
    base = load_campaign(write(include_tmp, GOOD, "a.yaml")).cells
    changed = load_campaign(write(include_tmp, GOOD + f"{field}: {value}\n", "b.yaml")).cells
    assert {c.cell_id for c in base}.isdisjoint({c.cell_id for c in changed})


def test_hash_payload_order_independent():
    assert cell_hash({"a": 1, "b": {"x": 1, "y": 2}}) == cell_hash({"b": {"y": 2, "x": 1}, "a": 1})
    assert cell_hash({"a": 1}) != cell_hash({"a": 2})


# -- bad input: each kind names the file and the field ----------------------------------------------

BAD = {
    "yaml_syntax": ("name: t\ncluster: [local-cpu\n", "line"),
    "unknown_field": (GOOD + "colour: blue\n", "colour"),
    "wrong_type": (GOOD.replace("steps: 3", "steps: many"), "steps"),
    "tp_not_dividing_heads": (GOOD + "include:\n  - {tp: 3, dp: 1}\n", "include[0].tp"),
    "layers_not_divisible_by_pp": (GOOD + "include:\n  - {pp: 3, dp: 1}\n", "include[0].pp"),
    "world_size_mismatch": (GOOD.replace("sweep:\n", "sweep:\n  gpus: [4]\n"), ".gpus"),
    "global_batch_not_divisible": (GOOD.replace("global_batch: [8]", "global_batch: [6]"), "global_batch"),
    "shell_metachar_in_name": (GOOD.replace("name: t", "name: 't; rm -rf ~'"), "name"),
    "shell_metachar_in_schedule": (GOOD + "schedule: '0 3 * * *; reboot'\n", "schedule"),
    "unknown_model": (GOOD.replace("model: tiny", "model: gpt5"), "model"),
    "unknown_cluster": (GOOD.replace("cluster: local-cpu", "cluster: nowhere"), "cluster"),
    "too_many_gpus": (GOOD.replace("dp: [1, 2]", "dp: [1, 4]"), ".gpus"),
    "unknown_axis_in_include": (GOOD + "include:\n  - {tensor: 2}\n", "include"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_campaign_names_file_and_field(include_tmp, kind):
    text, field = BAD[kind]
    p = write(include_tmp, text, f"bad_{kind}.yaml")
    with pytest.raises(ConfigError) as exc:
        load_campaign(p)
    msg = str(exc.value)
    assert str(p) in msg, msg
    assert field in exc.value.field or field in msg, msg

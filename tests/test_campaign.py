"""Campaign validation: the good files, and one test per kind of bad input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from charllm.campaign import cell_hash, discover, load_campaign
from charllm.errors import ConfigError
from tests import campaign_files
from tests.campaign_files import GOOD

REPO = Path(__file__).resolve().parent.parent


def write(include: Path, text: str, name: str = "t.yaml") -> Path:
    return campaign_files.write(include, textwrap.dedent(text), name)


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
    text = GOOD.replace("steps: 3\n", "") if field == "steps" else GOOD  # a key given twice is an error
    changed = load_campaign(write(include_tmp, text + f"{field}: {value}\n", "b.yaml")).cells
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


# -- cell ids stay put; the new axes ------------------------------------------------------------------

# ids computed before pp_virtual and recompute modes existed: a knob at its default moves no id
GOLDEN_IDS = {
    ("demo.yaml", "tiny-tp1pp1dp1-mb2-gb8-s64-00000"): "95d650a415ad8acf",
    ("demo.yaml", "tiny-tp1pp1dp2-mb2-gb8-s64-01000"): "231e522323a97e1f",
    ("charllm-h100-opt.yaml", "gpt3-175b-tp2pp32dp1-mb1-gb128-s2048-10000"): "9b07c691b20191bc",
    ("charllm-h100-opt.yaml", "llama3-70b-tp8pp1dp8-fsdp-mb1-gb128-s8192-11000"): "06637ae8487ea592",
    ("charllm-h200-opt.yaml", "mixtral-8x7b-tp2pp1dp16ep4-mb1-gb128-s4096-00000"): "61b86140fb6f1095",
    ("charllm-microbatch.yaml", "gpt3-175b-tp1pp32dp1-mb2-gb128-s2048-01000"): "4bdaa1dbf2665830",
    ("charllm-fig4-parallelism.yaml", "gpt3-175b-tp2pp16dp1-mb1-gb128-s2048-01000"): "8a25e87f5f56713b",
    ("charllm-small.yaml", "gpt3-1.3b-L4-tp1pp1dp2-mb2-gb32-s2048-00000"): "48f673651b24e0ef",
    ("charllm-small-1gpu.yaml", "llama3-8b-L2-tp1pp1dp1-mb1-gb8-s4096-01000"): "9351847457ce0589",
}


def test_golden_cell_ids() -> None:
    ids: dict[tuple[str, str], str] = {}
    for fname in {f for f, _ in GOLDEN_IDS}:
        for c in load_campaign(REPO / "include" / "campaigns" / fname).cells:
            ids[(fname, c.name)] = c.cell_id
    assert {k: ids.get(k) for k in GOLDEN_IDS} == GOLDEN_IDS


def test_new_axes_at_their_defaults_keep_ids(include_tmp):
    base = {c.name: c.cell_id for c in load_campaign(write(include_tmp, GOOD, "a.yaml")).cells}
    explicit = GOOD.replace("sweep:\n", "sweep:\n  pp_virtual: [1]\n  recompute: [none]\n")
    assert {c.name: c.cell_id for c in load_campaign(write(include_tmp, explicit, "b.yaml")).cells} == base
    on = {
        c.name: c.cell_id for c in load_campaign(write(include_tmp, GOOD + "include:\n  - {recompute: true}\n")).cells
    }
    full = GOOD + "include:\n  - {recompute: full}\n"
    assert {c.name: c.cell_id for c in load_campaign(write(include_tmp, full, "c.yaml")).cells} == on
    lc = load_campaign(write(include_tmp, full, "c.yaml"))
    assert all("recompute_granularity" not in c.opt and c.parallel.pp_virtual == 1 for c in lc.cells)


GPU_MEGATRON = """\
name: t
cluster: {name: g, gpu_type: h100, gpus_per_node: 8, nodes: 1}
model: gpt3-125m
engine: megatron
sweep:
  gpus: [8]
  tp: [2]
  pp: [2]
  dp: [auto]
  pp_virtual: [1, 3]
  recompute: [full, selective]
  global_batch: [16]
"""


def test_pp_virtual_and_selective_recompute_are_new_cells(include_tmp):
    lc = load_campaign(write(include_tmp, GPU_MEGATRON))
    assert len(lc.cells) == 4 and len({c.name for c in lc.cells}) == 4
    by = {(c.parallel.pp_virtual, c.recompute_mode): c for c in lc.cells}
    assert set(by) == {(1, "full"), (3, "full"), (1, "selective"), (3, "selective")}
    assert by[(3, "selective")].name == "gpt3-125m-tp2pp2vp3dp2-mb1-gb16-s64-01000-rsel"
    assert by[(1, "full")].name == "gpt3-125m-tp2pp2dp2-mb1-gb16-s64-01000"
    assert by[(1, "selective")].opt["recompute_granularity"] == "selective"
    # the job reads both knobs
    from charllm.train.cell import CellSpec

    spec = CellSpec.from_dict(by[(3, "selective")].job_config(0))
    assert spec.parallel.pp_virtual == 3 and spec.opt.recompute and spec.opt.recompute_granularity == "selective"
    # opt_code's recompute digit keeps a selective axis selective
    coded = load_campaign(write(include_tmp, GPU_MEGATRON + '  opt_code: ["01000", "00000"]\n', "c.yaml"))
    assert {c.recompute_mode for c in coded.cells} == {"full", "selective", "none"}
    # exclude matches recompute in any spelling
    ex = load_campaign(write(include_tmp, GPU_MEGATRON + "exclude:\n  - {recompute: true}\n", "d.yaml"))
    assert {c.recompute_mode for c in ex.cells} == {"selective"}


@pytest.mark.parametrize(
    ("old", "new", "field", "words"),
    [
        # both engines run virtual stages (torch: ScheduleInterleaved1F1B) under the same rules
        ("engine: megatron", "engine: torch", "pp_virtual", "micro batches per step \\(3 = .*multiple of pp 2"),
        ("global_batch: [16]", "global_batch: [6]", "pp_virtual", "micro batches per step \\(3 = .*multiple of pp 2"),
        ("pp_virtual: [1, 3]", "pp_virtual: [5]", "pp_virtual", "2\\*5 = 10 does not divide gpt3-125m's 12 layers"),
    ],
)
def test_new_axes_are_checked(include_tmp, old, new, field, words):
    text = GPU_MEGATRON.replace(old, new)
    if "cpu" in new:
        text = text.replace("pp_virtual: [1, 3]", "pp_virtual: [1]").replace("[full, selective]", "[selective]")
    if "torch" in new:
        text = text.replace("[full, selective]", "[full]").replace("global_batch: [16]", "global_batch: [6]")
    p = write(include_tmp, text)
    with pytest.raises(ConfigError, match=words) as exc:
        load_campaign(p)
    err = exc.value
    assert err.source == str(p) and err.field.startswith("sweep[") and err.field.endswith("." + field)
    assert "cell gpt3-125m-tp2pp2" in err.message


def test_refused_cell_names_file_where_cell_and_reason(include_tmp):
    p = write(include_tmp, GOOD + "include:\n  - {tp: 3, dp: 1}\n")
    with pytest.raises(ConfigError) as exc:
        load_campaign(p)
    assert exc.value.field == "include[0].tp"
    assert str(exc.value).startswith(
        f"{p}: include[0].tp: cell tiny-tp3pp1dp1-mb1-gb8-s64-00000 cannot run: tensor parallel size 3 does not "
        "divide tiny's 4 attention heads (and 4 more: tp: tensor parallel size 3 does not divide tiny's 4 KV heads; "
    )
    # unchecked, the campaign keeps the cell and says why it cannot run
    lc = load_campaign(p, check=False)
    (cid,) = lc.refused
    assert [r.field for r in lc.refused[cid]] == ["tp", "tp", "tp", "gpus", "gpus"]

"""Malformed and hostile campaign input (issue 10): one test (or more) per class of bad input.

Every refusal is a ConfigError naming the exact file and field; nothing a hostile value tries
to run ever runs (a marker file that its ``touch`` would create never appears, also after the
job script is rendered and run by bash with a stub python on PATH); nothing is written outside
its root; bombs are refused in bounded time and memory; a real Airflow keeps loading the other
DAGs next to broken files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from charllm.backends.base import JobIdentity
from charllm.campaign import (
    DEFAULT_MAX_CELLS,
    check_unique_name,
    discover,
    load_campaign,
    path_under,
)
from charllm.errors import ConfigError
from charllm.shell import is_safe_name
from tests.campaign_files import GOOD, write

REPO = Path(__file__).resolve().parent.parent


def refused(path: Path) -> ConfigError:
    """The ConfigError ``load_campaign(path)`` raises (and nothing else: no traceback of another kind)."""
    with pytest.raises(ConfigError) as exc:
        load_campaign(path)
    assert exc.value.source == str(path), str(exc.value)
    return exc.value


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# -- 1. a campaign file ran a shell command (untyped include/exclude values reached the job script) ---

HOSTILE = [
    ("opt_code", '"00000\\ntouch {marker}"', "opt_code"),
    ("recompute", '"selective\\ntouch {marker}"', "recompute"),
    ("dp", '"auto\\ntouch {marker}"', "dp"),
    ("model", '"tiny\\ntouch {marker}"', "model.name"),
    ("model", '{{name: tiny, proxy_layers: "1\\ntouch {marker}"}}', "model.proxy_layers"),
    ("fsdp", '"$(touch {marker})"', "fsdp"),
    ("micro_batch", '"2; touch {marker}"', "micro_batch"),
    ("seq_len", '"`touch {marker}`"', "seq_len"),
    ("gpus", '"2\\n#SBATCH --wrap=touch {marker}"', "gpus"),
]


@pytest.mark.parametrize("where", ["include", "exclude"])
@pytest.mark.parametrize(("axis", "value", "field"), HOSTILE, ids=[f"{a}-{f}" for a, _, f in HOSTILE])
def test_hostile_include_exclude_values_are_refused_and_never_run(
    include_tmp, charllm_home, tmp_path, capsys, where, axis, value, field
):
    from charllm.cli import main

    marker = tmp_path / "PWNED"
    text = GOOD + f"{where}:\n  - {{dp: 1, {axis}: {value.format(marker=marker)}}}\n"
    if axis == "dp":
        text = GOOD + f"{where}:\n  - {{{axis}: {value.format(marker=marker)}}}\n"
    p = write(include_tmp, text)
    err = refused(p)
    assert err.field == f"{where}[0].{field}", str(err)
    # the CLI's render and validate refuse it too, write nothing and run nothing
    dest = tmp_path / "scripts"
    assert main(["render", str(p), str(dest)]) == 2
    assert f"{p}: {where}[0].{field}:" in capsys.readouterr().err
    assert main(["validate", str(p)]) == 1
    assert f"ERROR {p}: {where}[0].{field}:" in capsys.readouterr().out
    assert not dest.exists()
    assert not marker.exists()


def test_hostile_campaign_is_refused_by_the_dag_factory(include_tmp, tmp_path):
    from charllm.orchestrate.factory import campaign_dag

    marker = tmp_path / "PWNED"
    p = write(include_tmp, GOOD + f'include:\n  - {{dp: 1, opt_code: "00000\\ntouch {marker}"}}\n', "hostile.yaml")
    with pytest.raises(ConfigError) as exc:
        campaign_dag(p)
    assert exc.value.source == str(p) and exc.value.field == "include[0].opt_code"
    assert not marker.exists()


def _stub_python(bin_dir: Path, log: Path) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    stub = bin_dir / "python"
    stub.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" >> {log}\nexit 0\n')
    stub.chmod(0o755)
    return stub


def _run_script(script: Path, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(script.parent)}
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, env=env)
    assert syntax.returncode == 0, syntax.stderr
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)


HOSTILE_ENV = ["$(touch {m})", "`touch {m}`", "'; touch {m}; '", "a\\$(touch {m})", '"; touch {m}; "']


def test_rendered_scripts_quote_every_value_and_run_nothing_else(include_tmp, tmp_path):
    """Values that may hold anything (cluster env values) are quoted: the script runs, its stub python
    is called, and the marker their ``touch`` would create never appears."""
    from charllm.render import job_spec, write_dry_run

    marker = tmp_path / "PWNED"
    env_lines = "".join(f"  V{i}: {json.dumps(v.format(m=marker))}\n" for i, v in enumerate(HOSTILE_ENV))
    cluster = (include_tmp / "clusters" / "local-cpu.yaml").read_text()
    (include_tmp / "clusters" / "hostile-cpu.yaml").write_text(
        cluster.replace("name: local-cpu", "name: hostile-cpu") + "env:\n" + env_lines
    )
    p = write(include_tmp, GOOD.replace("local-cpu", "hostile-cpu"))
    lc = load_campaign(p)
    log = tmp_path / "python-calls.log"
    bin_dir = tmp_path / "bin"
    stub = _stub_python(bin_dir, log)
    for c in lc.cells:
        dest = tmp_path / "jobs" / c.name
        spec = job_spec(c, lc.cluster_for(c), JobIdentity(lc.name, c.cell_id, 0, 1), python=str(stub))
        script = write_dry_run(spec, dest, root=tmp_path / "jobs")
        run = _run_script(script, bin_dir)
        assert run.returncode == 0, run.stdout + run.stderr
    assert not marker.exists()
    calls = log.read_text()
    assert calls.count("charllm.train") == len(lc.cells)  # every script ran to its launch line


@pytest.mark.parametrize(
    "attack",
    [
        "cell_name",
        "cell_name_unicode_separator",
        "campaign",
        "partition",
        "account",
        "qos",
        "time_limit",
        "env_key",
        "module",
        "job_name_nonce",
    ],
)
def test_render_refuses_control_characters_that_slipped_past_validation(tmp_path, attack):
    """The templates' last line of defence: values built without validation (``model_copy``) that hold a
    newline are refused when rendered; the script is never written and nothing runs."""
    from charllm.render import render_script

    lc = load_campaign(REPO / "include/campaigns/demo.yaml")
    cell = next(c for c in lc.cells if c.world_size == 1)
    cluster = lc.cluster
    ident = JobIdentity("demo", cell.cell_id, 0, 1)
    marker = tmp_path / "PWNED"
    evil = f"x\ntouch {marker}\n#"
    if attack == "cell_name":
        cell = cell.model_copy(update={"name": evil})
    elif attack == "cell_name_unicode_separator":
        cell = cell.model_copy(update={"name": f"x\u2028touch {marker}"})
    elif attack == "campaign":
        ident = JobIdentity(evil, cell.cell_id, 0, 1)
    elif attack == "job_name_nonce":
        ident = JobIdentity("demo", cell.cell_id, 0, 1, nonce=evil)
    elif attack == "env_key":
        cluster = cluster.model_copy(update={"env": {evil: "1"}})
    elif attack == "module":
        cluster = cluster.model_copy(update={"modules": [evil]})
    else:
        cluster = cluster.model_copy(update={attack: evil})
    with pytest.raises(ConfigError, match="control character|not a plain word"):
        render_script(cell, cluster, ident, "/usr/bin/python3")
    assert not marker.exists()


# -- 2. untyped values: silent coercions, tracebacks, paths that leave their folder -------------------

COERCIONS = {
    "string_false_is_not_a_bool": ("include:\n  - {dp: 1, fsdp: 'false'}\n", "include[0].fsdp", "valid boolean"),
    "string_true_overlap": ("include:\n  - {dp: 1, overlap: 'true'}\n", "include[0].overlap", "valid boolean"),
    "int_is_not_a_bool": ("exclude:\n  - {fsdp: 1}\n", "exclude[0].fsdp", "valid boolean"),
    "float_is_not_truncated": ("include:\n  - {dp: 1, micro_batch: 2.5}\n", "include[0].micro_batch", "integer"),
    "float_two_point_zero": ("include:\n  - {dp: 1, tp: 2.0}\n", "include[0].tp", "integer"),
    "string_number": ("include:\n  - {dp: 1, seq_len: '64'}\n", "include[0].seq_len", "integer"),
    "bool_is_not_an_int": ("include:\n  - {dp: 1, global_batch: true}\n", "include[0].global_batch", "integer"),
    "zero_size": ("include:\n  - {dp: 1, micro_batch: 0}\n", "include[0].micro_batch", ">= 1|greater than"),
    "negative_size": ("include:\n  - {dp: 1, global_batch: -8}\n", "include[0].global_batch", "greater than"),
    "zero_tp_division": ("include:\n  - {gpus: 2, tp: 0, dp: auto}\n", "include[0].tp", "greater than"),
    "zero_gpus": ("include:\n  - {gpus: 0, dp: auto}\n", "include[0].gpus", "greater than"),
    "negative_pp_virtual": ("include:\n  - {dp: 1, pp_virtual: -1}\n", "include[0].pp_virtual", "greater than"),
    "huge_degree": ("include:\n  - {dp: 1, tp: 100000000000}\n", "include[0].tp", "less than"),
    "null_value": ("include:\n  - {dp: null}\n", "include[0]", "null value for dp"),
    "empty_entry": ("include:\n  - {}\n", "include[0]", "empty entry"),
    "entry_not_a_mapping": ("include:\n  - [1, 2]\n", "include[0]", "dictionary"),
    "include_not_a_list": ("include: {dp: 1}\n", "include", "list"),
    "unknown_axis": ("exclude:\n  - {tensor: 2}\n", "exclude[0].tensor", "unknown axis 'tensor'"),
    "model_wrong_type": ("include:\n  - {dp: 1, model: 5}\n", "include[0].model", "dictionary|ModelRef"),
    "unknown_model": ("include:\n  - {dp: 1, model: gpt5}\n", "include[0].model.name", "unknown model"),
    "proxy_deeper_than_model": (
        "include:\n  - {dp: 1, model: {name: tiny, proxy_layers: 99}}\n",
        "include[0].model.proxy_layers",
        "proxy_layers must be in",
    ),
    "opt_code_wrong": ("include:\n  - {dp: 1, opt_code: '2'}\n", "include[0].opt_code", "pattern"),
    "opt_code_int": ("include:\n  - {dp: 1, opt_code: 10000}\n", "include[0].opt_code", "string"),
    "recompute_unknown": ("include:\n  - {dp: 1, recompute: partial}\n", "include[0].recompute", "selective"),
    "sweep_float": ("sweep:\n  tp: [1.5]\n", "sweep.tp[0]", "integer"),
    "sweep_string_bool": ("sweep:\n  fsdp: ['no']\n", "sweep.fsdp[0]", "valid boolean"),
    "steps_float": ("steps: 3.5\n", "steps", "integer"),
    "repeats_string": ("repeats: '2'\n", "repeats", "integer"),
    "compile_string": ("compile: 'yes'\n", "compile", "valid boolean"),
    "learning_rate_text": ("learning_rate: fast\n", "learning_rate", "number"),
    "learning_rate_nan": ("learning_rate: .nan\n", "learning_rate", "finite|less than"),
    "telemetry_inf": ("telemetry_hz: .inf\n", "telemetry_hz", "finite|less than"),
    "cluster_inline_float": ("cluster: {name: c, gpus_per_node: 2.0}\n", "cluster.gpus_per_node", "integer"),
}


def _with(extra: str) -> str:
    """GOOD with ``extra`` appended, minus the top-level keys ``extra`` sets (a key twice is its own error)."""
    keys = {ln.split(":")[0] for ln in extra.splitlines() if ln and not ln.startswith(" ")}
    kept, skip = [], False
    for ln in GOOD.splitlines():
        top = not ln.startswith(" ")
        if top:
            skip = ln.split(":")[0] in keys
        if not skip:
            kept.append(ln)
    return "\n".join(kept) + "\n" + extra


@pytest.mark.parametrize("kind", sorted(COERCIONS))
def test_untyped_values_are_errors_naming_file_and_field(include_tmp, kind):
    extra, field, words = COERCIONS[kind]
    p = write(include_tmp, _with(extra), f"{kind}.yaml")
    err = refused(p)
    assert err.field == field, str(err)
    assert re.search(words, err.message), str(err)


TEXT_FIELDS = {
    "env_value": ('cluster: {name: c, gpus_per_node: 2, env: {V: "a\\nb"}}\n', "cluster.env.V"),
    "env_key": ('cluster: {name: c, gpus_per_node: 2, env: {"A-B": "x"}}\n', "cluster.env"),
    "time_limit_glob": ('time_limits: [{cells: "a\\nb", time_limit: "01:00:00"}]\n', "time_limits[0].cells"),
    "nightly_glob": ('nightly: {cells: "\\t"}\n', "nightly.cells"),
    "reference_glob": (
        'references: [{metric: m, value: 1, lower: 0, upper: 2, cells: "x\\r"}]\n',
        "references[0].cells",
    ),
}


@pytest.mark.parametrize("kind", sorted(TEXT_FIELDS))
def test_text_that_reaches_a_script_or_a_log_has_no_control_characters(include_tmp, kind):
    """Refused when the file is checked, not when a job script is rendered hours later."""
    extra, field = TEXT_FIELDS[kind]
    err = refused(write(include_tmp, _with(extra)))
    assert err.field == field, str(err)


@pytest.mark.parametrize(
    ("value", "field", "words"),
    [
        ("!!python/object:os.system x", "line 9, column 14", "constructor"),
        ("!custom x", "line 9, column 14", "constructor"),
        ("!!timestamp nope", "(yaml)", "cannot build"),
        ("2001-13-45", "(yaml)", "cannot build"),
        ("9" * 10_000, "(yaml)", "cannot build"),
        ("{[1, 2]: x}", "line 9", "unhashable"),
    ],
    ids=["python_object", "custom_tag", "bad_timestamp", "bad_date", "huge_int", "unhashable_key"],
)
def test_odd_yaml_is_an_error_not_a_traceback(include_tmp, value, field, words):
    err = refused(write(include_tmp, GOOD + f"description: {value}\n"))
    assert err.field.startswith(field) and words in err.message, str(err)


def test_learning_rate_in_yaml_1_1_exponent_form_still_reads_as_a_number(include_tmp):
    lc = load_campaign(write(include_tmp, GOOD + "learning_rate: 3e-4\n"))
    assert lc.campaign.learning_rate == pytest.approx(3e-4)


def test_typed_include_and_exclude_keep_their_meaning(include_tmp):
    p = write(
        include_tmp,
        GOOD
        + "exclude:\n  - {dp: 2, micro_batch: 2}\n  - {model: tiny, dp: 1, micro_batch: 1, recompute: none}\n"
        + "include:\n  - {dp: 1, micro_batch: 4, fsdp: false, recompute: true}\n",
    )
    names = sorted(c.name for c in load_campaign(p).cells)
    assert names == [
        "tiny-tp1pp1dp1-mb2-gb8-s64-00000",
        "tiny-tp1pp1dp1-mb4-gb8-s64-01000",
        "tiny-tp1pp1dp2-mb1-gb8-s64-00000",
    ]


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("../../etc", "'..' component"),
        ("data/../../x", "'..' component"),
        ("/scratch/../etc", "'..' component"),
        ("~other/data", "'~' only as the first component"),
        ("a/~/b", "'~' only as the first component"),
        ("a b", "pattern"),
        ("data\\n", "pattern"),
    ],
)
def test_dataset_path_stays_under_its_root(include_tmp, path, words):
    text = GOOD + f'dataset: {{kind: indexed, corpus: [data/corpus/tiny.txt], path: "{path}"}}\n'
    err = refused(write(include_tmp, text))
    assert err.field == "dataset.path" and re.search(words, err.message), str(err)


@pytest.mark.parametrize("corpus", ["../secret.txt", "data/../../secret.txt", "a\\u2028b.txt", "ftp://x/y"])
def test_relative_corpus_stays_under_include(include_tmp, corpus):
    text = GOOD + f'dataset: {{kind: indexed, corpus: ["{corpus}"]}}\n'
    err = refused(write(include_tmp, text))
    assert err.field == "dataset.corpus", str(err)


def test_path_under_follows_symlinks_and_refuses_escapes(tmp_path):
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    (root / "link").symlink_to(tmp_path)
    assert path_under(root, "ok", "x") == (root / "ok" / "x").resolve()
    for parts in (("..", "x"), ("link", "x"), ("ok/../../x",), ("/etc/passwd",)):
        with pytest.raises(ConfigError, match="leaves its folder"):
            path_under(root, *parts)


def test_dataset_dir_and_dry_run_folders_stay_under_their_roots(tmp_path):
    from charllm.backends.base import JobSpec
    from charllm.render import dataset_dir_word, write_dry_run

    home = tmp_path / "home"
    home.mkdir()
    ok = dataset_dir_word({"path": "data", "key": "0123456789abcdef"}, home)
    assert ok == f"{home}/data/0123456789abcdef"
    for bad in ({"path": "../x", "key": "0123456789abcdef"}, {"path": "data", "key": "../../etc"}):
        with pytest.raises(ConfigError):
            dataset_dir_word(bad, home)
    spec = JobSpec(JobIdentity("demo", "0123456789abcdef", 0, 1), "#!/bin/bash\n", {"../escape.json": "{}"})
    before = files_under(tmp_path)
    with pytest.raises(ConfigError, match="leaves its folder"):
        write_dry_run(spec, tmp_path / "dry" / "cell")
    with pytest.raises(ConfigError, match="leaves its root"):
        write_dry_run(JobSpec(spec.identity, "x", {}), tmp_path / "elsewhere", root=tmp_path / "dry")
    assert files_under(tmp_path) == before


def test_cli_render_writes_only_under_dest(include_tmp, charllm_home, tmp_path, capsys):
    from charllm.cli import main

    p = write(include_tmp, GOOD)
    dest = tmp_path / "scripts"
    before = files_under(tmp_path)
    assert main(["render", str(p), str(dest)]) == 0
    new = {f for f in files_under(tmp_path) - before if not f.is_relative_to(charllm_home)}  # the catalog
    assert new and all(f.is_relative_to(dest) for f in new), sorted(new)
    assert len([f for f in new if f.name == "job.sbatch"]) == 4


def test_dataprep_never_replaces_a_folder_that_is_not_a_dataset(tmp_path):
    from charllm.setup.dataprep import DataPrepError, prepare

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello\nworld\n")
    home = tmp_path / "precious"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(DataPrepError, match="not a charllm dataset"):
        prepare([str(corpus)], home)
    assert (home / "thesis.tex").read_text() == "years of work"
    with pytest.raises(DataPrepError, match="filesystem root|folder below"):
        prepare([str(corpus)], "/")


# -- 3. names: one strict full-match pattern (a trailing newline split #SBATCH lines) ---------------

NAME_FIELDS = [
    ("name", "name: {v}\n", "name"),
    ("cluster", "cluster: {v}\n", "cluster"),
    ("connection_id", "backend: slurm\nconnection_id: {v}\n", "connection_id"),
    ("tags", "tags: [ok, {v}]\n", "tags[1]"),
    ("cluster.name", "cluster: {{name: {v}}}\n", "cluster.name"),
    ("cluster.partition", "cluster: {{name: c, partition: {v}}}\n", "cluster.partition"),
    ("cluster.account", "cluster: {{name: c, account: {v}}}\n", "cluster.account"),
    ("cluster.qos", "cluster: {{name: c, qos: {v}}}\n", "cluster.qos"),
    ("cluster.time_limit", "cluster: {{name: c, time_limit: {v}}}\n", "cluster.time_limit"),
    ("cluster.gres", "cluster: {{name: c, gres_per_node: {v}}}\n", "cluster.gres_per_node"),
    ("cluster.mem", "cluster: {{name: c, mem: {v}}}\n", "cluster.mem"),
    ("cluster.env_dir", "cluster: {{name: c, env_dir: {v}}}\n", "cluster.env_dir"),
    ("references.metric", "references: [{{metric: {v}, value: 1, lower: 0, upper: 2}}]\n", "references[0].metric"),
]
BAD_NAMES = {
    "trailing_newline": '"ok\\n"',
    "newline_sbatch": '"ok\\n#SBATCH --wrap=id"',
    "trailing_cr": '"ok\\r"',
    "nul": '"ok\\0"',
    "unicode_line_separator": '"ok\\u2028"',
    "space": '"o k"',
    "slash": '"a/b"',
    "dotdot": '".."',
    "leading_dash": '"-ok"',
    "too_long": '"' + "a" * 200 + '"',
    "number": "12",
}


NAME_LIKE = {w for w, _, _ in NAME_FIELDS} - {"cluster.time_limit", "cluster.gres", "cluster.mem", "cluster.env_dir"}
CONTROL = {"trailing_newline", "newline_sbatch", "trailing_cr", "nul", "unicode_line_separator", "space"}


NAME_CASES = [
    pytest.param(text, field, BAD_NAMES[bad], id=f"{what}-{bad}")
    for what, text, field in NAME_FIELDS
    for bad in sorted(BAD_NAMES)
    if what in NAME_LIKE or bad in CONTROL
]


@pytest.mark.parametrize(("text", "field", "value"), NAME_CASES)
def test_every_name_is_checked_by_the_one_strict_pattern(include_tmp, text, field, value):
    """Names: every bad value; the other words of a job script (time limit, gres, memory, paths): every
    value with a control character or a space (their own patterns decide about the rest)."""
    err = refused(write(include_tmp, _with(text.format(v=value))))
    assert err.field == field, str(err)


def test_the_name_pattern_is_a_full_match():
    assert is_safe_name("demo-1.x_y")
    for bad in ("demo\n", "demo\r", "demo\n#SBATCH", "", "-x", ".x", "a b", "a/b", "a" * 129, 5, None):
        assert not is_safe_name(bad), repr(bad)


# -- 4. bombs: bounded time and memory, checked before any expansion ----------------------------------

GOOD_HEAD = "name: {name}\ncluster: local-cpu\nmodel: tiny\nsteps: 3\n"


def _alias_bomb() -> str:
    lines = ["l0: &l0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return GOOD_HEAD.format(name="bomb") + "\n".join(lines) + "\ndescription: *l8\n"


def _huge_product(per_axis: int, axes: int) -> str:
    values = ", ".join(str(i) for i in range(1, per_axis + 1))
    names = ["micro_batch", "global_batch", "seq_len", "tp", "pp"][:axes]
    return GOOD_HEAD.format(name="huge") + "sweep:\n" + "".join(f"  {n}: [{values}]\n" for n in names)


BOMBS = {
    "alias_bomb": (_alias_bomb, r"l\d\[\d+\]", "expands to more than"),
    "huge_product_1e6": (lambda: _huge_product(100, 3), "sweep", "1000000 cells"),
    "huge_product_1e10": (lambda: _huge_product(100, 5), "sweep", "10000000000 cells"),
    "deep_nesting": (
        lambda: GOOD_HEAD.format(name="deep") + "description: " + "[" * 100_000 + "]" * 100_000 + "\n",
        r"description\[0\]",
        "nested deeper than",
    ),
    "many_aliases": (
        lambda: GOOD_HEAD.format(name="many") + "tags: &t [a]\ninclude: [" + ", ".join(["*t"] * 100_000) + "]\n",
        r"include\[\d+\]",
        "more than 1000 YAML aliases",
    ),
    "alias_cycle": (lambda: GOOD_HEAD.format(name="cyc") + "tags: &t [a, *t]\n", r"tags\[1\]", "cycle"),
    "two_mib": (
        lambda: GOOD_HEAD.format(name="big") + "description: '" + "x" * (2 << 20) + "'\n",
        r"\(file\)",
        "larger",
    ),
}

_DRIVER = textwrap.dedent(
    """
    import json, resource, subprocess, sys, time
    t0 = time.monotonic()
    p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    wall = time.monotonic() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"rc": p.returncode, "wall_s": wall, "peak_mb": rss, "out": p.stdout + p.stderr}))
    """
)


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_bombs_are_refused_in_bounded_time_and_memory(include_tmp, kind):
    """``charllm validate`` in a fresh process; peak RSS of that process from RUSAGE_CHILDREN.

    The target is 2 s and 200 MB (``benchmarks/bad_input.py`` prints it); the assertion is a
    generous bound for a loaded CI machine.
    """
    make, field, words = BOMBS[kind]
    p = write(include_tmp, make(), f"{kind}.yaml")
    charllm = str(Path(sys.executable).parent / "charllm")
    out = subprocess.run(
        [sys.executable, "-c", _DRIVER, charllm, "validate", str(p)], capture_output=True, text=True, timeout=120
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{kind}: validate refused it in {r['wall_s']:.2f} s, peak {r['peak_mb']:.0f} MB")
    assert r["rc"] == 1, r["out"][-2000:]
    line = next(ln for ln in r["out"].splitlines() if ln.startswith("ERROR"))
    assert re.match(rf"ERROR {re.escape(str(p))}: {field}", line), line
    assert words in line, line
    assert "Traceback" not in r["out"]
    assert r["wall_s"] < 10 and r["peak_mb"] < 400, r


def test_cell_cap_is_checked_before_expansion_and_configurable(include_tmp, monkeypatch):
    import charllm.campaign as campaign

    calls: list[int] = []
    real = campaign.itertools.product

    def counting_product(*axes: Any) -> Any:
        calls.append(1)
        return real(*axes)

    monkeypatch.setattr(campaign.itertools, "product", counting_product)
    p = write(include_tmp, _huge_product(30, 3))
    err = refused(p)
    assert err.field == "sweep" and f"at most {DEFAULT_MAX_CELLS} cells" in err.message and "27000 cells" in err.message
    assert calls == []  # refused from the axis lengths, never expanded
    demo = REPO / "include/campaigns/demo.yaml"
    monkeypatch.setenv("CHARLLM_MAX_CELLS", "6")
    assert len(load_campaign(demo).cells) == 6  # the cap is inclusive
    monkeypatch.setenv("CHARLLM_MAX_CELLS", "5")
    with pytest.raises(ConfigError, match="at most 5 cells") as exc:
        load_campaign(demo)
    assert exc.value.field == "sweep"
    monkeypatch.setenv("CHARLLM_MAX_CELLS", "many")
    with pytest.raises(ConfigError) as exc:
        load_campaign(demo)
    assert exc.value.field == "CHARLLM_MAX_CELLS"


def test_include_entries_count_against_the_cap(include_tmp, monkeypatch):
    monkeypatch.setenv("CHARLLM_MAX_CELLS", "10")
    incl = "".join(f"  - {{dp: 1, micro_batch: {i}}}\n" for i in range(1, 12))
    err = refused(write(include_tmp, GOOD + "include:\n" + incl))
    assert err.field == "include" and "11 include entries" in err.message


# -- 5. two campaign files with one name ---------------------------------------------------------------


def test_duplicate_names_validate_reports_both_files(include_tmp, capsys):
    from charllm.cli import main

    folder = include_tmp / "campaigns"
    a = write(include_tmp, GOOD.replace("name: t", "name: twin"), "twin_a.yaml")
    b = write(include_tmp, GOOD.replace("name: t", "name: twin"), "twin_b.yaml")
    c = write(include_tmp, GOOD.replace("name: t", "name: solo"), "solo.yaml")
    f = write(include_tmp, GOOD.replace("name: t", "name: solo_figures"), "solo_figures.yaml")
    broken = write(include_tmp, "name: [", "broken.yaml")
    assert main(["validate", str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"ERROR {a}: name: campaign name 'twin' is also used by {b}" in out
    assert f"ERROR {b}: name: campaign name 'twin' is also used by {a}" in out
    assert f"ERROR {c}: name: campaign name 'solo' and {f}'s name 'solo_figures'" in out
    assert f"ERROR {f}: name:" in out and f"ERROR {broken}: line " in out
    # every file is reported, the shipped ones too
    for p in discover(folder):
        assert str(p) in out, p
    assert "5 of " in out


def test_duplicate_names_the_factory_refuses_both(include_tmp):
    from charllm.orchestrate.factory import campaign_dag

    a = write(include_tmp, GOOD.replace("name: t", "name: twin"), "twin_a.yaml")
    b = write(include_tmp, GOOD.replace("name: t", "name: twin"), "twin_b.yaml")
    for me, other in ((a, b), (b, a)):
        with pytest.raises(ConfigError) as exc:
            campaign_dag(me)
        assert exc.value.source == str(me) and exc.value.field == "name" and str(other) in exc.value.message
    b.unlink()
    assert campaign_dag(a).dag_id == "charllm_twin"
    check_unique_name(a, "twin")


# -- 6. cron, encodings, duplicate keys, unbounded numbers, missing fields --------------------------------


@pytest.mark.parametrize(
    ("schedule", "words"),
    [
        ("61 3 * * *", "out of range"),
        ("0 25 * * *", "out of range"),
        ("0 0 1 13 *", "out of range"),
        ("*/0 * * * *", "not acceptable"),
        ("0 0 30 2 *", "never fires"),
        ("* * * *", "five-field"),
        ("0 3 * * * *", "five-field"),
        ("@reboot", "preset"),
        ("@midnight", "preset"),
        ("@continuous", "preset"),
        ("@ daily", "preset"),
        ("0 3 * * *\\n", "control characters"),
        ("H 3 * * *", "not a valid cron"),
    ],
)
def test_schedule_is_checked_like_airflow_parses_it(include_tmp, schedule, words):
    err = refused(write(include_tmp, GOOD + f'schedule: "{schedule}"\n'))
    assert err.field == "schedule" and words in err.message, str(err)


@pytest.mark.parametrize("schedule", ["0 3 * * *", "0 3 * * 1-5", "*/15 * * * *", "@daily", "@once", "@quarterly"])
def test_good_schedules_pass(include_tmp, schedule):
    assert load_campaign(write(include_tmp, GOOD + f'schedule: "{schedule}"\n')).campaign.schedule == schedule


def test_good_schedules_are_what_airflow_accepts(include_tmp):
    """Every schedule the validator lets through builds an Airflow 3 DAG (same parser, same presets)."""
    from charllm.orchestrate.factory import campaign_dag

    for i, schedule in enumerate(["0 3 * * 1-5", "@daily", "@once"]):
        p = write(include_tmp, GOOD.replace("name: t", f"name: sched{i}") + f'schedule: "{schedule}"\n', f"s{i}.yaml")
        dag = campaign_dag(p)
        assert dag.timetable is not None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (GOOD.encode().replace(b"name: t", b"name: t\ndescription: caf\xe9"), "line 2, column 17"),
        (b"\xff\xfe" + GOOD.encode("utf-16-le"), "line 1, column 1"),
        (GOOD.encode().replace(b"steps: 3", b"steps: 3\n\x80"), "line 5, column 1"),
    ],
    ids=["latin1", "utf16", "stray_continuation_byte"],
)
def test_non_utf8_is_an_error_naming_the_line(include_tmp, raw, field):
    p = include_tmp / "campaigns" / "enc.yaml"
    p.write_bytes(raw)
    err = refused(p)
    assert err.field == field and "not UTF-8" in err.message, str(err)


def test_control_characters_in_the_text_name_the_line(include_tmp):
    err = refused(write(include_tmp, GOOD + "description: a\x07b\n"))
    assert err.field.startswith("line 9") and "not allowed" in err.message, str(err)


@pytest.mark.parametrize(
    ("text", "field", "lines"),
    [
        (GOOD + "steps: 4\n", "steps", "line 9 (first at line 4)"),
        (GOOD.replace("  dp: [1, 2]\n", "  dp: [1, 2]\n  dp: [4]\n"), "sweep.dp", "line 7 (first at line 6)"),
        (GOOD + "include:\n  - {dp: 1, dp: 2}\n", "include[0].dp", "line 10 (first at line 10)"),
        (GOOD + "warmup:\n  min_steps: 1\n  min_steps: 2\n", "warmup.min_steps", "line 11 (first at line 10)"),
    ],
)
def test_duplicate_keys_name_the_key_and_both_lines(include_tmp, text, field, lines):
    err = refused(write(include_tmp, text))
    assert err.field == field and f"duplicate key {field.rsplit('.', 1)[-1]!r} at {lines}" in err.message, str(err)


def test_merge_keys_are_not_duplicates(include_tmp):
    text = GOOD + "warmup: &w {min_steps: 1, max_steps: 3}\nnightly: {cells: '*'}\n"
    text += "x-base: &b {dp: 1}\ninclude:\n  - {<<: *b, micro_batch: 4}\n"
    err = refused(write(include_tmp, text))  # x-base is an unknown field; the merge itself is fine
    assert err.field == "x-base" and err.message == "unknown field"


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ("steps: 100001\n", "steps", "less than or equal to 100000"),
        ("steps: 10000000000000000000000\n", "steps", "less than or equal to 100000"),
        ("steps: 0\n", "steps", "greater than"),
        ("seed: -1\n", "seed", "greater than or equal to 0"),
        ("seed: 2147483648\n", "seed", "less than or equal to 2147483647"),
        ("warmup: {min_steps: 5, max_steps: 2}\n", "warmup.min_steps", "greater than max_steps 2"),
        ("warmup: {max_steps: 1000000}\n", "warmup.max_steps", "less than"),
        ("repeats: 1000\n", "repeats", "less than"),
        ("backend: slurm\n", "connection_id", "needs connection_id"),
        ("nightly: {repeats: 1.5}\n", "nightly.repeats", "integer"),
    ],
)
def test_unbounded_and_inconsistent_numbers_are_errors(include_tmp, extra, field, words):
    err = refused(write(include_tmp, _with(extra)))
    assert err.field == field and words in err.message, str(err)


def test_bounds_at_their_limits_are_accepted(include_tmp):
    lc = load_campaign(
        write(include_tmp, _with("steps: 100000\nseed: 2147483647\nwarmup: {min_steps: 3, max_steps: 3}\n"))
    )
    assert lc.campaign.steps == 100_000 and lc.campaign.seed == 2**31 - 1


# -- 7. the README's thin DAG file is found by Airflow's safe-mode discovery -----------------------------


def _readme_dag_example() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    [block] = [b for b in blocks if "campaign_dag(" in b]
    return block


def test_readme_dag_example_passes_airflow_safe_mode_discovery(tmp_path):
    from airflow.utils.file import might_contain_dag_via_default_heuristic

    example = tmp_path / "campaign_mine.py"
    example.write_text(_readme_dag_example())
    assert might_contain_dag_via_default_heuristic(str(example))
    bare = tmp_path / "campaign_bare.py"  # the old example: the import and the call only
    bare.write_text('from charllm.orchestrate.factory import campaign_dag\n\ndag = campaign_dag("demo.yaml")\n')
    assert not might_contain_dag_via_default_heuristic(str(bare))
    for f in (REPO / "dags").glob("*.py"):
        assert might_contain_dag_via_default_heuristic(str(f)), f


# -- one real Airflow: broken files are their own import errors, the other DAGs still load ---------------


@pytest.mark.airflow
def test_airflow_loads_the_good_dags_next_to_broken_files(tmp_path, include_tmp):
    camp = include_tmp / "campaigns"
    demo = (camp / "demo.yaml").read_text()
    (camp / "mine.yaml").write_text(demo.replace("name: demo", "name: mine"))
    broken = {
        "bomb": _alias_bomb().replace("name: bomb", "name: bomb"),
        "hostile": GOOD.replace("name: t", "name: hostile")
        + f'include:\n  - {{dp: 1, opt_code: "00000\\ntouch {tmp_path / "PWNED"}"}}\n',
        "dup_a": GOOD.replace("name: t", "name: dup"),
        "dup_b": GOOD.replace("name: t", "name: dup"),
        "cron": GOOD.replace("name: t", "name: cron") + 'schedule: "61 3 * * *"\n',
        "huge": _huge_product(100, 3),
    }
    for stem, text in broken.items():
        (camp / f"{stem}.yaml").write_text(text)
    dags = tmp_path / "dags"
    dags.mkdir()
    for stem in ("demo", *broken):
        (dags / f"campaign_{stem}.py").write_text(
            f'"""Airflow DAG of {stem}."""\nfrom charllm.orchestrate.factory import campaign_dag\n\n'
            f'dag = campaign_dag("{stem}.yaml")\n'
        )
    (dags / "campaign_mine.py").write_text(_readme_dag_example())  # exactly as the README shows it
    home = tmp_path / "airflow-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        CHARLLM_INCLUDE=str(include_tmp),
        CHARLLM_HOME=str(tmp_path / "charllm-home"),
    )
    airflow = str(Path(sys.executable).parent / "airflow")

    def run(*args: str, rc: int = 0) -> str:
        p = subprocess.run([airflow, *args], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == rc, (p.stdout + p.stderr)[-3000:]
        return p.stdout

    t0 = time.monotonic()
    run("db", "migrate")
    listed = json.loads(run("dags", "list", "--local", "-o", "json").strip().splitlines()[-1])
    errors = json.loads(run("dags", "list-import-errors", "--local", "-o", "json", rc=1).strip().splitlines()[-1])
    print(f"airflow: migrate + list + list-import-errors in {time.monotonic() - t0:.1f} s")
    assert sorted(d["dag_id"] for d in listed) == [
        "charllm_demo",
        "charllm_demo_figures",
        "charllm_mine",
        "charllm_mine_figures",
    ]
    by_file = {Path(e["filepath"]).name: e["error"] for e in errors}
    assert sorted(by_file) == sorted(f"campaign_{s}.py" for s in broken)
    want = {
        "bomb": "bomb.yaml: l",
        "hostile": "hostile.yaml: include[0].opt_code:",
        "dup_a": f"dup_a.yaml: name: campaign name 'dup' is also used by {camp / 'dup_b.yaml'}",
        "dup_b": f"dup_b.yaml: name: campaign name 'dup' is also used by {camp / 'dup_a.yaml'}",
        "cron": "cron.yaml: schedule: '61 3 * * *' is not a valid cron expression",
        "huge": "huge.yaml: sweep: the campaign names 1000000 cells",
    }
    for stem, words in want.items():
        assert words in by_file[f"campaign_{stem}.py"], (stem, by_file[f"campaign_{stem}.py"][-1500:])
    assert not (tmp_path / "PWNED").exists()
    shutil.rmtree(home, ignore_errors=True)

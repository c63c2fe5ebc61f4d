"""The dataset stage: byte tokenizer, Megatron-style .idx/.bin files, idempotent atomic builds,
the dataset job through the real local backend, and training on the prepared tokens."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from charllm.campaign import load_campaign
from charllm.catalog import Catalog
from charllm.errors import CharllmError, ConfigError
from charllm.paths import include_dir
from charllm.runner import CampaignRunner
from charllm.setup.dataprep import (
    BYTES_EOD,
    INDEX_MAGIC,
    ByteTokenizer,
    DataPrepError,
    IndexedTokens,
    prepare,
)
from tests.train.conftest import launch, make_cell

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "include" / "data" / "corpus"


def _corpus(tmp: Path) -> tuple[Path, Path]:
    txt = tmp / "a.txt"
    txt.write_text("hello world\n\nsecond line é\n")
    jsonl = tmp / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "doc three"}) + "\n" + json.dumps({"text": "ünïcode four", "id": 4}) + "\n")
    return txt, jsonl


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    for text in ("", "plain ascii", "ünïcödé ✓ 日本", "tabs\tand 'quotes'"):
        ids = tok.encode(text)
        assert ids.dtype == np.uint16 and ids[-1] == BYTES_EOD
        assert list(ids[:-1]) == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.vocab_size == 257


def test_idx_and_bin_layout_byte_for_byte(tmp_path):
    txt, jsonl = _corpus(tmp_path)
    res = prepare([str(txt), str(jsonl)], tmp_path / "out")
    assert res.built
    docs = ["hello world", "second line é", "doc three", "ünïcode four"]
    seqs = [[*d.encode(), 256] for d in docs]
    lengths = [len(s) for s in seqs]

    binary = (tmp_path / "out" / "tokens.bin").read_bytes()
    assert binary == b"".join(struct.pack(f"<{len(s)}H", *s) for s in seqs)

    idx = (tmp_path / "out" / "tokens.idx").read_bytes()
    n = len(docs)
    pointers = [2 * sum(lengths[:i]) for i in range(n)]
    expect = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)  # version
        + struct.pack("<B", 8)  # dtype code: uint16
        + struct.pack("<Q", n)  # sequence count
        + struct.pack("<Q", n + 1)  # document count (length of the document index)
        + struct.pack(f"<{n}i", *lengths)
        + struct.pack(f"<{n}q", *pointers)
        + struct.pack(f"<{n + 1}q", *range(n + 1))
    )
    assert idx == expect
    assert idx[:9] == INDEX_MAGIC

    ds = IndexedTokens(tmp_path / "out" / "tokens")
    assert len(ds) == n and ds.n_documents == n and ds.n_tokens == sum(lengths)
    assert [ByteTokenizer().decode(ds[i]) for i in range(n)] == docs

    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["documents"] == n and m["tokens"] == sum(lengths)
    assert m["tokenizer"] == {"name": "bytes", "vocab_size": 257, "eod": 256}
    assert [c["size"] for c in m["corpus"]] == [txt.stat().st_size, jsonl.stat().st_size]
    assert m["corpus"][0]["sha256"] == hashlib.sha256(txt.read_bytes()).hexdigest()
    assert m["bin_sha256"] == hashlib.sha256(binary).hexdigest()
    assert m["idx_sha256"] == hashlib.sha256(idx).hexdigest()


def test_second_run_does_nothing_and_says_so(tmp_path):
    txt, jsonl = _corpus(tmp_path)
    out = tmp_path / "out"
    assert prepare([str(txt), str(jsonl)], out).built
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = subprocess.run(
        [sys.executable, "-m", "charllm.setup.dataprep", "--out", str(out), str(txt), str(jsonl)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert "up to date, nothing to do" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # a changed input is rebuilt
    txt.write_text("changed\n")
    res = prepare([str(txt), str(jsonl)], out)
    assert res.built and res.manifest["documents"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp dirs left


def test_truncated_bin_is_detected_and_rebuilt(tmp_path):
    txt, jsonl = _corpus(tmp_path)
    out = tmp_path / "out"
    prepare([str(txt), str(jsonl)], out)
    good = (out / "tokens.bin").read_bytes()
    (out / "tokens.bin").write_bytes(good[:-6])
    with pytest.raises(DataPrepError, match=r"tokens\.bin.*truncated"):
        IndexedTokens(out / "tokens")
    res = prepare([str(txt), str(jsonl)], out)
    assert res.built
    assert (out / "tokens.bin").read_bytes() == good
    # a missing manifest (a partial output) is rebuilt too
    (out / "manifest.json").unlink()
    assert prepare([str(txt), str(jsonl)], out).built


def test_reader_names_the_file_on_bad_header(tmp_path):
    txt, _ = _corpus(tmp_path)
    prepare([str(txt)], tmp_path / "out")
    idx = tmp_path / "out" / "tokens.idx"
    raw = bytearray(idx.read_bytes())
    raw[0:9] = b"NOTANIDX!"
    idx.write_bytes(bytes(raw))
    with pytest.raises(DataPrepError, match=rf"{idx}: bad magic"):
        IndexedTokens(tmp_path / "out" / "tokens")
    raw[0:9] = INDEX_MAGIC
    raw[9:17] = struct.pack("<Q", 2)
    idx.write_bytes(bytes(raw))
    with pytest.raises(DataPrepError, match="index version 2"):
        IndexedTokens(tmp_path / "out" / "tokens")


def test_bad_corpus_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(DataPrepError, match=str(missing)):
        prepare([str(missing)], tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "charllm.setup.dataprep", "--out", str(tmp_path / "o"), str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and str(missing) in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataPrepError, match=r"bad\.jsonl: line 2 has no string field 'text'"):
        prepare([str(bad)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shipped_corpus_files():
    files = sorted(CORPUS.iterdir())
    assert {p.suffix for p in files} == {".txt", ".jsonl"}
    assert sum(p.stat().st_size for p in files) > 10_000


# -- campaign schema -------------------------------------------------------------------------


def _campaign(tmp: Path, dataset: dict, name: str = "dsx") -> Path:
    data = yaml.safe_load((include_dir() / "campaigns" / "demo_indexed.yaml").read_text())
    data.update(name=name, dataset=dataset)
    p = tmp / "campaigns" / f"{name}.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(data))
    return p


def test_dataset_schema_errors_name_file_and_field(tmp_path):
    clusters = include_dir() / "clusters"
    p = _campaign(tmp_path, {"kind": "indexed"})
    with pytest.raises(ConfigError) as e:
        load_campaign(p, clusters)
    assert e.value.source == str(p) and e.value.field == "dataset" and "corpus" in e.value.message
    p = _campaign(tmp_path, {"kind": "indexed", "corpus": ["a.txt"], "tokenizer": "gpt2"})
    with pytest.raises(ConfigError) as e:
        load_campaign(p, clusters)
    assert e.value.field == "dataset.tokenizer"
    p = _campaign(tmp_path, {"kind": "indexed", "corpus": ["../../etc/passwd"]})
    with pytest.raises(ConfigError, match="inside include"):
        load_campaign(p, clusters)
    p = _campaign(tmp_path, {"kind": "synthetic", "corpus": ["a.txt"]})
    with pytest.raises(ConfigError, match="only for kind 'indexed'"):
        load_campaign(p, clusters)


def test_synthetic_cells_keep_their_form_and_indexed_cells_carry_the_key():
    demo = load_campaign(include_dir() / "campaigns" / "demo.yaml")
    assert all(c.dataset == {"kind": "synthetic", "path": None} for c in demo.cells)
    lc = load_campaign(include_dir() / "campaigns" / "demo_indexed.yaml")
    ds = lc.cells[0].dataset
    assert ds["kind"] == "indexed" and ds["path"] == "charllm-data" and len(ds["key"]) == 16
    assert ds["key"] == lc.campaign.dataset.key
    # the training job's cell parser accepts it
    from charllm.train.cell import CellSpec

    spec = CellSpec.from_dict(lc.cells[0].job_config(0))
    assert spec.dataset.kind == "indexed" and spec.dataset.key == ds["key"]


# -- the stage through the real local backend ----------------------------------------------


@pytest.fixture
def runner(tmp_path):
    lc = load_campaign(include_dir() / "campaigns" / "demo_indexed.yaml")
    cluster = lc.cluster.model_copy(update={"poll_interval_s": 0.2})
    lc.cluster = cluster
    home = tmp_path / "home"
    return CampaignRunner(lc, catalog=Catalog(f"sqlite:///{tmp_path / 'cat.db'}"), home=home)


def test_ensure_dataset_runs_a_local_job_then_skips(runner, caplog):
    import logging

    caplog.set_level(logging.INFO)
    t0 = time.monotonic()
    first = runner.prepare_dataset()
    assert not first["skipped"] and first["job_id"].startswith("local-")
    out = runner.home / "charllm-data" / runner.lc.campaign.dataset.key
    ds = IndexedTokens(out / "tokens")
    m = json.loads((out / "manifest.json").read_text())
    assert ds.n_tokens == m["tokens"] > 10_000 and m["documents"] > 20
    assert "charllm-dataprep:" in caplog.text and "built" in caplog.text  # the job's output tail is logged
    script = (Path(first["handle"]["workdir"]) / "job.sbatch").read_text()
    assert "-m charllm.setup.dataprep" in script and "corpus-000-distributed-training.txt" in script
    second = runner.prepare_dataset()
    assert second["skipped"] and second["job_id"] == first["job_id"]
    assert time.monotonic() - t0 < 60
    # the cell jobs are told where the data is
    script_path = runner.render(runner.lc.cells[0].cell_id, 0, runner.home / "dry")
    assert f"export CHARLLM_DATASET_DIR={out}\n" in script_path.read_text()


def test_ensure_dataset_failed_job_raises_with_its_output(tmp_path):
    lc = load_campaign(
        _campaign(tmp_path, {"kind": "indexed", "corpus": [str(tmp_path / "absent.txt")]}), include_dir() / "clusters"
    )
    lc.cluster = lc.cluster.model_copy(update={"poll_interval_s": 0.2})
    r = CampaignRunner(lc, catalog=Catalog(f"sqlite:///{tmp_path / 'cat.db'}"), home=tmp_path / "home")
    with pytest.raises(CharllmError, match=r"dataset job local-\w+ ended FAILED(.|\n)*absent\.txt does not exist"):
        r.prepare_dataset()
    # a missing relative corpus file is caught before any job, naming file and field
    lc2 = load_campaign(
        _campaign(tmp_path, {"kind": "indexed", "corpus": ["data/corpus/absent.txt"]}, "dsy"),
        include_dir() / "clusters",
    )
    r2 = CampaignRunner(lc2, catalog=Catalog(f"sqlite:///{tmp_path / 'cat2.db'}"), home=tmp_path / "home2")
    with pytest.raises(ConfigError) as e:
        r2.prepare_dataset()
    assert e.value.field == "dataset.corpus[0]" and "absent.txt" in e.value.message


def test_synthetic_dataset_needs_no_job(tmp_path):
    lc = load_campaign(include_dir() / "campaigns" / "demo.yaml")
    r = CampaignRunner(lc, catalog=Catalog(f"sqlite:///{tmp_path / 'cat.db'}"), home=tmp_path / "home")
    assert r.prepare_dataset() == {"kind": "synthetic"}


# -- training reads it ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "shipped"
    prepare([str(p) for p in sorted(CORPUS.iterdir())], out)
    return out


def test_indexed_source_windows_are_deterministic_and_from_the_file(prepared):
    from charllm.train.data import IndexedTokenSource

    ds = IndexedTokens(prepared / "tokens")
    stream = np.asarray(ds.tokens, dtype=np.int64)
    a = IndexedTokenSource(str(prepared), 512, 32, 4, seed=7, dp_rank=1)
    b = IndexedTokenSource(str(prepared), 512, 32, 4, seed=7, dp_rank=1)
    c = IndexedTokenSource(str(prepared), 512, 32, 4, seed=7, dp_rank=0)
    x, y = a.micro_batch(3)
    assert x.shape == (4, 32) and y.shape == (4, 32)
    assert (x[:, 1:] == y[:, :-1]).all()
    assert all(x2.equal(x1) for x1, x2 in zip(a.micro_batch(3), b.micro_batch(3), strict=True))
    assert not x.equal(c.micro_batch(3)[0]) and not x.equal(a.micro_batch(4)[0])
    for row in a.windows(3).numpy():  # every window is a slice of the token stream
        hits = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(stream, 33).__eq__(row).all(axis=1))
        assert hits.size >= 1
    xb, _ = a.batch(1, 2)
    assert xb.equal(torch.cat([a.micro_batch(2)[0], a.micro_batch(3)[0]]))
    assert int(x.max()) <= 256


def test_indexed_source_rejects_a_too_small_vocab(prepared):
    from charllm.train.data import IndexedTokenSource

    with pytest.raises(ValueError, match="vocabulary has only 200 ids"):
        IndexedTokenSource(str(prepared), 200, 32, 2, seed=1)


def test_tiny_training_run_on_the_indexed_dataset(prepared, tmp_path):
    data_dir = tmp_path / "charllm-data"
    shutil.copytree(prepared, data_dir / "k123")
    cell = make_cell(steps=4, dataset={"kind": "indexed", "path": str(data_dir), "tokenizer": "bytes", "key": "k123"})
    proc = launch(cell, tmp_path / "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["outcome"] == "ok"
    bad = make_cell(steps=2, dataset={"kind": "indexed", "path": str(tmp_path / "none"), "key": "k"})
    proc = launch(bad, tmp_path / "run-bad")
    assert proc.returncode != 0
    assert "does not exist" in proc.stdout + proc.stderr


def test_slurm_dataset_job_renders_with_the_cluster_env_python(tmp_path):
    """The Slurm form of the dataset job (rendered, not submitted: building the backend opens no connection)."""
    data = yaml.safe_load((include_dir() / "campaigns" / "demo_slurm.yaml").read_text())
    data.update(
        name="dsslurm",
        dataset={"kind": "indexed", "corpus": ["data/corpus/notes.jsonl", "~/corpora/x.txt", "/abs/it's.jsonl"]},
    )
    p = tmp_path / "campaigns" / "dsslurm.yaml"
    p.parent.mkdir(parents=True)
    p.write_text(yaml.safe_dump(data))
    lc = load_campaign(p, include_dir() / "clusters")
    r = CampaignRunner(lc, catalog=Catalog(f"sqlite:///{tmp_path / 'cat.db'}"), home=tmp_path / "home")
    assert r.backend.name == "slurm" and r.data_home is None
    from charllm.setup.jobs import DATA_CAMPAIGN, dataset_job

    spec, key = dataset_job(r)
    assert spec.identity.campaign == DATA_CAMPAIGN and spec.identity.cell_id == f"data{key}"
    assert list(spec.files) == ["corpus-000-notes.jsonl"]
    assert spec.files["corpus-000-notes.jsonl"] == (CORPUS / "notes.jsonl").read_text()
    s = spec.script
    ds_key = lc.campaign.dataset.key
    assert f'OUT="$HOME"/charllm-data/{ds_key}\n' in s
    assert '"$HOME"/charllm-env/bin/python -m charllm.setup.dataprep --tokenizer bytes --out "$OUT" ' in s
    abs_word = shlex.quote("/abs/it's.jsonl")
    assert 'corpus-000-notes.jsonl "$HOME"/corpora/x.txt ' + abs_word + "\n" in s
    assert "#SBATCH --partition=debug" in s and f"#SBATCH --job-name=charllm.{DATA_CAMPAIGN}.data{key}.r0.a1" in s
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0
    # the cell jobs read it from the same place
    cell_script = r.render(lc.cells[0].cell_id, 0, tmp_path / "dry").read_text()
    assert f'export CHARLLM_DATASET_DIR="$HOME"/charllm-data/{ds_key}\n' in cell_script
    # the key follows the staged content: same spec, same key; the synthetic demo's scripts have no such line
    assert dataset_job(r, 2)[1] == key
    demo = load_campaign(include_dir() / "campaigns" / "demo_slurm.yaml")
    from charllm.backends.base import JobIdentity
    from charllm.render import render_script

    c = demo.cells[0]
    assert "CHARLLM_DATASET_DIR" not in render_script(c, demo.cluster, JobIdentity("d", c.cell_id, 0, 1))


# -- through Airflow ------------------------------------------------------------------------


@pytest.mark.airflow
def test_demo_indexed_through_airflow(tmp_path):
    """``airflow dags test charllm_demo_indexed``: the dataset job, then two cells training on it."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    af_home = tmp_path / "airflow-home"
    af_home.mkdir()
    home = tmp_path / "charllm-home"
    env.update(
        AIRFLOW_HOME=str(af_home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{af_home / 'airflow.db'}",
        CHARLLM_HOME=str(home),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    airflow = str(Path(sys.executable).parent / "airflow")
    mig = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert mig.returncode == 0, mig.stdout[-3000:] + mig.stderr[-3000:]
    run = subprocess.run(
        [airflow, "dags", "test", "charllm_demo_indexed"], env=env, capture_output=True, text=True, timeout=600
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-8000:]
    assert "charllm-dataprep:" in log and "built" in log
    key = load_campaign(include_dir() / "campaigns" / "demo_indexed.yaml").campaign.dataset.key
    assert IndexedTokens(home / "charllm-data" / key / "tokens").n_tokens > 10_000
    attempts = Catalog(f"sqlite:///{home / 'catalog.db'}").attempts(campaign="demo_indexed")
    assert len(attempts) == 2 and {a.outcome for a in attempts} == {"ok"}
    for a in attempts:
        script = (Path(a.result_dir) / "job.sbatch").read_text()
        assert f"export CHARLLM_DATASET_DIR={home / 'charllm-data' / key}" in script

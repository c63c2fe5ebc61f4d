"""Dataset preparation: corpus -> byte-level tokens -> a Megatron-style indexed dataset.

``python -m charllm.setup.dataprep --out DIR CORPUS...`` reads the corpus (local paths on the
machine it runs on; ``http(s)://`` URLs are fetched with urllib), tokenizes it with the
byte-level tokenizer and writes ``DIR/tokens.bin``, ``DIR/tokens.idx`` and
``DIR/manifest.json``.

Tokenizer ``bytes``: ids 0..255 are the UTF-8 bytes of the text, id 256 ends a document
(vocabulary of 257). Documents are the non-empty lines of a ``.txt`` file, or the ``text``
field of each line of a ``.jsonl`` file. Nothing is downloaded to tokenize.

The files follow the public layout of megatron-core's ``indexed_dataset`` (``_IndexWriter``):

``.idx``: ``b"MMIDIDX\\x00\\x00"`` (9 bytes), version (``<Q``, 1), dtype code (``<B``; 8 =
uint16 in megatron's ``DType`` enum), sequence count (``<Q``), document count (``<Q``, the
length of the document index array), then the sequence lengths (``<i4`` each), the byte
pointers of the sequences into ``.bin`` (``<i8`` each) and the document indices (``<i8``
each, ``[0, 1, ..., n]``: here every document is one sequence).

``.bin``: the tokens of all sequences back to back, little-endian uint16.

Writing is idempotent and atomic: the dataset is built in a temporary directory beside
``DIR`` and renamed into place. A re-run whose manifest matches (same corpus checksums,
tokenizer and format, files present with the recorded checksums) does nothing and says so;
anything else (missing, partial or corrupt output, changed inputs) is rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from charllm.errors import CharllmError
from charllm.paths import file_sha256

FORMAT_VERSION = 1  # of this module's output (directory layout + manifest), not megatron's
INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
PREFIX = "tokens"
MANIFEST = "manifest.json"
# megatron.core.datasets.indexed_dataset.DType: numpy dtype <-> code
DTYPE_CODES: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
TOKENIZERS = ("bytes",)
BYTES_EOD = 256
BYTES_VOCAB = 257
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count


class DataPrepError(CharllmError):
    """The corpus cannot be read or the dataset files are not valid."""


# -- tokenizer ------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end of document 256."""

    name = "bytes"
    vocab_size = BYTES_VOCAB
    eod = BYTES_EOD

    def encode(self, text: str) -> np.ndarray:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        return np.concatenate([ids, np.array([self.eod], dtype=np.uint16)])

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = np.asarray(ids)
        return bytes(int(i) for i in arr if int(i) < 256).decode("utf-8", errors="replace")


def tokenizer(name: str) -> ByteTokenizer:
    if name != "bytes":
        raise DataPrepError(f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZERS)}")
    return ByteTokenizer()


# -- corpus ---------------------------------------------------------------------------------


def _is_url(src: str) -> bool:
    return src.startswith(("http://", "https://"))


def read_source(src: str) -> bytes:
    """The raw bytes of one corpus entry (a local path, or an http(s) URL)."""
    if _is_url(src):
        try:
            with urllib.request.urlopen(src, timeout=60) as resp:  # http(s) only, checked above
                return bytes(resp.read())
        except OSError as err:
            raise DataPrepError(f"corpus {src}: cannot download: {err}") from err
    path = Path(src).expanduser()
    if not path.is_file():
        raise DataPrepError(f"corpus file {src} does not exist (or is not a file)")
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataPrepError(f"corpus file {src}: cannot read: {err}") from err


def documents(src: str, raw: bytes) -> Iterator[str]:
    """The documents of one corpus entry: lines of text, or the ``text`` of JSON lines."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataPrepError(f"corpus {src}: not UTF-8 text ({err})") from err
    is_jsonl = src.split("?", 1)[0].endswith((".jsonl", ".json"))
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not is_jsonl:
            yield line
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataPrepError(f"corpus {src}: line {n} is not valid JSON: {err}") from err
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataPrepError(f"corpus {src}: line {n} has no string field 'text'")
        if obj["text"]:
            yield obj["text"]


# -- writing --------------------------------------------------------------------------------


_UINT16 = np.dtype(np.uint16)


def write_indexed(prefix: Path, seqs: Sequence[np.ndarray], dtype: np.dtype[Any] = _UINT16) -> None:
    """Write ``prefix.bin`` and ``prefix.idx``; one sequence per document."""
    code = next(c for c, d in DTYPE_CODES.items() if d == dtype)
    lengths = np.array([len(s) for s in seqs], dtype="<i4")
    pointers = np.zeros(len(seqs), dtype="<i8")
    if len(seqs) > 1:
        pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * dtype.itemsize
    doc_idx = np.arange(len(seqs) + 1, dtype="<i8")
    with open(f"{prefix}.bin", "wb") as fh:
        for s in seqs:
            fh.write(np.asarray(s, dtype=dtype.newbyteorder("<")).tobytes())
    with open(f"{prefix}.idx", "wb") as fh:
        fh.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, code, len(seqs), len(doc_idx)))
        fh.write(lengths.tobytes())
        fh.write(pointers.tobytes())
        fh.write(doc_idx.tobytes())


# -- reading --------------------------------------------------------------------------------


class IndexedTokens:
    """Read-only view of ``prefix.idx`` + ``prefix.bin`` (numpy memmaps), checked on open."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx, bin_ = Path(f"{self.prefix}.idx"), Path(f"{self.prefix}.bin")
        for p in (idx, bin_):
            if not p.is_file():
                raise DataPrepError(f"indexed dataset file {p} does not exist")
        size = idx.stat().st_size
        if size < _HEADER.size:
            raise DataPrepError(f"{idx}: too short for an index header ({size} bytes)")
        with idx.open("rb") as fh:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(fh.read(_HEADER.size))
        if magic != INDEX_MAGIC:
            raise DataPrepError(f"{idx}: bad magic {magic!r}, expected {INDEX_MAGIC!r} (not a Megatron MMIDIDX index)")
        if version != INDEX_VERSION:
            raise DataPrepError(f"{idx}: index version {version}, only {INDEX_VERSION} is supported")
        if code not in DTYPE_CODES:
            raise DataPrepError(f"{idx}: unknown dtype code {code}")
        self.dtype = DTYPE_CODES[code]
        want = _HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if size < want:
            raise DataPrepError(f"{idx}: {size} bytes, but its header promises {want} ({n_seq} sequences)")
        off = _HEADER.size
        self.lengths = (
            np.memmap(idx, dtype="<i4", mode="r", offset=off, shape=(n_seq,)) if n_seq else np.zeros(0, "<i4")
        )
        off += 4 * n_seq
        self.pointers = (
            np.memmap(idx, dtype="<i8", mode="r", offset=off, shape=(n_seq,)) if n_seq else np.zeros(0, "<i8")
        )
        off += 8 * n_seq
        self.doc_idx = np.memmap(idx, dtype="<i8", mode="r", offset=off, shape=(n_doc,))
        n_tokens = int(np.sum(self.lengths, dtype=np.int64))
        bin_size = bin_.stat().st_size
        if bin_size != n_tokens * self.dtype.itemsize:
            raise DataPrepError(
                f"{bin_}: {bin_size} bytes, but {idx} describes {n_tokens} tokens of {self.dtype} "
                f"({n_tokens * self.dtype.itemsize} bytes): truncated or mismatched"
            )
        if n_seq:
            expect = np.concatenate([[0], np.cumsum(self.lengths[:-1], dtype=np.int64)]) * self.dtype.itemsize
            if not np.array_equal(expect, self.pointers):
                raise DataPrepError(f"{idx}: sequence pointers do not match the sequence lengths")
        self.n_tokens = n_tokens
        self.tokens = (
            np.memmap(bin_, dtype=self.dtype.newbyteorder("<"), mode="r", shape=(n_tokens,))
            if n_tokens
            else np.zeros(0, self.dtype)
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.lengths[i])])

    @property
    def n_documents(self) -> int:
        return max(0, len(self.doc_idx) - 1)


# -- the stage ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepResult:
    out: Path
    built: bool
    manifest: dict[str, Any]

    @property
    def message(self) -> str:
        m = self.manifest
        what = "built" if self.built else "up to date, nothing to do"
        return (
            f"charllm-dataprep: {self.out}: {what} ({m['documents']} documents, {m['tokens']} tokens, "
            f"tokenizer {m['tokenizer']['name']})"
        )


def _inputs(corpus: Sequence[str]) -> list[tuple[str, bytes, dict[str, Any]]]:
    if not corpus:
        raise DataPrepError("the corpus is empty: give at least one file")
    out = []
    for src in corpus:
        raw = read_source(src)
        out.append((src, raw, {"source": src, "sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}))
    return out


def check_output(out: Path, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest if ``out`` holds a complete, intact dataset for ``expect``; else None."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict):
        return None
    for k, v in expect.items():
        if manifest.get(k) != v:
            return None
    try:
        for name, key in ((f"{PREFIX}.bin", "bin_sha256"), (f"{PREFIX}.idx", "idx_sha256")):
            if file_sha256(out / name) != manifest.get(key):
                return None
        ds = IndexedTokens(out / PREFIX)
    except (OSError, DataPrepError):
        return None
    if ds.n_tokens != manifest.get("tokens") or ds.n_documents != manifest.get("documents"):
        return None
    return manifest


def _check_replaceable(out: Path) -> None:
    """``out`` is replaced as a whole: refuse a filesystem root, a file, or a folder that is not a dataset."""
    if out.parent == out:
        raise DataPrepError(f"refusing to write a dataset at {out}: give a folder below it")
    if out.is_symlink() or not out.exists():
        return
    if not out.is_dir():
        raise DataPrepError(f"{out} exists and is not a folder: refusing to replace it with a dataset")
    names = {p.name for p in out.iterdir()}
    if names and not names & {MANIFEST, f"{PREFIX}.bin", f"{PREFIX}.idx"}:
        raise DataPrepError(
            f"{out} holds files that are not a charllm dataset ({', '.join(sorted(names)[:5])}): refusing to replace it"
        )


def prepare(corpus: Sequence[str], out: str | Path, tokenizer_name: str = "bytes") -> PrepResult:
    """Build (or find up to date) the indexed dataset of ``corpus`` in directory ``out``."""
    out = Path(out).expanduser().absolute()
    tok = tokenizer(tokenizer_name)
    inputs = _inputs(corpus)
    expect = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "eod": tok.eod},
        "corpus": [meta for _, _, meta in inputs],
    }
    found = check_output(out, expect)
    if found is not None:
        return PrepResult(out, False, found)
    _check_replaceable(out)

    seqs: list[np.ndarray] = []
    for src, raw, _ in inputs:
        seqs.extend(tok.encode(doc) for doc in documents(src, raw))
    if not seqs:
        raise DataPrepError(f"the corpus {list(corpus)} holds no documents")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_indexed(tmp / PREFIX, seqs)
        n_tokens = int(sum(len(s) for s in seqs))
        manifest = {
            **expect,
            "prefix": PREFIX,
            "dtype": "uint16",
            "documents": len(seqs),
            "sequences": len(seqs),
            "tokens": n_tokens,
            "bin_sha256": file_sha256(tmp / f"{PREFIX}.bin"),
            "idx_sha256": file_sha256(tmp / f"{PREFIX}.idx"),
        }
        IndexedTokens(tmp / PREFIX)  # read back what was written
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        old = None
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepResult(out, True, manifest)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m charllm.setup.dataprep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (tokens.bin, tokens.idx, manifest.json)")
    ap.add_argument("--tokenizer", default="bytes", choices=TOKENIZERS)
    ap.add_argument("corpus", nargs="+", help="corpus files (.txt: one document a line; .jsonl: 'text' field)")
    args = ap.parse_args(argv)
    try:
        res = prepare(args.corpus, args.out, args.tokenizer)
    except DataPrepError as err:
        print(f"charllm-dataprep: error: {err}", file=sys.stderr)
        return 2
    print(res.message, flush=True)
    print(
        json.dumps(
            {
                "out": str(res.out),
                "built": res.built,
                "tokens": res.manifest["tokens"],
                "documents": res.manifest["documents"],
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The install key is reproducible: the same sources give the same archive bytes."""

from __future__ import annotations

import gzip
import io
import tarfile
import time

import pytest

from charllm import envsetup


def test_source_tarball_is_byte_identical_across_clock_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    first = envsetup.source_tarball()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 86_400 * 365)  # gzip stamps time.time() unless told
    second = envsetup.source_tarball()
    assert first == second
    assert first[4:8] == b"\0\0\0\0", "gzip header MTIME must be zero"


def test_source_tarball_members_sorted_with_fixed_metadata() -> None:
    data = envsetup.source_tarball()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert "charllm/__init__.py" in names and not any("__pycache__" in n for n in names)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}

"""Campaign files for tests: a small valid campaign, and writing one into an include folder."""

from __future__ import annotations

from pathlib import Path

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
    """``text`` as ``include/campaigns/<name>``, byte for byte."""
    p = include / "campaigns" / name
    p.write_text(text)
    return p

"""Values that reach a shell: names are checked, everything else is quoted."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

# Names (campaign, cell, partition, account, ...) end up in file names, job names and
# shell words. Keep them to a conservative alphabet instead of trusting quoting alone.
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")  # \Z: "$" would accept a trailing newline


def is_safe_name(value: str) -> bool:
    return bool(NAME_RE.match(value))


def q(value: object) -> str:
    """Quote one value for a POSIX shell."""
    return shlex.quote(str(value))


def join(words: Iterable[object]) -> str:
    """Quote and join words into one shell command line."""
    return " ".join(q(w) for w in words)

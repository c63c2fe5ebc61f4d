"""Values that reach a shell: names are checked, everything else is quoted."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

# Names (campaign, cell, partition, account, ...) end up in file names, job names and
# shell words. Keep them to a conservative alphabet instead of trusting quoting alone.
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")  # \Z: "$" would accept a trailing newline


# What no rendered value may hold: C0/C1 controls (a newline ends a comment or an #SBATCH line),
# DEL, Unicode line/paragraph separators, zero-width and bidirectional formatting characters.
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def is_safe_name(value: object) -> bool:
    """``value`` is a str that fully matches :data:`NAME_RE` (the one name check of the package)."""
    return isinstance(value, str) and bool(NAME_RE.match(value))


def has_control(value: str) -> bool:
    return CONTROL_RE.search(value) is not None


def q(value: object) -> str:
    """Quote one value for a POSIX shell."""
    return shlex.quote(str(value))


def join(words: Iterable[object]) -> str:
    """Quote and join words into one shell command line."""
    return " ".join(q(w) for w in words)

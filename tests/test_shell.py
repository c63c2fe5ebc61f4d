"""The one safe-name pattern: full match, no control characters, no trailing newline."""

from __future__ import annotations

import pytest

from charllm.shell import NAME_RE, is_safe_name


@pytest.mark.parametrize("name", ["demo", "gpt3-1.3b", "a", "x_y.z-1", "A" * 128])
def test_safe_names_pass(name: str) -> None:
    assert is_safe_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "demo\n",  # "$" alone would accept this: it splits an #SBATCH line
        "demo\nsbatch evil",
        "demo\r",
        "de\tmo",
        "demo\x00",
        "",
        "-demo",
        ".hidden",
        "a/b",
        "../up",
        "a b",
        "a;b",
        "A" * 129,
    ],
)
def test_unsafe_names_fail(name: str) -> None:
    assert not is_safe_name(name)
    assert NAME_RE.match(name) is None

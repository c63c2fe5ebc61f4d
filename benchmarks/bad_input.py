"""How fast and how small ``charllm validate`` refuses hostile campaign files.

Each case is written to a temporary folder and checked by ``charllm validate FILE`` in a fresh
process; a driver process runs it and reads the child's peak resident memory with
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``. The target (issue 10): every case is an
error naming the file and the field within 2 s and 200 MB. A plain good campaign is measured
too, as the floor (interpreter, pydantic, PyYAML).

    .venv/bin/python benchmarks/bad_input.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_S, TARGET_MB = 2.0, 200.0

GOOD = "name: {name}\ncluster: local-cpu\nmodel: tiny\nsteps: 3\nsweep:\n  dp: [1, 2]\n  global_batch: [8]\n"


def alias_bomb(levels: int = 9, width: int = 10) -> str:
    """Billion laughs: each level lists the previous one ``width`` times (width**levels leaves)."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return GOOD.format(name="bomb") + "\n".join(lines) + f"\ndescription: *l{levels - 1}\n"


def huge_product(per_axis: int = 100, axes: int = 3) -> str:
    """A sweep of per_axis**axes cells (a million by default)."""
    values = ", ".join(str(i) for i in range(1, per_axis + 1))
    names = ["micro_batch", "global_batch", "seq_len", "tp", "pp"][:axes]
    sweep = "".join(f"  {n}: [{values}]\n" for n in names)
    return f"name: huge\ncluster: local-cpu\nmodel: tiny\nsweep:\n{sweep}"


def deep_nesting(depth: int = 100_000) -> str:
    return GOOD.format(name="deep") + "description: " + "[" * depth + "]" * depth + "\n"


def many_aliases(n: int = 200_000) -> str:
    return GOOD.format(name="aliases") + "tags: &t [a]\ninclude: [" + ", ".join(["*t"] * n) + "]\n"


CASES = {
    "good campaign (floor)": (GOOD.format(name="good"), None),
    "alias bomb (10^9 nodes)": (alias_bomb(), "l"),
    "huge product (10^6 cells)": (huge_product(), "sweep"),
    "huge product (10^10 cells)": (huge_product(100, 5), "sweep"),
    "deep nesting (100,000)": (deep_nesting(), "description"),
    "200,000 aliases": (many_aliases(), "include"),
    "2 MiB file": (GOOD.format(name="big") + "description: '" + "x" * (2 << 20) + "'\n", "(file)"),
}

DRIVER = textwrap.dedent(
    """
    import json, resource, subprocess, sys, time
    t0 = time.monotonic()
    p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    wall = time.monotonic() - t0
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"rc": p.returncode, "wall_s": wall, "peak_mb": rss_kb / 1024, "out": p.stdout + p.stderr}))
    """
)


def measure(path: Path) -> dict[str, object]:
    """``charllm validate path`` in a fresh process: exit code, wall seconds, the child's peak RSS in MB, output."""
    charllm = str(Path(sys.executable).parent / "charllm")
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, charllm, "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="charllm-bad-input-"))
    try:
        shutil.copytree(REPO / "include" / "clusters", tmp / "clusters")
        (tmp / "campaigns").mkdir()
        print(f"{'case':<28} {'rc':>3} {'wall s':>7} {'peak MB':>8}  within {TARGET_S:g} s / {TARGET_MB:g} MB  message")
        worst = 0
        for i, (case, (text, field)) in enumerate(CASES.items()):
            path = tmp / "campaigns" / f"case{i}.yaml"
            path.write_text(text)
            r = measure(path)
            wall, mb = float(r["wall_s"]), float(r["peak_mb"])  # type: ignore[arg-type]
            ok = wall < TARGET_S and mb < TARGET_MB
            line = next((ln for ln in str(r["out"]).splitlines() if ln.startswith(("ERROR", "ok"))), "")
            named = field is None or (f"{path}: {field}" in line)
            worst |= 0 if (ok and named) else 1
            print(f"{case:<28} {r['rc']:>3} {wall:>7.2f} {mb:>8.1f}  {'yes' if ok else 'NO ':<21}  {line[:110]}")
        return worst
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""Frequency plans in the job: how a cell names one, how it is resolved, checked and shipped.

A cell names its plan with ``frequency_plan: <path>[@<point>]``:

- ``<path>`` is a relative POSIX path (letters, digits, ``_ . -``; at most 8 components, 512
  characters, no ``..``) of a ``plans.jsonl`` written by ``charllm energy-plan`` (one line per
  frontier point: ``{"time", "energy", "plan": [[stage, instruction, micro_batch, mhz], ...]}``,
  ordered from the slowest to the fastest point). It is resolved under the **results home**
  (``CHARLLM_HOME``, where ``energy-plan`` writes by default: ``energy-plan/<cell>/plans.jsonl``)
  with :func:`charllm.campaign.path_under`: a path that leaves the home (``..``, a symlink out)
  is refused.
- ``@<point>`` picks the frontier point (0-based line; negative counts from the end); without it
  the last line, the minimum-time plan, is taken.

When the job is rendered (:func:`charllm.render.job_spec`) the plan is read, checked against the
cell (one entry for every stage ``0..pp-1``, instruction ``forward``/``backward`` and micro batch
``0..m-1``, clocks within 100..5000 MHz) and shipped beside ``cell.json`` as
``frequency_plan.json``; the job reads only that file (on a Slurm cluster the results home is
not the login node's). A cell whose gate denies clocks is never shipped a plan: it ends
``skipped`` before anything is read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charllm.errors import ConfigError

JOB_FILE = "frequency_plan.json"
INSTRUCTIONS = ("forward", "backward")
MAX_REF_LEN = 512
MAX_PLAN_BYTES = 64 << 20
MAX_ENTRIES = 1 << 20
MHZ_RANGE = (100, 5000)
REF_PATTERN = r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+){0,7}\.jsonl(@-?\d{1,6})?$"
_REF = re.compile(REF_PATTERN)


def parse_ref(ref: str) -> tuple[str, int]:
    """``path[@point]`` -> (relative path, frontier point index; -1 = the last, fastest)."""
    if not isinstance(ref, str) or len(ref) > MAX_REF_LEN or not _REF.match(ref):
        raise ValueError(
            f"frequency_plan {ref!r}: expected a relative path to a plans.jsonl (letters, digits, _ . -; "
            f"at most 8 components, {MAX_REF_LEN} characters) with an optional @<frontier point>"
        )
    path, _, point = ref.partition("@")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"frequency_plan {ref!r}: '.' and '..' components are not allowed")
    return path, int(point) if point else -1


@dataclass(frozen=True)
class FrequencyPlan:
    """SM clock (MHz) per (stage, instruction, micro batch)."""

    table: Mapping[tuple[int, str, int], int]
    source: str = ""
    time_s: float | None = None

    def for_stage(self, stage: int) -> dict[tuple[str, int], int]:
        return {(i, mb): f for (s, i, mb), f in self.table.items() if s == stage}

    def check(self, pp: int, micro_batches: int, where: str = "frequency_plan") -> None:
        """Exactly one clock per stage, instruction and micro batch of a ``pp`` x ``micro_batches`` cell."""
        want = {(s, i, mb) for s in range(pp) for i in INSTRUCTIONS for mb in range(micro_batches)}
        have = set(self.table)
        if have != want:
            missing, extra = sorted(want - have)[:3], sorted(have - want)[:3]
            raise ConfigError(
                where,
                "plan",
                f"the plan does not match the cell (pp {pp}, {micro_batches} micro batches): "
                f"missing {missing}{'...' if len(want - have) > 3 else ''}, "
                f"unexpected {extra}{'...' if len(have - want) > 3 else ''}",
            )

    def to_json(self) -> dict[str, Any]:
        rows = [[s, i, mb, f] for (s, i, mb), f in sorted(self.table.items())]
        return {"source": self.source, "time": self.time_s, "plan": rows}


def _entries(rows: Any, where: str) -> dict[tuple[int, str, int], int]:
    if not isinstance(rows, list) or len(rows) > MAX_ENTRIES:
        raise ConfigError(where, "plan", f"expected a list of at most {MAX_ENTRIES} [stage, instruction, mb, mhz]")
    table: dict[tuple[int, str, int], int] = {}
    lo, hi = MHZ_RANGE
    for n, row in enumerate(rows):
        ok = (
            isinstance(row, list)
            and len(row) == 4
            and type(row[0]) is int
            and 0 <= row[0] < 4096
            and row[1] in INSTRUCTIONS
            and type(row[2]) is int
            and 0 <= row[2] < 1 << 16
            and type(row[3]) is int
            and lo <= row[3] <= hi
        )
        if not ok:
            raise ConfigError(
                where,
                f"plan[{n}]",
                f"{row!r}: expected [stage 0..4095, forward|backward, micro batch >= 0, MHz {lo}..{hi}]",
            )
        key = (row[0], row[1], row[2])
        if key in table:
            raise ConfigError(where, f"plan[{n}]", f"{key} appears twice")
        table[key] = row[3]
    return table


def read_plans(path: Path, point: int = -1) -> FrequencyPlan:
    """One frontier point of an ``energy-plan`` ``plans.jsonl`` (bounded, every entry typed)."""
    where = str(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ConfigError(where, "frequency_plan", f"cannot read the plan: {err.strerror or err}") from None
    if size > MAX_PLAN_BYTES:
        raise ConfigError(where, "frequency_plan", f"{size} bytes: larger than {MAX_PLAN_BYTES}")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(where, "frequency_plan", "no frontier point in the file")
    if not -len(lines) <= point < len(lines):
        raise ConfigError(where, "frequency_plan", f"point @{point}: the file has {len(lines)} frontier points")
    idx = point % len(lines)
    try:
        obj = json.loads(lines[idx])
    except json.JSONDecodeError as err:
        raise ConfigError(where, f"line {idx + 1}", f"not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise ConfigError(where, f"line {idx + 1}", "expected an object with a 'plan'")
    t = obj.get("time")
    return FrequencyPlan(_entries(obj.get("plan"), f"{where} line {idx + 1}"), f"{path.name}@{idx}", _num(t))


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def resolve(ref: str, home: Path, pp: int, micro_batches: int) -> FrequencyPlan:
    """The plan a cell names, read from under ``home`` (never outside it) and checked against the cell."""
    from charllm.paths import path_under

    try:
        rel, point = parse_ref(ref)
    except ValueError as err:
        raise ConfigError("cell", "frequency_plan", str(err)) from None
    path = path_under(home, *rel.split("/"))
    plan = read_plans(path, point)
    plan = FrequencyPlan(plan.table, ref, plan.time_s)
    plan.check(pp, micro_batches, str(path))
    return plan


def load_job_plan(folder: Path, ref: str) -> FrequencyPlan:
    """The plan shipped beside the job's ``cell.json`` (:data:`JOB_FILE`)."""
    from charllm.paths import path_under

    path = path_under(folder, JOB_FILE)
    try:
        obj = json.loads(path.read_text()) if path.stat().st_size <= MAX_PLAN_BYTES else None
    except FileNotFoundError:
        raise ConfigError(
            str(path), "frequency_plan", f"the cell names plan {ref!r} but no {JOB_FILE} was shipped with it"
        ) from None
    if not isinstance(obj, dict):
        raise ConfigError(str(path), "frequency_plan", "expected an object with a 'plan' (at most 64 MiB)")
    if obj.get("source") != ref:
        raise ConfigError(str(path), "source", f"{obj.get('source')!r} is not the cell's plan {ref!r}")
    return FrequencyPlan(_entries(obj.get("plan"), str(path)), ref, _num(obj.get("time")))

"""The local results store: one directory per cell attempt, written atomically.

Layout under ``home()/results``::

    cells/<cell_id>/r<repeat>/a<attempt>/   manifest.json, job.sbatch, cell.json,
                                            stdout.log, stderr.log, out/...

A cell's results live under its content hash, not under a campaign, so a cell shared
by two campaigns is stored once. An attempt directory is filled under a temporary name
and renamed into place, so a crash never leaves half a result where a reader looks.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from charllm import __version__
from charllm.backends.base import OUTPUT_DIR, JobIdentity
from charllm.errors import ResultError, StorageError
from charllm.outcomes import ENDED_OUTCOMES, Outcome
from charllm.paths import file_sha256

OUTCOMES = tuple(str(o) for o in ENDED_OUTCOMES)  # what a result.json may say
RESULT_FILE = "result.json"
MANIFEST = "manifest.json"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def attempt_dir(home: Path, ident: JobIdentity) -> Path:
    """``results/cells/<cell>/r<repeat>/a<attempt>[-<nonce>]``: a new catalog never meets an old attempt's folder."""
    return home / "results" / "cells" / ident.cell_id / f"r{ident.repeat}" / ident.tag


def storage_error(err: OSError, path: Path | str, what: str) -> StorageError:
    """A :class:`StorageError` that names the path that could not be written, and why.

    ``err.filename`` (the file the system call failed on) is named when the error has one,
    else ``path`` (the folder being written); disk full and permission errors say so plainly.
    """
    import errno

    where = err.filename or path
    why = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        why = f"no space left (disk full or quota): {why}"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"permission denied: {why}"
    return StorageError(f"{what}: cannot write {where}: {why}")


def read_result(job_dir: Path) -> dict[str, Any]:
    """The job's own ``out/result.json``, checked for shape."""
    path = job_dir / OUTPUT_DIR / RESULT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ResultError(f"job wrote no {OUTPUT_DIR}/{RESULT_FILE}") from err
    except (OSError, ValueError) as err:
        raise ResultError(f"{OUTPUT_DIR}/{RESULT_FILE} is unreadable: {err}") from err
    if not isinstance(data, dict) or data.get("outcome") not in OUTCOMES:
        raise ResultError(f"{OUTPUT_DIR}/{RESULT_FILE} has no valid 'outcome' (got {str(data)[:200]!r})")
    if data["outcome"] == Outcome.OK:
        metrics = data.get("metrics")
        if not isinstance(metrics, dict) or not metrics:
            raise ResultError(f"{OUTPUT_DIR}/{RESULT_FILE} says ok but carries no metrics")
        check_outputs(job_dir / OUTPUT_DIR, data)
    return data


def _expected_telemetry(result: dict[str, Any]) -> list[str]:
    """The telemetry files an ok result's provenance says its ranks wrote."""
    tele = (result.get("provenance") or {}).get("telemetry") or {}
    prefix = "rank" if tele.get("gpu") else "node_rank"
    names = []
    for entry in tele.get("per_rank") or []:
        if isinstance(entry, dict) and isinstance(entry.get("rank"), int):
            names.append(f"telemetry/{prefix}{entry['rank']}.parquet")
    return names


def check_outputs(out: Path, result: dict[str, Any]) -> None:
    """Every output of an ok attempt is there, readable and complete, or :class:`ResultError`.

    ``steps.csv`` parses with its header and at least one measured step; every Parquet file
    (each rank's telemetry named in the result's provenance, and any other) opens and reads
    in full: a truncated file (a job killed while writing, a copy cut off) fails here, before
    the catalog says ``ok`` and before aggregation reads it; every other CSV parses.
    """
    import csv

    steps = out / "steps.csv"
    try:
        with steps.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise ResultError(f"{OUTPUT_DIR}/steps.csv is missing for an ok result") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ResultError(f"{OUTPUT_DIR}/steps.csv is unreadable: {err}") from err
    if not rows or "phase" not in rows[0] or not any(r.get("phase") == "measure" for r in rows):
        raise ResultError(f"{OUTPUT_DIR}/steps.csv has no measured step (header or rows missing)")
    for name in _expected_telemetry(result):
        if not (out / name).is_file():
            raise ResultError(f"{OUTPUT_DIR}/{name} is missing: the result says that rank sampled telemetry")
    import pyarrow.parquet as pq

    for path in sorted(out.rglob("*.parquet")):
        rel = path.relative_to(out)
        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise ResultError(f"{OUTPUT_DIR}/{rel} is unreadable (truncated or damaged): {err}") from err
        if table.num_rows == 0:
            raise ResultError(f"{OUTPUT_DIR}/{rel} holds no rows")
    for path in sorted(out.rglob("*.csv")):
        if path == steps:
            continue
        try:
            with path.open(newline="") as fh:
                for _ in csv.reader(fh):
                    pass
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise ResultError(f"{OUTPUT_DIR}/{path.relative_to(out)} is unreadable: {err}") from err


def _is_local_write_error(err: OSError, under: Path) -> bool:
    """Disk full, quota or read-only file system, or permission denied on a path under ``under``.

    A permission error on the cluster's side (reading a job's file over SFTP) is not ours.
    """
    import errno

    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    return err.errno in (errno.EACCES, errno.EPERM) and str(err.filename or "").startswith(str(under))


def file_index(root: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> size and sha256 of every file below ``root``."""
    index: dict[str, dict[str, Any]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            index[str(p.relative_to(root))] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    return index


def verify(directory: Path) -> dict[str, Any]:
    """Re-check a committed attempt against its manifest; returns the manifest."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise ResultError(f"{directory}: manifest missing or unreadable: {err}") from err
    for rel, meta in manifest.get("files", {}).items():
        p = directory / rel
        if not p.is_file() or p.stat().st_size != meta["bytes"]:
            raise ResultError(f"{directory}: {rel} is missing or has the wrong size")
    return manifest


def commit_attempt(
    home: Path,
    ident: JobIdentity,
    fetch: Callable[[Path], None],
    manifest_fields: dict[str, Any],
    classify: Callable[[Path], tuple[str, dict[str, Any] | None, str]],
) -> tuple[Path, dict[str, Any]]:
    """Fetch a job's files into a temporary directory, validate, write the manifest, rename.

    ``classify(tmpdir) -> (outcome, result_or_None, message)`` decides the outcome from
    the fetched files. Returns the final directory and its manifest. If the attempt was
    committed before (a retried collect), the existing one is returned untouched.
    """
    final = attempt_dir(home, ident)
    if (final / MANIFEST).is_file():
        return final, verify(final)
    staging = home / "results" / ".staging"
    what = f"collecting {ident.relpath}"
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error(err, staging, what) from err
    tmp = staging / f"{ident.cell_id}.r{ident.repeat}.{ident.tag}.{uuid.uuid4().hex[:8]}"
    try:
        try:
            tmp.mkdir()
        except OSError as err:
            raise storage_error(err, tmp, what) from err
        try:
            fetch(tmp)
        except shutil.Error as err:  # copytree: a list of (src, dst, why), one per file
            first = err.args[0][0] if err.args and err.args[0] else ("?", tmp, str(err))
            raise StorageError(f"{what}: cannot write {first[1]}: {first[2]}") from err
        except OSError as err:
            if not _is_local_write_error(err, tmp):
                raise
            raise storage_error(err, tmp, what) from err
        outcome, result, message = classify(tmp)
        manifest = {
            "schema": 1,
            **manifest_fields,
            "identity": ident.as_dict(),
            "outcome": outcome,
            "message": message,
            "metrics": (result or {}).get("metrics", {}),
            "collected_at": now_iso(),
            "collector": {
                "host": socket.gethostname(),
                "charllm": __version__,
                "python": sys.version.split()[0],
                "platform": platform.platform(),
            },
            "files": file_index(tmp),
        }
        tmp_manifest = tmp / (MANIFEST + ".tmp")
        try:
            tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            os.replace(tmp_manifest, tmp / MANIFEST)
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise storage_error(err, tmp, what) from err
        try:
            os.rename(tmp, final)
        except OSError as err:
            if (final / MANIFEST).is_file():  # a concurrent collect won the race
                return final, verify(final)
            raise storage_error(err, final, what) from err
        return final, manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

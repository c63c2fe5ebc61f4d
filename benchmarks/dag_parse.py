"""DAG parse time per campaign file, as Airflow's DagBag sees it (target <= 0.5 s per file).

Prints, for every DAG file in dags/, the median of several parses in one warm process
(what the dag-processor pays on each re-parse) and one cold parse in a fresh interpreter
(imports included). Run: .venv/bin/python benchmarks/dag_parse.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPEATS = 7


def warm(path: Path) -> list[float]:
    from airflow.dag_processing.dagbag import DagBag

    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        bag = DagBag(dag_folder=str(path))
        times.append(time.perf_counter() - t0)
        if bag.import_errors:
            raise SystemExit(f"{path}: {bag.import_errors}")
    return times


def cold(path: Path) -> float:
    code = (
        "import time; t0 = time.perf_counter(); "
        "from airflow.dag_processing.dagbag import DagBag; t1 = time.perf_counter(); "
        f"DagBag(dag_folder={str(path)!r}); t2 = time.perf_counter(); "
        "import json; print('T' + json.dumps([t1 - t0, t2 - t1]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("T"))
    return float(json.loads(line[1:])[1])


def main() -> None:
    print(f"{'DAG file':<32} {'warm median s':>14} {'warm max s':>11} {'cold s':>8}  target <= 0.5 s")
    for path in sorted((REPO / "dags").glob("*.py")):
        w = warm(path)
        c = cold(path)
        print(f"{path.name:<32} {statistics.median(w):>14.4f} {max(w):>11.4f} {c:>8.3f}")


if __name__ == "__main__":
    main()
